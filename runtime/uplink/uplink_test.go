package uplink

import (
	"context"
	"io"
	"net/url"
	"testing"

	"github.com/eclipse/paho.golang/packets"

	"github.com/outpost-edge/outpost/storage"
)

// newTestUplink returns an uplink (not started) over a real outbox holding n
// messages, with its session connected to nothing.
func newTestUplink(t *testing.T, n int) (*Uplink, *sessionWrapper, *outboxQueue, *storage.Outbox) {
	t.Helper()
	ob, err := storage.Open(storage.Options{Dir: t.TempDir(), Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	for i := range n {
		if err := ob.Append(&storage.Message{Route: "r", Topic: "t", QoS: 1, Payload: []byte{byte('a' + i)}}); err != nil {
			t.Fatal(err)
		}
	}
	u, err := New(Options{
		URL:      &url.URL{Scheme: "mqtt", Host: "127.0.0.1:1"},
		ClientID: "test",
		Source:   ob,
		Topic:    func(m *storage.Message) string { return "up/" + m.Topic },
	})
	if err != nil {
		t.Fatal(err)
	}
	s := newSession(u)
	if err := s.ConAckReceived(io.Discard, &packets.Connect{}, &packets.Connack{}); err != nil {
		t.Fatal(err)
	}
	return u, s, &outboxQueue{u: u}, ob
}

// send does what autopaho's publish loop does with the next queue entry,
// without a network: it returns the packet identifier and payload.
func send(t *testing.T, s *sessionWrapper, q *outboxQueue) (uint16, string) {
	t.Helper()
	e, err := q.Peek()
	if err != nil {
		t.Fatal(err)
	}
	r, err := e.Reader()
	if err != nil {
		t.Fatal(err)
	}
	cp, err := packets.ReadPacket(r)
	if err != nil {
		t.Fatal(err)
	}
	pub := cp.Content.(*packets.Publish)
	if err := s.AddToSession(context.Background(), pub, make(chan packets.ControlPacket, 1)); err != nil {
		t.Fatal(err)
	}
	if err := e.Remove(); err != nil {
		t.Fatal(err)
	}
	return pub.PacketID, string(pub.Payload)
}

func puback(t *testing.T, s *sessionWrapper, id uint16) {
	t.Helper()
	cp := packets.NewControlPacket(packets.PUBACK)
	cp.Content.(*packets.Puback).PacketID = id
	if err := s.PacketReceived(cp, make(chan *packets.Publish, 1)); err != nil {
		t.Fatal(err)
	}
}

// TestAckInOrderResendsNothing: acknowledgements in order move the window
// on and resend nothing.
func TestAckInOrderResendsNothing(t *testing.T) {
	u, s, q, _ := newTestUplink(t, 3)
	var ids []uint16
	for range 3 {
		id, _ := send(t, s, q)
		ids = append(ids, id)
	}
	for _, id := range ids {
		puback(t, s, id)
	}
	if st := u.Stats(); st.Skipped != 0 || st.InFlight != 0 || st.Forwarded != 3 {
		t.Fatalf("stats %+v, want 3 forwarded, none skipped or in flight", st)
	}
	if _, err := q.Peek(); err == nil {
		t.Fatal("a message is offered again after every one was acknowledged")
	}
}

// TestLaterAckResendsEarlier: when the PUBACK of a later message arrives
// while an earlier one is still unacknowledged, the earlier one never
// reached the receiver (QoS 1 is acknowledged in order): it is sent again,
// and so is everything after it that is not yet acknowledged.
func TestLaterAckResendsEarlier(t *testing.T) {
	u, s, q, ob := newTestUplink(t, 3)
	_, first := send(t, s, q)
	id2, _ := send(t, s, q)
	_, third := send(t, s, q)
	puback(t, s, id2)
	if err := ob.Maintain(); err != nil { // writes the acknowledgement now
		t.Fatal(err)
	}
	st := u.Stats()
	if st.Skipped != 1 {
		t.Fatalf("skipped %d, want 1 (%+v)", st.Skipped, st)
	}
	_, again := send(t, s, q)
	if again != first {
		t.Fatalf("after the skip the next message sent is %q, want the skipped %q", again, first)
	}
	// The window goes on from there: the third message is sent again too
	// (the second is acknowledged and gone).
	if _, next := send(t, s, q); next != third {
		t.Fatalf("then %q, want %q", next, third)
	}
}
