package uplink

import (
	"bytes"
	"context"
	"errors"
	"io"
	"time"

	"github.com/eclipse/paho.golang/autopaho/queue"
	"github.com/eclipse/paho.golang/packets"
	paholog "github.com/eclipse/paho.golang/paho/log"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"

	"github.com/outpost-edge/outpost/storage"
)

// outboxQueue adapts the outbox to autopaho's queue.Queue. autopaho's publish loop
// calls Wait, Peek, Reader and then Remove (sent into the session) or Leave
// (not sent) from one goroutine. Remove does not delete anything: the outbox
// deletes a message when its PUBACK arrives (see session).
type outboxQueue struct{ u *Uplink }

var (
	_ queue.Queue            = (*outboxQueue)(nil)
	_ session.SessionManager = (*sessionWrapper)(nil)
)

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Wait returns a channel that is closed when there may be something to send.
func (q *outboxQueue) Wait() chan struct{} {
	u := q.u
	u.mu.Lock()
	if u.closing {
		// Nothing more is sent; hand back a channel that stays open until the
		// publish loop ends with the context.
		if u.wake == nil {
			u.wake = make(chan struct{})
		}
		w := u.wake
		u.mu.Unlock()
		return w
	}
	if len(u.buf) > 0 && !time.Now().Before(u.pauseUntil) {
		u.mu.Unlock()
		return closedChan
	}
	if u.wake == nil {
		u.wake = make(chan struct{})
	}
	w := u.wake
	paused := time.Now().Before(u.pauseUntil)
	u.mu.Unlock()
	if paused {
		return w
	}
	// The wake channel exists before the read: an append after the read
	// closes it.
	if q.fill() {
		return closedChan
	}
	return w
}

