package uplink

import (
	"context"
	"errors"
	"io"
	"sync"

	"github.com/eclipse/paho.golang/packets"
	paholog "github.com/eclipse/paho.golang/paho/log"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"
	"github.com/eclipse/paho.golang/paho/store/memory"
)

var _ session.SessionManager = (*sessionWrapper)(nil)

// sessionWrapper wraps paho's session state to see lost connections, which
// rewind the window. The forwarded publishes do not enter the state: the
// publish loop assigns their packet identifiers, and ackReader takes their
// PUBACKs out of the stream.
type sessionWrapper struct {
	u     *Uplink
	inner *state.State

	mu      sync.Mutex
	w       io.Writer           // the connection paho writes to
	replies map[uint16]ackReply // chosen PUBACKs of received messages, by packet identifier
}

func newSession(u *Uplink) *sessionWrapper {
	// The client side keeps no copy of the packets: the session ends with
	// the connection (expiry 0), and after a reconnect the outbox, not the
	// session, resends. The server side keeps paho's memory store.
	return &sessionWrapper{u: u, inner: state.New(discardStore{}, memory.New())}
}

func (s *sessionWrapper) ConAckReceived(w io.Writer, cp *packets.Connect, ca *packets.Connack) error {
	s.mu.Lock()
	s.w, s.replies = w, nil
	s.mu.Unlock()
	s.u.mu.Lock()
	s.u.lostLocked() // in case ConnectionLost was not called for the previous connection
	s.u.mu.Unlock()
	return s.inner.ConAckReceived(w, cp, ca)
}

func (s *sessionWrapper) ConnectionLost(dp *packets.Disconnect) error {
	err := s.inner.ConnectionLost(dp)
	s.mu.Lock()
	s.w, s.replies = nil, nil
	s.mu.Unlock()
	s.u.mu.Lock()
	s.u.lostLocked()
	s.u.mu.Unlock()
	return err
}

// errPahoPublish refuses a QoS 1 or 2 publish made through paho: ackReader
// takes every PUBACK out of the stream, so paho would never see its
// acknowledgement, and paho's packet identifiers could collide with the
// publish loop's. Everything sent upstream goes through the outbox.
var errPahoPublish = errors.New("uplink: QoS 1 and 2 publishes go through the outbox, not through paho")

// AddToSession passes SUBSCRIBE and UNSUBSCRIBE through to paho's session
// and refuses publishes (errPahoPublish).
func (s *sessionWrapper) AddToSession(ctx context.Context, p session.Packet, resp chan<- packets.ControlPacket) error {
	if p.Type() == packets.PUBLISH {
		return errPahoPublish
	}
	return s.inner.AddToSession(ctx, p, resp)
}

// PacketReceived passes through: the forwarded publishes' PUBACKs never
// reach it (see ackReader).
func (s *sessionWrapper) PacketReceived(cp *packets.ControlPacket, ch chan<- *packets.Publish) error {
	return s.inner.PacketReceived(cp, ch)
}

func (s *sessionWrapper) Close() error                    { return s.inner.Close() }
func (s *sessionWrapper) SetErrorLogger(l paholog.Logger) { s.inner.SetErrorLogger(l) }
func (s *sessionWrapper) SetDebugLogger(l paholog.Logger) { s.inner.SetDebugLogger(l) }

// discardStore is the client side of the session store: it keeps nothing.
// paho's memory store would encode every publish a second time to keep a
// copy that is only used to resume a session, which Outpost never does.
type discardStore struct{}

var errNotKept = errors.New("uplink: session packets are not kept")

func (discardStore) Put(uint16, byte, io.WriterTo) error { return nil }
func (discardStore) Get(uint16) (io.ReadCloser, error)   { return nil, errNotKept }
func (discardStore) Delete(uint16) error                 { return nil }
func (discardStore) Quarantine(uint16) error             { return nil }
func (discardStore) List() ([]uint16, error)             { return nil, nil }
func (discardStore) Reset() error                        { return nil }
