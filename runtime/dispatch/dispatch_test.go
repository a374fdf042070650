package dispatch

import (
	"context"
	goruntime "runtime"
	"strings"
	"sync"
	"testing"
	"time"

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
	d.Local(Request{Topic: "outpost/commands/quiet"}) // no response topic: no reply, 429 or not
	close(b.release)
	d.Close(context.Background())
	d.Local(Request{Topic: "outpost/methods/late", ResponseTopic: "r", Correlation: []byte{3}})
	mu.Lock()
	defer mu.Unlock()
	if len(replies) != 3 {
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
	if r := byCorr[3]; r.Props[0] != (abi.Property{Key: StatusProperty, Value: "503"}) {
		t.Fatalf("after Close: %+v", r)
	}
}

type echo struct{}

func (echo) Call(_ context.Context, req *sandbox.Request) *sandbox.Response {
	return &sandbox.Response{Status: 200, Payload: req.Payload}
}

// TestWorkersReusedAndEnded: requests are served by long-lived workers,
// never more than the bound, and Close ends them.
func TestWorkersReusedAndEnded(t *testing.T) {
	replies := make(chan Reply, 1)
	base := goruntime.NumGoroutine()
	d := New(echo{}, func(r Reply) error { replies <- r; return nil }, 4, nil)
	d.idle = time.Hour // only Close ends them
	most := 0
	for i := range 200 {
		d.Local(Request{Topic: "outpost/methods/echo", ResponseTopic: "r", Payload: []byte{byte(i)}})
		if r := <-replies; len(r.Payload) != 1 || r.Payload[0] != byte(i) {
			t.Fatalf("request %d: reply %+v", i, r)
		}
		most = max(most, goruntime.NumGoroutine()-base)
	}
	if most > 4 {
		t.Fatalf("%d goroutines for one request at a time, with a bound of 4", most)
	}
	closed := make(chan struct{})
	go func() { d.Close(context.Background()); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return: the idle workers did not end")
	}
	deadline := time.Now().Add(10 * time.Second)
	for goruntime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left after Close, %d before New", goruntime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestNo429WithinTheBound: a client that keeps exactly the bound in flight,
// sending the next request as each response arrives, is never refused.
func TestNo429WithinTheBound(t *testing.T) {
	const bound = 4
	replies := make(chan Reply, bound)
	d := New(echo{}, func(r Reply) error { replies <- r; return nil }, bound, nil)
	defer d.Close(context.Background())
	send := func() { d.Local(Request{Topic: "outpost/methods/echo", ResponseTopic: "r", Payload: []byte("x")}) }
	for range bound {
		send()
	}
	for i := range 20000 {
		r := <-replies
		if st := r.Props[0].Value; st != "200" {
			t.Fatalf("response %d: status %s with %d in flight, bound %d", i, st, bound, bound)
		}
		send()
	}
}

// TestCloseBoundedByItsContext: when Close's context ends before the
// calls in progress, Close returns; they finish on their own.
func TestCloseBoundedByItsContext(t *testing.T) {
	b := &blocking{started: make(chan struct{}, 3), release: make(chan struct{})}
	d := New(b, func(Reply) error { return nil }, 4, nil)
	for range 3 {
		d.Local(Request{Topic: "outpost/methods/slow"})
		<-b.started
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	closed := make(chan struct{})
	go func() { d.Close(ctx); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after its context ended")
	}
	close(b.release)
	d.Close(context.Background()) // and now waits for them
}

// TestIdleWorkersEnd: a worker with nothing to do ends after the idle time.
func TestIdleWorkersEnd(t *testing.T) {
	replies := make(chan Reply, 1)
	base := goruntime.NumGoroutine()
	d := New(echo{}, func(r Reply) error { replies <- r; return nil }, 4, nil)
	defer d.Close(context.Background())
	d.idle = 20 * time.Millisecond
	for range 10 {
		d.Local(Request{Topic: "outpost/methods/echo", ResponseTopic: "r"})
		<-replies
	}
	deadline := time.Now().Add(10 * time.Second)
	for goruntime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left after the idle time, %d before New", goruntime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
