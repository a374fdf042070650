package uplink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"sync"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/storage"
)

// Property is an MQTT 5 user property.
type Property = storage.Property

// Subscription is a topic filter the uplink subscribes to on every
// connection.
type Subscription struct {
	Filter string
	QoS    byte
}

// Credentials go in a CONNECT (and in an AUTH that re-authenticates). The
// dialect builds them for each connection attempt, so credentials with a
// lifetime (a SAS signature) are always fresh.
type Credentials struct {
	Username   string
	Password   []byte
	AuthMethod string // MQTT 5 Authentication Method; "" = none
	AuthData   []byte
	UserProps  []Property
}

// Inbound is a PUBLISH received from the upstream. Its fields belong to
// the receiver.
type Inbound struct {
	Topic           string
	Payload         []byte
	QoS             byte
	Dup             bool
	ContentType     string
	ResponseTopic   string
	CorrelationData []byte
	Expiry          uint32 // Message Expiry Interval in seconds; 0 = none
	UserProps       []Property

	u      *Uplink
	client *paho.Client
	pub    *paho.Publish
	epoch  uint64
	once   sync.Once
}

// Prop returns the value of the first user property named key, or "".
func (m *Inbound) Prop(key string) string {
	for _, p := range m.UserProps {
		if p.Key == key {
			return p.Value
		}
	}
	return ""
}

// ErrLost is returned by Ack for a message of a connection that is gone
// (the upstream sends it again), and by Send while the uplink is down.
var ErrLost = errors.New("uplink: not connected")

// Ack acknowledges a QoS 1 message with a PUBACK carrying reason (0 =
// success) and props; for QoS 0 it does nothing. Acknowledgements go out
// in the order the messages arrived (MQTT 5 section 4.6.0), so a message
// not yet acknowledged holds back those that came after it: every QoS 1
// message must be acknowledged. Only the first call counts. A message of a
// lost connection is not acknowledged (ErrLost): the upstream sends it
// again.
func (m *Inbound) Ack(reason byte, props ...Property) error {
	if m.QoS == 0 || m.client == nil {
		return nil
	}
	err := errors.New("uplink: acknowledged already")
	m.once.Do(func() { err = m.u.sess.ack(m.client, m.pub, m.epoch, reason, props) })
	return err
}

// onPublish hands a PUBLISH from paho to Options.OnMessage.
func (u *Uplink) onPublish(pr paho.PublishReceived) (bool, error) {
	p := pr.Packet
	m := &Inbound{Topic: p.Topic, Payload: p.Payload, QoS: p.QoS, Dup: p.Duplicate(), u: u, client: pr.Client, pub: p}
	if pp := p.Properties; pp != nil {
		m.ContentType, m.ResponseTopic, m.CorrelationData = pp.ContentType, pp.ResponseTopic, pp.CorrelationData
		if pp.MessageExpiry != nil {
			m.Expiry = *pp.MessageExpiry
		}
		if len(pp.User) > 0 {
			m.UserProps = make([]Property, len(pp.User))
			for i, up := range pp.User {
				m.UserProps[i] = Property{Key: up.Key, Value: up.Value}
			}
		}
	}
	u.mu.Lock()
	m.epoch = u.epoch
	u.mu.Unlock()
	u.received.Add(1)
	if u.opts.OnMessage == nil {
		return true, nil // paho acknowledges it (manual acknowledgement is off)
	}
	u.opts.OnMessage(m)
	return true, nil
}

// ackReply is the PUBACK chosen for one received QoS 1 message.
type ackReply struct {
	reason byte
	props  []Property
}

// ack records the reply for pub and hands pub to paho, which sends the
// acknowledgements in order through sessionWrapper.Ack.
func (s *sessionWrapper) ack(c *paho.Client, pub *paho.Publish, epoch uint64, reason byte, props []Property) error {
	// s.mu is held from the check to the write: a new connection's
	// ConAckReceived clears the replies under it, after dial moved the
	// epoch, so a reply of a lost connection never lands in the next
	// one's.
	s.mu.Lock()
	s.u.mu.Lock()
	current := epoch == s.u.epoch
	s.u.mu.Unlock()
	if !current {
		s.mu.Unlock()
		return ErrLost
	}
	if reason != 0 || len(props) > 0 {
		if s.replies == nil {
			s.replies = map[uint16]ackReply{}
		}
		s.replies[pub.PacketID] = ackReply{reason, props}
	}
	s.mu.Unlock()
	if err := c.Ack(pub); err != nil {
		return fmt.Errorf("uplink: ack: %w", err)
	}
	return nil
}

