package uplink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/outpost-edge/outpost/storage"
)

// lockedConn is what dial returns: a batchconn, whose lock keeps one
// packet's bytes together when paho writes from another goroutine.
type lockedConn interface {
	net.Conn
	sync.Locker
}

// link is the publish loop of one connection. It starts when the
// connection is up (onUp) and ends when the connection is lost, the next
// connection is dialled, or the uplink closes.
type link struct {
	conn   lockedConn
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	maxQoS    byte   // the server's Maximum QoS
	retain    bool   // the server accepts retained messages
	maxPacket uint32 // the server's Maximum Packet Size; 0 = no limit
	recvMax   int    // the server's Receive Maximum: the largest window

	retainWarned bool // run logged that retain is not available

	// The packet being sent, reused: send encodes it before the next.
	pub   packets.Publish
	props packets.Properties
	one   byte // the payload format indicator's value
	// userProps is reused by Options.UserProps.
	userProps []Property

	// out gathers the encoded packets of a batch for one Write (flush);
	// qos0 are the QoS 0 messages in it, deleted from the outbox once
	// written.
	out  bytes.Buffer
	qos0 []pending
}

// flushAt is the size at which send writes what it has gathered without
// waiting for the end of the batch.
const flushAt = 64 << 10

// run sends the outbox, in order, until the link's context ends or a write
// fails. A QoS 1 publish waits for room in the window (the server's Receive
// Maximum), gets a free packet identifier, and is registered in u.win
// before it is written, so before its PUBACK can arrive.
func (u *Uplink) run(l *link) {
	defer close(l.done)
	var scratch bytes.Buffer
	for {
		msgs, gen, ok := u.next(l.ctx)
		if !ok {
			return
		}
		for i := range msgs {
			again, err := u.send(l, &msgs[i], gen, &scratch)
			if err == nil && (again || i == len(msgs)-1) {
				err = u.flush(l)
			}
			if err != nil {
				_ = u.flush(l) // what was gathered before the error goes out
				switch {
				case l.ctx.Err() != nil, errors.Is(err, errQoS0Only):
				case errors.Is(err, errLinkDown):
					u.cut() // make sure paho sees it too
				default:
					// The connection is up but this loop cannot go on:
					// reconnect, so that a new loop starts.
					u.setErr(err)
					u.log.Warn("uplink publish loop failed: reconnecting", "error", err)
					u.cut()
				}
				return
			}
			if again {
				break // the window was rewound: read from the cursor again
			}
		}
	}
}

// next returns the next batch to send and the window generation it was read
// at. It waits while nothing is stored, the uplink is paused or closing, and
// reports false when ctx ends.
func (u *Uplink) next(ctx context.Context) ([]storage.Message, uint64, bool) {
	for {
		u.mu.Lock()
		if ctx.Err() != nil {
			u.mu.Unlock()
			return nil, 0, false
		}
		// The wake channel exists before the read: an append after the read
		// closes it.
		if u.wake == nil {
			u.wake = make(chan struct{})
		}
		wake := u.wake
		blocked := u.closing || time.Now().Before(u.pauseUntil)
		gen := u.gen
		var cur storage.Cursor
		if !blocked {
			cur = make(storage.Cursor, len(u.sent))
			for k, v := range u.sent {
				cur[k] = v
			}
		}
		u.mu.Unlock()

		var retry <-chan time.Time
		if !blocked {
			msgs, err := u.opts.Source.Next(cur, u.opts.Batch)
			if err != nil {
				u.setErr(fmt.Errorf("outbox read: %w", err))
				u.log.Error("outbox read failed; retrying in 1s", "error", err)
				retry = time.After(time.Second)
			} else if len(msgs) > 0 {
				return msgs, gen, true
			}
		}
		select {
		case <-ctx.Done():
			return nil, 0, false
		case <-wake:
		case <-retry:
		}
	}
}

// errLinkDown wraps the errors that mean the link's connection is gone.
var errLinkDown = errors.New("connection lost")

// errQoS0Only stops a link to a server that does not accept QoS 1.
var errQoS0Only = errors.New("the upstream accepts QoS 0 only; Outpost forwards QoS 1 so that nothing is lost: messages stay stored")

