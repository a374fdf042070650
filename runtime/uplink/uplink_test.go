package uplink

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/batchconn"
	"github.com/outpost-edge/outpost/storage"
)

// harness is an uplink (not started) over a real outbox, with a link whose
// connection is one end of a pipe; the test reads what is sent from the
// other end and acknowledges as the upstream would.
type harness struct {
	t    testing.TB
	u    *Uplink
	l    *link
	ob   *storage.Outbox
	wire net.Conn
	buf  bytes.Buffer
}

// newHarness stores payloads (QoS 1, route "r") and connects the session.
func newHarness(t testing.TB, payloads ...string) *harness {
	t.Helper()
	ob, err := storage.Open(storage.Options{Dir: t.TempDir(), Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	for _, p := range payloads {
		if err := ob.Append(&storage.Message{Route: "r", Topic: "t", QoS: 1, Payload: []byte(p)}); err != nil {
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
	u.ctx, u.cancel = context.WithCancel(context.Background())
	t.Cleanup(u.cancel)
	client, server := net.Pipe()
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	l := &link{conn: batchconn.New(client).(lockedConn), maxQoS: 1, retain: true, recvMax: 65535, done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(u.ctx)
	u.epoch = 1 // as dial does
	u.link = l
	return &harness{t: t, u: u, l: l, ob: ob, wire: server}
}

// send sends the next stored message as the publish loop does and returns
// the packet that reached the wire.
func (h *harness) send() *packets.Publish {
	h.t.Helper()
	if err := h.sendOnly(); err != nil {
		h.t.Fatal(err)
	}
	return h.read()
}

// sendOnly sends (and flushes) the next stored message, as the publish
// loop does at the end of a batch, and returns the error. It does not stop
// the test, so it may run on another goroutine.
func (h *harness) sendOnly() error {
	ctx, cancel := context.WithTimeout(h.l.ctx, 5*time.Second)
	defer cancel()
	msgs, gen, ok := h.u.next(ctx)
	if !ok {
		return errors.New("nothing to send")
	}
	if _, err := h.u.send(h.l, &msgs[0], gen, &h.buf); err != nil {
		return err
	}
	return h.u.flush(h.l)
}

// read returns the next packet on the wire.
func (h *harness) read() *packets.Publish {
	h.t.Helper()
	_ = h.wire.SetReadDeadline(time.Now().Add(5 * time.Second))
	cp, err := packets.ReadPacket(h.wire)
	if err != nil {
		h.t.Fatalf("reading the wire: %v", err)
	}
	pub, ok := cp.Content.(*packets.Publish)
	if !ok {
		h.t.Fatalf("sent %T, want a PUBLISH", cp.Content)
	}
	return pub
}

// puback delivers a PUBACK read on the current connection.
func (h *harness) puback(id uint16, reason byte) {
	h.u.mu.Lock()
	epoch := h.u.epoch
	h.u.mu.Unlock()
	h.u.puback(epoch, id, reason, nil)
}

// inFlight returns the packet identifiers in flight, oldest first.
func (h *harness) inFlight() []uint16 {
	h.u.mu.Lock()
	defer h.u.mu.Unlock()
	var ids []uint16
	for o := h.u.win.first; o < h.u.win.next; o++ {
		ids = append(ids, uint16(o%idSpace)+1)
	}
	return ids
}

// reconnect stands for a new connection: dial, then the CONNACK.
func (h *harness) reconnect() {
	h.t.Helper()
	h.u.mu.Lock()
	h.u.epoch++
	h.u.mu.Unlock()
	if err := h.u.sess.ConAckReceived(io.Discard, &packets.Connect{}, &packets.Connack{}); err != nil {
		h.t.Fatal(err)
	}
	h.l.ctx, h.l.cancel = context.WithCancel(h.u.ctx)
	h.u.mu.Lock()
	h.u.link = h.l
	h.u.mu.Unlock()
}

// stored returns the payloads left in the outbox, after pending
// acknowledgements are written.
func (h *harness) stored() []string {
	h.t.Helper()
	if err := h.ob.Maintain(); err != nil {
		h.t.Fatal(err)
	}
	msgs, err := h.ob.Next(storage.Cursor{}, 100)
	if err != nil {
		h.t.Fatal(err)
	}
	var out []string
	for _, m := range msgs {
		out = append(out, string(m.Payload))
	}
	return out
}

// TestSendEncodesThePublish: what reaches the wire is the stored message
// as a QoS 1 PUBLISH under the topic mapping, with the packet identifier
// the session assigned and the message id as a user property.
func TestSendEncodesThePublish(t *testing.T) {
	h := newHarness(t, "one", "two")
	for i, want := range []string{"one", "two"} {
		pub := h.send()
		if string(pub.Payload) != want || pub.Topic != "up/t" || pub.QoS != 1 || pub.PacketID == 0 {
			t.Fatalf("sent %q on %q qos %d id %d, want %q on up/t qos 1 with an id", pub.Payload, pub.Topic, pub.QoS, pub.PacketID, want)
		}
		if ids := h.inFlight(); len(ids) != i+1 || ids[i] != pub.PacketID {
			t.Fatalf("in flight %v, want packet %d registered last", ids, pub.PacketID)
		}
		if !hasUserProp(pub.Properties, MessageIDProperty) {
			t.Fatalf("no %s user property: %+v", MessageIDProperty, pub.Properties.User)
		}
	}
}

func hasUserProp(p *packets.Properties, key string) bool {
	for _, u := range p.User {
		if u.Key == key && u.Value != "" {
			return true
		}
	}
	return false
}

// TestSetPacketID: patching the identifier into a packet encoded without
// one gives exactly paho's encoding with it, for every length of the
// remaining-length field and for empty and long topics.
func TestSetPacketID(t *testing.T) {
	for _, tc := range []struct{ topic, payload int }{
		{0, 0}, {1, 10}, {5, 100}, {300, 0}, {10, 20000}, {1000, 3_000_000},
	} {
		pub := &packets.Publish{
			Topic:      strings.Repeat("t", tc.topic),
			Payload:    bytes.Repeat([]byte{'p'}, tc.payload),
			QoS:        1,
			Properties: &packets.Properties{User: []packets.User{{Key: "k", Value: "v"}}},
		}
		var patched bytes.Buffer
		if _, err := pub.WriteTo(&patched); err != nil {
			t.Fatal(err)
		}
		pub.PacketID = 0xA1B2
		setPacketID(patched.Bytes(), len(pub.Topic), pub.PacketID)
		var want bytes.Buffer
		if _, err := pub.WriteTo(&want); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(patched.Bytes(), want.Bytes()) {
			t.Fatalf("topic %d payload %d: patched encoding differs from paho's", tc.topic, tc.payload)
		}
	}
}

// TestAckInOrderResendsNothing: acknowledgements in order delete the
// messages and resend nothing.
func TestAckInOrderResendsNothing(t *testing.T) {
	h := newHarness(t, "a", "b", "c")
	var ids []uint16
	for range 3 {
		ids = append(ids, h.send().PacketID)
	}
	for _, id := range ids {
		h.puback(id, 0)
	}
	if st := h.u.Stats(); st.Skipped != 0 || st.InFlight != 0 || st.Forwarded != 3 {
		t.Fatalf("stats %+v, want 3 forwarded, none skipped or in flight", st)
	}
	if left := h.stored(); len(left) != 0 {
		t.Fatalf("stored after every PUBACK: %q", left)
	}
}

// TestLaterAckResendsEarlier: when the PUBACK of a later message arrives
// while an earlier one is still unacknowledged, the earlier one never
// reached the receiver (QoS 1 is acknowledged in order): it is sent again,
// and so is everything after it that is not yet acknowledged.
func TestLaterAckResendsEarlier(t *testing.T) {
	h := newHarness(t, "a", "b", "c")
	h.send()
	id2 := h.send().PacketID
	h.send()
	h.puback(id2, 0)
	if err := h.ob.Maintain(); err != nil { // writes the acknowledgement of b now
		t.Fatal(err)
	}
	if st := h.u.Stats(); st.Skipped != 1 {
		t.Fatalf("skipped %d, want 1 (%+v)", st.Skipped, st)
	}
	if got := string(h.send().Payload); got != "a" {
		t.Fatalf("after the skip the next message sent is %q, want the skipped a", got)
	}
	// The window goes on from there: c is sent again too (b is
	// acknowledged and gone).
	if got := string(h.send().Payload); got != "c" {
		t.Fatalf("then %q, want c", got)
	}
	if st := h.u.Stats(); st.Resent != 2 {
		t.Fatalf("resent %d, want 2", st.Resent)
	}
}

// TestOversizedMessageDropped: a message larger than the server's Maximum
// Packet Size can never be delivered there; it is dropped and counted
// instead of blocking its route, and the next one is sent.
func TestOversizedMessageDropped(t *testing.T) {
	h := newHarness(t, strings.Repeat("x", 500), "small")
	h.l.maxPacket = 200
	if err := h.sendOnly(); err != nil {
		t.Fatal(err)
	}
	if st := h.u.Stats(); st.Rejected != 1 || st.InFlight != 0 {
		t.Fatalf("stats %+v, want 1 rejected, none in flight", st)
	}
	if left := h.stored(); len(left) != 1 || left[0] != "small" {
		t.Fatalf("stored %q, want only the small message", left)
	}
	if got := string(h.send().Payload); got != "small" {
		t.Fatalf("sent %q, want small", got)
	}
}

// TestRefusalVerdict: the dialect's verdict on a refused message decides
// whether it is dropped or sent again.
func TestRefusalVerdict(t *testing.T) {
	h := newHarness(t, "bad", "good")
	h.u.opts.Refusal = func(reason byte, props []Property) Verdict {
		if reason == 0x83 && len(props) == 1 && props[0].Value == "0100" {
			return Drop
		}
		return Retry
	}
	h.u.mu.Lock()
	epoch := h.u.epoch
	h.u.mu.Unlock()
	pub := h.send()
	h.u.puback(epoch, pub.PacketID, 0x83, []Property{{Key: "status", Value: "0100"}})
	if st := h.u.Stats(); st.Rejected != 1 || st.Refused != 0 {
		t.Fatalf("stats %+v: want the message dropped as rejected", st)
	}
	if left := h.stored(); len(left) != 1 || left[0] != "good" {
		t.Fatalf("stored %q, want only the good message", left)
	}
	pub = h.send()
	h.u.puback(epoch, pub.PacketID, 0x97, []Property{{Key: "status", Value: "0501"}})
	if st := h.u.Stats(); st.Refused != 1 {
		t.Fatalf("stats %+v: want the throttled message kept to retry", st)
	}
	if left := h.stored(); len(left) != 1 {
		t.Fatalf("stored %q after a retryable refusal", left)
	}
}

// TestPayloadOverMaxPayloadDropped: a message over the dialect's payload
// limit is dropped before it is sent; the next one goes out.
func TestPayloadOverMaxPayloadDropped(t *testing.T) {
	h := newHarness(t, strings.Repeat("x", 101), "small")
	h.u.opts.MaxPayload = 100
	if err := h.sendOnly(); err != nil {
		t.Fatal(err)
	}
	if got := string(h.send().Payload); got != "small" {
		t.Fatalf("sent %q, want small", got)
	}
	if st := h.u.Stats(); st.Rejected != 1 {
		t.Fatalf("stats %+v, want 1 rejected", st)
	}
}

// TestQoS0Option: with QoS0 set a QoS 1 message goes out at QoS 0 and
// leaves the outbox once written.
func TestQoS0Option(t *testing.T) {
	h := newHarness(t, "a")
	h.u.opts.QoS0 = true
	if p := h.send(); p.QoS != 0 || p.PacketID != 0 {
		t.Fatalf("sent at QoS %d id %d, want QoS 0", p.QoS, p.PacketID)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(h.stored()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still stored: %q", h.stored())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestQoS0OnlyServerKeepsMessages: a server that accepts QoS 0 only cannot
// acknowledge, so nothing is sent and everything stays stored, with an
// error that says why.
func TestQoS0OnlyServerKeepsMessages(t *testing.T) {
	h := newHarness(t, "a")
	h.l.maxQoS = 0
	if err := h.sendOnly(); err == nil || !strings.Contains(err.Error(), "QoS 0 only") {
		t.Fatalf("send: %v, want the QoS 0 error", err)
	}
	if st := h.u.Stats(); !strings.Contains(st.LastError, "QoS 0 only") || st.InFlight != 0 {
		t.Fatalf("stats %+v", st)
	}
	if left := h.stored(); len(left) != 1 {
		t.Fatalf("stored %q, want the message kept", left)
	}
}

// TestLostConnectionRewinds: after the connection is lost, what was in
// flight is sent again, from the oldest, and a late PUBACK from the old
// connection deletes nothing, even when its packet identifier is in use on
// the new one.
func TestLostConnectionRewinds(t *testing.T) {
	h := newHarness(t, "a", "b")
	oldEpoch := h.u.epoch
	id := h.send().PacketID
	h.send()
	if err := h.u.sess.ConnectionLost(nil); err != nil {
		t.Fatal(err)
	}
	if h.l.ctx.Err() == nil {
		t.Fatal("the lost connection's publish loop was not stopped")
	}
	if st := h.u.Stats(); st.InFlight != 0 {
		t.Fatalf("%d in flight after the connection was lost", st.InFlight)
	}
	if _, _, ok := h.u.next(h.l.ctx); ok {
		t.Fatal("the publish loop of a lost connection reads on")
	}
	h.puback(id, 0)
	if left := h.stored(); len(left) != 2 {
		t.Fatalf("stored %q, want both kept for the next connection", left)
	}
	// The next connection starts again at a.
	h.reconnect()
	h.u.win.first, h.u.win.next = 0, 0 // so that a gets the old connection's identifier
	pub := h.send()
	if got := string(pub.Payload); got != "a" || pub.PacketID != id {
		t.Fatalf("first after reconnecting: %q with id %d, want a with %d", got, pub.PacketID, id)
	}
	h.u.puback(oldEpoch, id, 0, nil)
	if st := h.u.Stats(); st.InFlight != 1 || st.Forwarded != 0 {
		t.Fatalf("after a late PUBACK of the old connection: %+v, want a still in flight", st)
	}
	if left := h.stored(); len(left) != 2 {
		t.Fatalf("stored %q, want both kept", left)
	}
}

// TestFailedQoS0WriteIsSentAgain: a QoS 0 message is not in the window, so
// when its write fails the cursor goes back to it at once; it is the first
// message the next connection sends.
func TestFailedQoS0WriteIsSentAgain(t *testing.T) {
	h := newHarness(t)
	if err := h.ob.Append(&storage.Message{Route: "r", Topic: "t", QoS: 0, Payload: []byte("q0")}); err != nil {
		t.Fatal(err)
	}
	_ = h.l.conn.Close()
	if err := h.sendOnly(); !errors.Is(err, errLinkDown) {
		t.Fatalf("send on a closed connection: %v, want a lost-connection error", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	msgs, _, ok := h.u.next(ctx)
	if !ok || len(msgs) == 0 || string(msgs[0].Payload) != "q0" {
		t.Fatalf("next after the failed write: %d messages (ok %v), want q0 first", len(msgs), ok)
	}
	if left := h.stored(); len(left) != 1 {
		t.Fatalf("stored %q, want q0 kept", left)
	}
}

// BenchmarkSend measures the publish loop's work per message: reading the
// outbox, encoding, the session and the write, with a PUBACK for each (the
// reader of the pipe stands in for the upstream and discards what it gets).
func BenchmarkSend(b *testing.B) {
	payload := strings.Repeat("x", 200)
	ps := make([]string, b.N)
	for i := range ps {
		ps[i] = payload
	}
	h := newHarness(b, ps...)
	go func() { _, _ = io.Copy(io.Discard, h.wire) }()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	sent := 0
	for sent < b.N {
		msgs, gen, ok := h.u.next(ctx)
		if !ok {
			b.Fatal("nothing to send")
		}
		for i := range msgs {
			if _, err := h.u.send(h.l, &msgs[i], gen, &h.buf); err != nil {
				b.Fatal(err)
			}
			sent++
		}
		if err := h.u.flush(h.l); err != nil {
			b.Fatal(err)
		}
		for _, id := range h.inFlight() {
			h.puback(id, 0)
		}
	}
}

// TestWindowWithinReceiveMaximum: with the server's Receive Maximum at 2,
// a third publish waits until a PUBACK frees a slot, and nothing of it
// reaches the wire meanwhile.
func TestWindowWithinReceiveMaximum(t *testing.T) {
	h := newHarness(t, "a", "b", "c")
	h.l.recvMax = 2
	first := h.send().PacketID
	h.send()
	third := make(chan error, 1)
	go func() { third <- h.sendOnly() }()
	select {
	case err := <-third:
		t.Fatalf("a third publish went out with a Receive Maximum of 2 (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	if st := h.u.Stats(); st.InFlight != 2 {
		t.Fatalf("%d in flight, want 2", st.InFlight)
	}
	h.puback(first, 0)
	if err := <-third; err != nil {
		t.Fatal(err)
	}
	if got := string(h.read().Payload); got != "c" {
		t.Fatalf("after the PUBACK %q went out, want c", got)
	}
}

// TestWindowWaitEndsWithTheConnection: a publish waiting for room in the
// window gives up when its connection is lost, and nothing is lost.
func TestWindowWaitEndsWithTheConnection(t *testing.T) {
	h := newHarness(t, "a", "b")
	h.l.recvMax = 1
	h.send()
	second := make(chan error, 1)
	go func() { second <- h.sendOnly() }()
	time.Sleep(50 * time.Millisecond) // let it wait (it would wait either way)
	if err := h.u.sess.ConnectionLost(nil); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-second:
		if err == nil {
			t.Fatal("the waiting publish reported success on a lost connection")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting publish did not end with its connection")
	}
	if left := h.stored(); len(left) != 2 {
		t.Fatalf("stored %q, want both kept", left)
	}
}

// TestPahoPublishRefused: a QoS 1 publish through paho's session would
// never see its PUBACK (the uplink takes them all); it is refused with an
// error that says where publishes go.
func TestPahoPublishRefused(t *testing.T) {
	h := newHarness(t)
	err := h.u.sess.AddToSession(context.Background(), &packets.Publish{Topic: "t", QoS: 1}, make(chan packets.ControlPacket, 1))
	if !errors.Is(err, errPahoPublish) {
		t.Fatalf("AddToSession(PUBLISH): %v, want errPahoPublish", err)
	}
}

// TestReceiveMaximumZero: a server that announces a Receive Maximum of 0
// (a protocol error) gets a window of 1 instead of a loop that never sends.
func TestReceiveMaximumZero(t *testing.T) {
	h := newHarness(t, "a")
	h.u.dialled = h.l.conn
	h.u.link = nil // the harness's link has no loop to stop
	zero := uint16(0)
	h.u.onUp(nil, &paho.Connack{Properties: &paho.ConnackProperties{ReceiveMaximum: &zero}})
	t.Cleanup(h.u.stopLink)
	h.u.mu.Lock()
	l := h.u.link
	h.u.mu.Unlock()
	if l == nil || l.recvMax != 1 {
		t.Fatalf("link %+v, want a window of 1", l)
	}
	if got := string(h.read().Payload); got != "a" {
		t.Fatalf("sent %q, want a", got)
	}
}

// countingConn counts the Writes made to a link's connection.
type countingConn struct {
	lockedConn
	mu     sync.Mutex
	writes int
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes++
	c.mu.Unlock()
	return c.lockedConn.Write(p)
}

func (c *countingConn) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writes
}

// runLoop starts the publish loop on h's link and stops it at the end of
// the test.
func (h *harness) runLoop() {
	go h.u.run(h.l)
	h.t.Cleanup(func() { h.l.cancel(); <-h.l.done })
}

// TestBatchGoesOutInOneWrite: the publish loop gathers the packets of a
// batch read from the outbox and writes them to the connection at once.
func TestBatchGoesOutInOneWrite(t *testing.T) {
	payloads := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	h := newHarness(t, payloads...)
	cc := &countingConn{lockedConn: h.l.conn}
	h.l.conn = cc
	h.runLoop()
	for _, want := range payloads {
		if got := string(h.read().Payload); got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	}
	if n := cc.count(); n != 1 {
		t.Fatalf("%d writes for a batch of %d messages, want 1", n, len(payloads))
	}
}

// TestFullWindowWritesWhatItGathered: a publish loop that must wait for
// room in the window first writes the packets it gathered, since the
// PUBACKs that make room can only come for packets the server got.
// Without that the loop and the server would wait for each other.
func TestFullWindowWritesWhatItGathered(t *testing.T) {
	h := newHarness(t, "a", "b", "c", "d")
	h.l.recvMax = 2
	h.runLoop()
	for _, want := range []string{"a", "b", "c", "d"} {
		pub := h.read() // fails after 5 s if a gathered packet stayed back
		if got := string(pub.Payload); got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
		h.puback(pub.PacketID, 0)
	}
}