// fill reads the next batch into the buffer when it is empty and reports
// whether anything is buffered.
func (q *outboxQueue) fill() bool {
	u := q.u
	u.mu.Lock()
	if len(u.buf) > 0 {
		u.mu.Unlock()
		return true
	}
	gen := u.gen
	cur := make(storage.Cursor, len(u.sent))
	for k, v := range u.sent {
		cur[k] = v
	}
	u.mu.Unlock()

	msgs, err := u.opts.Source.Next(cur, u.opts.Batch)
	if err != nil {
		u.setErr(err)
		u.log.Error("outbox read failed", "error", err)
		return false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if gen != u.gen || len(u.buf) > 0 {
		return len(u.buf) > 0 // rewound meanwhile: read again next time
	}
	u.buf = msgs
	return len(u.buf) > 0
}

var errEnqueue = errors.New("uplink: messages enter through the outbox, not the queue")

// Enqueue is not used: messages enter through the outbox.
func (q *outboxQueue) Enqueue(io.Reader) error { return errEnqueue }

// Peek returns the next message to send, or queue.ErrEmpty.
func (q *outboxQueue) Peek() (queue.Entry, error) {
	u := q.u
	u.mu.Lock()
	blocked := u.closing || time.Now().Before(u.pauseUntil)
	u.mu.Unlock()
	if blocked || !q.fill() {
		return nil, queue.ErrEmpty
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.buf) == 0 {
		return nil, queue.ErrEmpty
	}
	m := &u.buf[0]
	p := &pending{
		ref: storage.Ref{Route: m.Route, Seq: m.Seq},
		id:  u.opts.Source.MessageID(m.Seq),
		qos: min(m.QoS, 1),
		gen: u.gen,
	}
	u.current = p
	return &entry{u: u, p: p, msg: m}, nil
}

type entry struct {
	u   *Uplink
	p   *pending
	msg *storage.Message
}

// Reader encodes the message as the upstream PUBLISH.
func (e *entry) Reader() (io.Reader, error) {
	u, m := e.u, e.msg
	props := &packets.Properties{
		ContentType:     m.ContentType,
		ResponseTopic:   m.ResponseTopic,
		CorrelationData: m.CorrelationData,
		User:            make([]packets.User, 0, len(m.UserProps)+1),
	}
	if m.PayloadUTF8 {
		one := byte(1)
		props.PayloadFormat = &one
	}
	if !m.Expires.IsZero() {
		left := time.Until(m.Expires)
		secs := uint32(max((left+time.Second-1)/time.Second, 1))
		props.MessageExpiry = &secs
	}
	for _, p := range m.UserProps {
		props.User = append(props.User, packets.User{Key: p.Key, Value: p.Value})
	}
	props.User = append(props.User, packets.User{Key: MessageIDProperty, Value: e.p.id})
	pub := &packets.Publish{
		Topic:      u.opts.Topic(m),
		Payload:    m.Payload,
		QoS:        e.p.qos,
		Retain:     m.Retain,
		Properties: props,
	}
	var b bytes.Buffer
	if _, err := pub.WriteTo(&b); err != nil {
		return nil, err
	}
	return &b, nil
}

// Remove records that the message was handed to the session (QoS 1) or sent
// (QoS 0).
func (e *entry) Remove() error {
	u := e.u
	u.mu.Lock()
	if e.p.gen != u.gen || len(u.buf) == 0 {
		// The window was rewound while this was being sent: it is sent again.
		u.mu.Unlock()
		return nil
	}
	u.buf = u.buf[1:]
	if len(u.buf) == 0 {
		u.buf = nil
	}
	u.current = nil
	r := e.p.ref
	u.sent[r.Route] = r.Seq
	resent := r.Seq <= u.maxSent[r.Route]
	if !resent {
		u.maxSent[r.Route] = r.Seq
	}
	u.mu.Unlock()
	if resent {
		u.resent.Add(1)
	}
	if e.p.qos == 0 {
		u.acked(*e.p, 0)
	}
	return nil
}

// Leave keeps the message at the head: it was not sent.
func (e *entry) Leave() error {
	e.u.mu.Lock()
	e.u.current = nil
	e.u.mu.Unlock()
	return nil
}

// Quarantine is called when autopaho cannot parse what Reader produced,
// which is a bug. The message is skipped for this run and stays in the
// outbox.
func (e *entry) Quarantine() error {
	e.u.log.Error("uplink: could not encode message; skipped until restart", "message_id", e.p.id)
	e.u.mu.Lock()
	e.u.current = nil
	e.u.mu.Unlock()
	return e.Remove()
}

// sessionWrapper wraps paho's in-memory session state to see
// acknowledgements and lost connections.
type sessionWrapper struct {
	u     *Uplink
	inner *state.State
}

func newSession(u *Uplink) *sessionWrapper {
	return &sessionWrapper{u: u, inner: state.NewInMemory()}
}

func (s *sessionWrapper) ConAckReceived(w io.Writer, cp *packets.Connect, ca *packets.Connack) error {
	s.u.mu.Lock()
	if len(s.u.inflight) > 0 {
		s.u.rewindLocked() // ConnectionLost was not called for the previous connection
	}
	s.u.mu.Unlock()
	return s.inner.ConAckReceived(w, cp, ca)
}

func (s *sessionWrapper) ConnectionLost(dp *packets.Disconnect) error {
	err := s.inner.ConnectionLost(dp)
	s.u.mu.Lock()
	s.u.rewindLocked()
	s.u.mu.Unlock()
	return err
}

// AddToSession registers a publish of the current queue entry under its
// packet identifier, which the inner state assigns. This happens before the
// packet is written, so before its PUBACK can arrive.
func (s *sessionWrapper) AddToSession(ctx context.Context, p session.Packet, resp chan<- packets.ControlPacket) error {
	if err := s.inner.AddToSession(ctx, p, resp); err != nil {
		return err
	}
	pub, ok := p.(*packets.Publish)
	if !ok || pub.Properties == nil {
		return nil
	}
	u := s.u
	u.mu.Lock()
	defer u.mu.Unlock()
	cur := u.current
	if cur == nil || cur.gen != u.gen || !hasMessageID(pub.Properties.User, cur.id) {
		return nil // not from the queue (or from a rewound window)
	}
	if len(u.inflight) == 0 {
		u.progress = time.Now()
	}
	cur.order = u.nextOrder
	u.nextOrder++
	u.inflight[pub.PacketID] = *cur
	u.flights = append(u.flights, flight{packetID: pub.PacketID, order: cur.order})
	return nil
}

func hasMessageID(user []packets.User, id string) bool {
	for i := len(user) - 1; i >= 0; i-- {
		if user[i].Key == MessageIDProperty {
			return user[i].Value == id
		}
	}
	return false
}

// PacketReceived sees every PUBACK. The mapping is removed before the inner
// state frees the packet identifier for reuse.
func (s *sessionWrapper) PacketReceived(cp *packets.ControlPacket, ch chan<- *packets.Publish) error {
	pa, isAck := cp.Content.(*packets.Puback)
	var p pending
	var found bool
	if isAck {
		u := s.u
		u.mu.Lock()
		p, found = u.inflight[pa.PacketID]
		var skipped []pending
		if found {
			delete(u.inflight, pa.PacketID)
			u.progress = time.Now()
			skipped = u.skippedBeforeLocked(p)
			for _, q := range skipped {
				u.resendFromLocked(q.ref)
			}
		}
		u.mu.Unlock()
		if len(skipped) > 0 {
			u.skipped.Add(int64(len(skipped)))
			u.log.Warn("upstream acknowledged a later message first: resending the earlier ones",
				"skipped", len(skipped), "first_message_id", skipped[0].id)
		}
	}
	err := s.inner.PacketReceived(cp, ch)
	if found {
		s.u.acked(p, pa.ReasonCode)
	}
	return err
}

func (s *sessionWrapper) Ack(pb *packets.Publish) error   { return s.inner.Ack(pb) }
func (s *sessionWrapper) Close() error                    { return s.inner.Close() }
func (s *sessionWrapper) SetErrorLogger(l paholog.Logger) { s.inner.SetErrorLogger(l) }
func (s *sessionWrapper) SetDebugLogger(l paholog.Logger) { s.inner.SetDebugLogger(l) }