// flush writes the packets gathered in l.out in one Write: one wake-up of
// the connection's writer per batch instead of one per message. A QoS 1
// packet is in the window before it is gathered, so a failed write is
// covered by the rewind of the lost connection; the QoS 0 ones are sent
// again from the first of them.
func (u *Uplink) flush(l *link) error {
	if l.out.Len() == 0 {
		return nil
	}
	l.conn.Lock()
	_, err := l.conn.Write(l.out.Bytes())
	l.conn.Unlock()
	l.out.Reset()
	qos0 := l.qos0
	l.qos0 = l.qos0[:0]
	if err != nil {
		if len(qos0) > 0 {
			u.mu.Lock()
			u.resendFromLocked(qos0[0].ref)
			u.mu.Unlock()
		}
		return fmt.Errorf("%w: write: %w", errLinkDown, err)
	}
	for _, p := range qos0 {
		u.acked(p, 0, nil)
	}
	return nil
}

// send publishes m on l. again reports that the send window was rewound
// meanwhile, so the caller must read from the cursor again; err that the
// link cannot go on.
func (u *Uplink) send(l *link, m *storage.Message, gen uint64, scratch *bytes.Buffer) (again bool, err error) {
	p := pending{
		ref: storage.Ref{Route: m.Route, Seq: m.Seq},
		id:  u.opts.Source.MessageID(m.Seq),
		qos: min(m.QoS, 1),
	}
	switch {
	case u.opts.QoS0:
		p.qos = 0
	case u.opts.QoS1:
		p.qos = 1
	}
	if p.qos > l.maxQoS {
		u.setErr(errQoS0Only)
		u.log.Error("uplink cannot forward", "error", errQoS0Only)
		return false, errQoS0Only
	}
	if m.Retain && !l.retain && !l.retainWarned {
		l.retainWarned = true
		u.log.Warn("the upstream does not support retained messages: forwarding them without the retain flag",
			"message_id", p.id, "route", p.ref.Route)
	}
	if u.opts.MaxPayload > 0 && len(m.Payload) > u.opts.MaxPayload {
		return u.drop(p, gen, "message larger than the upstream accepts: dropped",
			"payload_bytes", len(m.Payload), "max_payload", u.opts.MaxPayload)
	}
	pub := u.packet(l, m, &p)
	scratch.Reset()
	if _, err := pub.WriteTo(scratch); err != nil {
		return false, fmt.Errorf("encode: %w", err)
	}
	if l.maxPacket > 0 && scratch.Len() > int(l.maxPacket) {
		// It can never be sent to this server, and it would block its route:
		// drop it, loudly, as the server would refuse it.
		return u.drop(p, gen, "message larger than the upstream's maximum packet size: dropped",
			"packet_bytes", scratch.Len(), "max_packet_size", l.maxPacket)
	}

	u.mu.Lock()
	if p.qos == 1 {
		if err := u.roomLocked(l); err != nil {
			u.mu.Unlock()
			return false, err
		}
	}
	if l.ctx.Err() != nil {
		// The connection was lost; the window was rewound with it.
		u.mu.Unlock()
		return false, l.ctx.Err()
	}
	if gen != u.gen {
		// The window was rewound while this waited: read again.
		u.mu.Unlock()
		return true, nil
	}
	if p.qos == 1 {
		if u.win.len() == 0 {
			u.progress = time.Now()
		}
		pub.PacketID = u.win.add(p)
		setPacketID(scratch.Bytes(), len(pub.Topic), pub.PacketID)
	}
	advanced := u.advanceLocked(p.ref, gen)
	u.mu.Unlock()

	l.out.Write(scratch.Bytes())
	if p.qos == 0 {
		l.qos0 = append(l.qos0, p)
	}
	if l.out.Len() >= flushAt {
		if err := u.flush(l); err != nil {
			return false, err
		}
	}
	return !advanced, nil
}

// drop removes p from the outbox, loudly, as a message the upstream would
// refuse: it can never be sent, and it would block its route.
func (u *Uplink) drop(p pending, gen uint64, msg string, args ...any) (again bool, err error) {
	u.rejected.Add(1)
	u.log.Error(msg, append([]any{"message_id", p.id, "route", p.ref.Route}, args...)...)
	if err := u.opts.Source.Ack(p.ref); err != nil {
		u.log.Error("outbox ack failed", "message_id", p.id, "error", err)
	}
	return !u.advance(p.ref, gen), nil
}