// Ack sends the acknowledgement of a received PUBLISH: paho's, unless a
// reason code or properties were chosen for it (paho's session sends
// neither).
func (s *sessionWrapper) Ack(pb *packets.Publish) error {
	s.mu.Lock()
	r, ok := s.replies[pb.PacketID]
	delete(s.replies, pb.PacketID)
	w := s.w
	s.mu.Unlock()
	if !ok || pb.QoS != 1 || w == nil {
		return s.inner.Ack(pb)
	}
	pa := packets.Puback{PacketID: pb.PacketID, ReasonCode: r.reason, Properties: &packets.Properties{}}
	for _, p := range r.props {
		pa.Properties.User = append(pa.Properties.User, packets.User{Key: p.Key, Value: p.Value})
	}
	var b bytes.Buffer
	if _, err := pa.WriteTo(&b); err != nil {
		return err
	}
	_, err := w.Write(b.Bytes()) // one Write: the packet stays whole
	return err
}

// subscribe makes the configured subscriptions on a new connection, then
// reports the connection to Options.OnConnect.
func (u *Uplink) subscribe(cm *autopaho.ConnectionManager, epoch uint64) {
	if len(u.opts.Subscriptions) > 0 {
		s := &paho.Subscribe{Subscriptions: make([]paho.SubscribeOptions, len(u.opts.Subscriptions))}
		for i, sub := range u.opts.Subscriptions {
			s.Subscriptions[i] = paho.SubscribeOptions{Topic: sub.Filter, QoS: sub.QoS}
		}
		ctx, cancel := context.WithTimeout(u.ctx, u.opts.ConnectTimeout)
		sa, err := cm.Subscribe(ctx, s)
		cancel()
		if err != nil {
			u.setErr(fmt.Errorf("subscribe: %w", err))
			u.log.Warn("upstream subscribe failed: reconnecting", "error", err)
			u.cut()
			return
		}
		for i, code := range sa.Reasons {
			if code >= 0x80 && i < len(s.Subscriptions) {
				u.setErr(fmt.Errorf("subscribe %q refused: reason 0x%02x", s.Subscriptions[i].Topic, code))
				u.log.Error("upstream refused a subscription: its requests will not arrive",
					"filter", s.Subscriptions[i].Topic, "reason_code", code)
			}
		}
	}
	u.mu.Lock()
	current := epoch == u.epoch
	u.mu.Unlock()
	if current && u.opts.OnConnect != nil {
		u.opts.OnConnect()
	}
}

// Outbound is a QoS 0 PUBLISH sent directly, not through the outbox: a
// response, or a request that is answered (and retried by its sender).
type Outbound struct {
	Topic           string
	Payload         []byte
	ContentType     string
	CorrelationData []byte
	UserProps       []Property
}

// ErrTooLarge is returned by Send for a packet over the upstream's
// Maximum Packet Size (or Options.MaxPayload): sent, it would cost the
// connection.
var ErrTooLarge = errors.New("uplink: packet too large for the upstream")

