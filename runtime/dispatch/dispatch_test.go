package dispatch

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

func TestParseTopic(t *testing.T) {
	for _, c := range []struct {
		topic string
		kind  abi.Kind
		name  string
		err   string
	}{
		{"outpost/methods/reboot", abi.KindMethod, "reboot", ""},
		{"outpost/commands/set-led", abi.KindCommand, "set-led", ""},
		{"outpost/methods/", 0, "", "one non-empty topic level"},
		{"outpost/methods/a/b", 0, "", "one non-empty topic level"},
		{"plant/line1", 0, "", "not a request topic"},
	} {
		k, n, err := parseTopic(c.topic)
		if k != c.kind || n != c.name || (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v %q %v", c.topic, k, n, err)
		}
	}
}

// blocking is a Caller that holds every call until released.
type blocking struct {
	started chan struct{}
	release chan struct{}
}

func (b *blocking) Call(_ context.Context, req *sandbox.Request) *sandbox.Response {
	b.started <- struct{}{}
	<-b.release
	return &sandbox.Response{Status: 200, Payload: []byte(req.Name)}
}

// TestBoundedAndReplies: beyond the bound a request is answered 429 at
// once; served requests get their status and correlation data; requests
// without a response topic get no reply.
func TestBoundedAndReplies(t *testing.T) {
	b := &blocking{started: make(chan struct{}, 4), release: make(chan struct{})}
	var mu sync.Mutex
	var replies []Reply
	d := New(b, func(r Reply) error { mu.Lock(); replies = append(replies, r); mu.Unlock(); return nil }, 1, nil)
	d.Local(Request{Topic: "outpost/methods/first", ResponseTopic: "r", Correlation: []byte{1}})
	<-b.started
	d.Local(Request{Topic: "outpost/methods/second", ResponseTopic: "r", Correlation: []byte{2}})
	close(b.release)
	d.Close()
	d.Local(Request{Topic: "outpost/commands/quiet"}) // no response topic
	<-b.started
	d.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(replies) != 2 {
		t.Fatalf("%d replies: %+v", len(replies), replies)
	}
	byCorr := map[byte]Reply{}
	for _, r := range replies {
		byCorr[r.Correlation[0]] = r
	}
	if r := byCorr[2]; r.Props[0] != (abi.Property{Key: StatusProperty, Value: "429"}) {
		t.Fatalf("over the bound: %+v", r)
	}
	if r := byCorr[1]; r.Props[0] != (abi.Property{Key: StatusProperty, Value: "200"}) || string(r.Payload) != "first" || r.Topic != "r" {
		t.Fatalf("served: %+v", r)
	}
}