// roomLocked waits, with u.mu held (and released meanwhile), until the
// window has room for one more QoS 1 publish on l or l ends. A full window
// waits until a quarter of it is acknowledged, so that the loop wakes once
// per burst of sends rather than once per PUBACK: with an upstream slowed
// by its subscriber, waking per PUBACK cost a fifth more of the agent's CPU
// per message (BenchmarkDrain).
func (u *Uplink) roomLocked(l *link) error {
	for (u.win.len() >= l.recvMax || u.win.span() >= idSpace) && l.ctx.Err() == nil {
		if u.room == nil {
			u.room = make(chan struct{})
		}
		u.lowWater = l.recvMax - max(1, l.recvMax/4)
		room := u.room
		u.mu.Unlock()
		// The PUBACKs that make room can only come for what was written.
		if err := u.flush(l); err != nil {
			u.mu.Lock()
			return err
		}
		select {
		case <-room:
		case <-l.ctx.Done():
		}
		u.mu.Lock()
	}
	return l.ctx.Err()
}

// freedLocked wakes a publish loop waiting for room in the window once the
// window is down to its low-water mark. u.mu must be held.
func (u *Uplink) freedLocked() {
	if u.room != nil && u.win.len() <= u.lowWater && u.win.span() < idSpace {
		close(u.room)
		u.room = nil
	}
}

// advance moves the route's send cursor past r unless the window was
// rewound since gen, and reports whether it did.
func (u *Uplink) advance(r storage.Ref, gen uint64) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.advanceLocked(r, gen)
}

// advanceLocked is advance with u.mu held.
func (u *Uplink) advanceLocked(r storage.Ref, gen uint64) bool {
	if gen != u.gen {
		return false
	}
	u.sent[r.Route] = r.Seq
	if r.Seq <= u.maxSent[r.Route] {
		u.resent.Add(1)
	} else {
		u.maxSent[r.Route] = r.Seq
	}
	return true
}

// packet builds the upstream PUBLISH of m in l's reused packet.
func (u *Uplink) packet(l *link, m *storage.Message, p *pending) *packets.Publish {
	props := &l.props
	*props = packets.Properties{
		ContentType: m.ContentType,
		User:        props.User[:0],
	}
	if !u.opts.NoRequestProps {
		props.ResponseTopic, props.CorrelationData = m.ResponseTopic, m.CorrelationData
	}
	if m.PayloadUTF8 {
		l.one = 1
		props.PayloadFormat = &l.one
	}
	if !m.Expires.IsZero() {
		left := time.Until(m.Expires)
		secs := uint32(max((left+time.Second-1)/time.Second, 1))
		props.MessageExpiry = &secs
	}
	if u.opts.UserProps != nil {
		l.userProps = u.opts.UserProps(l.userProps[:0], m, p.id)
		for _, up := range l.userProps {
			props.User = append(props.User, packets.User{Key: up.Key, Value: up.Value})
		}
	} else {
		for _, up := range m.UserProps {
			props.User = append(props.User, packets.User{Key: up.Key, Value: up.Value})
		}
		props.User = append(props.User, packets.User{Key: MessageIDProperty, Value: p.id})
	}
	l.pub = packets.Publish{
		Topic:      u.opts.Topic(m),
		Payload:    m.Payload,
		QoS:        p.qos,
		Retain:     m.Retain && l.retain && !u.opts.NoRetain,
		Properties: props,
	}
	return &l.pub
}

// setPacketID writes id into an encoded QoS 1 PUBLISH whose topic is
// topicLen bytes long. The packet is encoded before paho's session assigns
// the identifier, so that its size can be checked first; the identifier is
// fixed-size, so the encoding is otherwise the same. After the fixed header
// (one byte, then the remaining length as a variable byte integer) comes the
// topic (two length bytes, then the topic), then the identifier, big-endian.
func setPacketID(b []byte, topicLen int, id uint16) {
	i := 1
	for b[i]&0x80 != 0 {
		i++
	}
	i += 1 + 2 + topicLen
	b[i], b[i+1] = byte(id>>8), byte(id)
}
