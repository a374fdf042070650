package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/storage"
)

// slowStore is a Store whose writes complete when the test says so.
type slowStore struct {
	mu      sync.Mutex
	pending []func(uint64, error)
	queued  chan struct{}
}

func newSlowStore() *slowStore { return &slowStore{queued: make(chan struct{}, 100)} }

func (s *slowStore) store(_ *storage.Message, done func(uint64, error)) error {
	s.mu.Lock()
	s.pending = append(s.pending, done)
	s.mu.Unlock()
	s.queued <- struct{}{}
	return nil
}

// finish completes every queued write with err.
func (s *slowStore) finish(err error) {
	s.mu.Lock()
	p := s.pending
	s.pending = nil
	s.mu.Unlock()
	for i, done := range p {
		done(uint64(i+1), err)
	}
}

func startBroker(t *testing.T, store func(*storage.Message, func(uint64, error)) error) *Broker {
	t.Helper()
	b, err := New(Options{
		Listeners: []Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "r", true },
		Store:     store,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func publishAsync(c *paho.Client, payload string) <-chan error {
	res := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := c.Publish(ctx, &paho.Publish{Topic: "t/x", QoS: 1, Payload: []byte(payload)})
		res <- err
	}()
	return res
}

// TestPubackWaitsForStore: the PUBACK leaves only once the store has
// written the message, while the broker keeps reading the client's next
// publishes.
func TestPubackWaitsForStore(t *testing.T) {
	s := newSlowStore()
	b := startBroker(t, s.store)
	c := mqtttest.Client(t, b.Addrs()[0], "pub")
	results := []<-chan error{publishAsync(c, "a"), publishAsync(c, "b"), publishAsync(c, "c")}
	for range results {
		select {
		case <-s.queued: // the broker read all three without waiting for the store
		case <-time.After(10 * time.Second):
			t.Fatal("the broker did not read the publishes")
		}
	}
	select {
	case err := <-results[0]:
		t.Fatalf("publish acknowledged before the store wrote it (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	s.finish(nil)
	for i, r := range results {
		if err := <-r; err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if st := b.Stats(); st.Stored != 3 || st.Failed != 0 {
		t.Fatalf("stats %+v, want 3 stored", st)
	}
}

// TestStoreFailureClosesWithoutPuback: a write that fails after the hook
// returned closes the client's connection; no PUBACK is ever sent for it.
func TestStoreFailureClosesWithoutPuback(t *testing.T) {
	s := newSlowStore()
	b := startBroker(t, s.store)
	conn, err := net.Dial("tcp", b.Addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan error, 1)
	c := paho.NewClient(paho.ClientConfig{ClientID: "pub", Conn: conn, OnClientError: func(err error) { lost <- err }})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "pub", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	res := publishAsync(c, "a")
	<-s.queued
	s.finish(errors.New("disk gone"))
	select {
	case err := <-lost:
		t.Logf("client connection closed: %v", err)
	case err := <-res:
		t.Fatalf("publish completed although the store failed: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the client's connection was not closed after the store failed")
	}
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("publish acknowledged although the store failed")
		}
	default: // still waiting for a PUBACK that will not come
	}
	if st := b.Stats(); st.Failed != 1 || st.Stored != 0 {
		t.Fatalf("stats %+v, want 1 failed", st)
	}
	// The broker keeps serving other clients.
	c2 := mqtttest.Client(t, b.Addrs()[0], "pub2")
	res = publishAsync(c2, "b")
	<-s.queued
	s.finish(nil)
	if err := <-res; err != nil {
		t.Fatalf("publish after a failure: %v", err)
	}
}

// TestFullStoreRefusesAtOnce: storage.ErrFull from the store answers an
// MQTT 5 publisher with PUBACK 0x97.
func TestFullStoreRefusesAtOnce(t *testing.T) {
	b := startBroker(t, func(*storage.Message, func(uint64, error)) error { return storage.ErrFull })
	c := mqtttest.Client(t, b.Addrs()[0], "pub")
	resp, err := c.Publish(context.Background(), &paho.Publish{Topic: "t/x", QoS: 1, Payload: []byte("a")})
	if resp == nil || resp.ReasonCode != 0x97 {
		t.Fatalf("publish to a full store: %+v, %v; want reason 0x97", resp, err)
	}
	if st := b.Stats(); st.Refused != 1 {
		t.Fatalf("stats %+v, want 1 refused", st)
	}
}

// TestCloseDisconnectsClients: Close sends every connected client a
// DISCONNECT with reason 0x8B (server shutting down). Outpost closes a
// listener's clients itself, not through mochi's Clients.GetByListener,
// which takes its read lock twice and deadlocks when a client leaves in
// between (mochi-mqtt/server#488, v2.7.9).
func TestCloseDisconnectsClients(t *testing.T) {
	b := startBroker(t, func(_ *storage.Message, done func(uint64, error)) error { done(1, nil); return nil })
	const n = 3
	reasons := make(chan byte, n)
	for i := range n {
		c, err := mqtttest.DialWith(b.Addrs()[0], fmt.Sprintf("c%d", i), func(cfg *paho.ClientConfig) {
			cfg.OnServerDisconnect = func(d *paho.Disconnect) { reasons <- d.ReasonCode }
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	}
	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close has not returned after 10s")
	}
	for i := range n {
		select {
		case r := <-reasons:
			if r != 0x8B {
				t.Fatalf("client got DISCONNECT reason 0x%02x, want 0x8B", r)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d clients got a DISCONNECT", i, n)
		}
	}
}