// Send publishes o at QoS 0 on the current connection. It fails with
// ErrLost while the uplink is down, and with ErrTooLarge, before sending,
// when the upstream would refuse the packet.
func (u *Uplink) Send(ctx context.Context, o Outbound) error {
	cm := u.manager()
	if cm == nil || !u.connected.Load() {
		return ErrLost
	}
	if u.opts.MaxPayload > 0 && len(o.Payload) > u.opts.MaxPayload {
		return fmt.Errorf("%w: a payload of %d bytes (limit %d)", ErrTooLarge, len(o.Payload), u.opts.MaxPayload)
	}
	p := &paho.Publish{Topic: o.Topic, Payload: o.Payload, Properties: &paho.PublishProperties{
		ContentType: o.ContentType, CorrelationData: o.CorrelationData}}
	for _, up := range o.UserProps {
		p.Properties.User = append(p.Properties.User, paho.UserProperty{Key: up.Key, Value: up.Value})
	}
	lim, up := u.maxPacket()
	if !up {
		return ErrLost
	}
	if lim > 0 {
		var b bytes.Buffer
		if _, err := p.Packet().WriteTo(&b); err != nil {
			return fmt.Errorf("uplink: send %q: %w", o.Topic, err)
		}
		if b.Len() > int(lim) {
			return fmt.Errorf("%w: %d bytes (Maximum Packet Size %d)", ErrTooLarge, b.Len(), lim)
		}
	}
	if _, err := cm.Publish(ctx, p); err != nil {
		if errors.Is(err, autopaho.ConnectionDownError) {
			return ErrLost
		}
		return fmt.Errorf("uplink: send %q: %w", o.Topic, err)
	}
	u.sentDirect.Add(1)
	return nil
}

// manager is the connection manager; nil before Start.
func (u *Uplink) manager() *autopaho.ConnectionManager {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.cm
}

// maxPacket is the current connection's Maximum Packet Size (0 = none),
// and false when there is no connection.
func (u *Uplink) maxPacket() (uint32, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.link == nil {
		return 0, false
	}
	return u.link.maxPacket, true
}

// ReauthError is a re-authentication the upstream refused.
type ReauthError struct {
	Reason byte
	Props  []Property
}

func (e *ReauthError) Error() string {
	return fmt.Sprintf("uplink: re-authentication refused: reason 0x%02x", e.Reason)
}

// Reauthenticate sends an AUTH packet (reason 0x19, Re-authenticate) with c's
// method, data and properties, and waits for the upstream's answer. A
// refusal is a *ReauthError (the upstream then usually disconnects).
func (u *Uplink) Reauthenticate(ctx context.Context, c Credentials) error {
	cm := u.manager()
	if cm == nil || !u.connected.Load() {
		return ErrLost
	}
	a := &paho.Auth{ReasonCode: 0x19, Properties: &paho.AuthProperties{AuthMethod: c.AuthMethod, AuthData: c.AuthData}}
	for _, p := range c.UserProps {
		a.Properties.User = append(a.Properties.User, paho.UserProperty{Key: p.Key, Value: p.Value})
	}
	resp, err := cm.Authenticate(ctx, a)
	if err != nil {
		return fmt.Errorf("uplink: re-authenticate: %w", err)
	}
	if !resp.Success {
		e := &ReauthError{Reason: resp.ReasonCode}
		if resp.Properties != nil {
			for _, p := range resp.Properties.User {
				e.Props = append(e.Props, Property{Key: p.Key, Value: p.Value})
			}
		}
		return e
	}
	return nil
}

// connectPacket puts the dialect's credentials in a CONNECT.
func (u *Uplink) connectPacket(cp *paho.Connect, _ *url.URL) (*paho.Connect, error) {
	if u.opts.Credentials == nil {
		return cp, nil
	}
	c, err := u.opts.Credentials()
	if err != nil {
		return nil, fmt.Errorf("uplink: credentials: %w", err)
	}
	cp.Username, cp.UsernameFlag = c.Username, c.Username != ""
	cp.Password, cp.PasswordFlag = c.Password, c.Password != nil
	if cp.Properties == nil {
		cp.Properties = &paho.ConnectProperties{}
	}
	// paho sends Request Problem Information = 0 for a false
	// RequestProblemInfo; the upstream would then leave the reason
	// properties (Azure's status) out of its acknowledgements.
	cp.Properties.RequestProblemInfo = true
	cp.Properties.AuthMethod, cp.Properties.AuthData = c.AuthMethod, c.AuthData
	for _, p := range c.UserProps {
		cp.Properties.User = append(cp.Properties.User, paho.UserProperty{Key: p.Key, Value: p.Value})
	}
	return cp, nil
}
