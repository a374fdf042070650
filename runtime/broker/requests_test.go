package broker

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/storage"
)

// TestAgentNeverPublishesOnRequestTopics: a response whose topic is a
// request topic, and a publish of the agent's on one, are refused; neither
// reaches the request handler. Otherwise a client could give a request
// topic as its response topic and have the agent call a handler as itself.
func TestAgentNeverPublishesOnRequestTopics(t *testing.T) {
	b, err := New(Options{
		Listeners: []Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "", false },
		Store:     func(*storage.Message, func(uint64, error)) error { return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	var requests atomic.Int32
	if err := b.HandleRequests("outpost/commands/+", 1, func(Request) { requests.Add(1) }); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !b.IsRequestTopic("outpost/commands/reboot") || b.IsRequestTopic("replies/me") {
		t.Fatal("IsRequestTopic does not match the request filter")
	}
	if err := b.Respond(Response{Topic: "outpost/commands/reboot", Payload: []byte("x")}); !errors.Is(err, ErrRequestTopic) {
		t.Fatalf("Respond on a request topic: %v", err)
	}
	if err := b.PublishLocal("outpost/commands/reboot", []byte("x"), 0); !errors.Is(err, ErrRequestTopic) {
		t.Fatalf("PublishLocal on a request topic: %v", err)
	}
	// A response elsewhere goes out, and a request published by the agent
	// would have arrived by now.
	if err := b.Respond(Response{Topic: "replies/me", Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := requests.Load(); n != 0 {
		t.Fatalf("%d requests reached the handler", n)
	}
}
