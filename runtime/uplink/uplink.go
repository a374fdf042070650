// Package uplink forwards the outbox to an upstream MQTT 5 broker: in order,
// with a window of QoS 1 publishes bounded by the server's Receive Maximum,
// deleting a message from the outbox only when its PUBACK arrives.
//
// paho.golang's autopaho keeps the connection (reconnects with backoff,
// CONNECT, keep-alive) and encodes the packets. Outpost adds
// (docs/DECISIONS.md):
//   - a publish loop per connection that reads the outbox in batches and
//     writes each PUBLISH once, without waiting for acknowledgements; it
//     assigns the packet identifiers and bounds the window by the server's
//     Receive Maximum;
//   - a reader that takes the PUBACKs out of the stream before paho reads
//     it, so acknowledgements delete from the outbox;
//   - a wrapper around paho's session state that sees every lost
//     connection, so unacknowledged messages are resent after a reconnect;
//   - AttemptConnection, to keep the network connection so that one that is
//     up but not flowing can be cut and re-established.
package uplink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/batchconn"
	"github.com/outpost-edge/outpost/storage"
)

// Source is the part of the outbox the uplink reads. *storage.Outbox
// implements it.
type Source interface {
	Next(c storage.Cursor, max int) ([]storage.Message, error)
	Ack(refs ...storage.Ref) error
	Notify() <-chan struct{}
	MessageID(seq uint64) string
}

// MessageIDProperty is the MQTT 5 user property that carries each message's
// stable id upstream, for de-duplication by the receiver.
const MessageIDProperty = "message-id"

// Options configure an Uplink.
type Options struct {
	URL      *url.URL    // mqtt://host:port or mqtts://host:port
	TLS      *tls.Config // used for mqtts; nil = system roots
	ClientID string
	Username string
	Password []byte

	KeepAlive      time.Duration // default 30s
	ConnectTimeout time.Duration // default 10s
	// BackoffMin and BackoffMax bound the delay between reconnection
	// attempts; the delay grows exponentially with random jitter. Defaults
	// 500ms and 30s.
	BackoffMin, BackoffMax time.Duration
	// StallTimeout cuts a connection that has messages in flight but has
	// received no PUBACK for this long. Default 30s.
	StallTimeout time.Duration
	// Batch is how many messages are read from the outbox at a time.
	// Default 256.
	Batch int

	Source Source
	// Topic maps a stored message to its upstream topic.
	Topic func(m *storage.Message) string
	// UserProps appends the upstream user properties of a stored message,
	// whose message id is id, to dst. nil = the message's own properties,
	// then MessageIDProperty.
	UserProps func(dst []Property, m *storage.Message, id string) []Property
	// NoRequestProps leaves a stored message's Response Topic and
	// Correlation Data out of its upstream PUBLISH (a hub that reads
	// Correlation Data as a request's).
	NoRequestProps bool
	// NoRetain clears the retain flag upstream even when the server
	// accepts it (a hub that does not authorize retained messages).
	NoRetain bool
	// QoS0 forwards every message at QoS 0 (a hub that takes nothing
	// else): a message leaves the outbox once written to the connection.
	QoS0 bool
	// QoS1 forwards every message at QoS 1, local QoS 0 ones included (a
	// hub that answers a refused QoS 0 message with a DISCONNECT).
	QoS1 bool
	// MaxPayload, when positive, is the largest payload the upstream
	// accepts: a larger message is dropped (counted as rejected), since
	// sending it would cost the connection.
	MaxPayload int

	// Credentials, when set, builds the credentials of each CONNECT; it
	// overrides Username and Password.
	Credentials func() (Credentials, error)
	// Subscriptions are made on every connection, in one SUBSCRIBE.
	Subscriptions []Subscription
	// OnMessage receives each PUBLISH from the upstream, one at a time in
	// the order they arrive. It must not block: it hands the message on
	// and acknowledges it (Inbound.Ack) when it is done. nil = acknowledge
	// and drop.
	OnMessage func(*Inbound)
	// OnConnect is called once each connection is up and subscribed.
	OnConnect func()
	// OnConnectionDown is called when a connection is lost.
	OnConnectionDown func()
	// Refusal decides what becomes of a forwarded message the upstream
	// refused (PUBACK reason code 0x80 or above, with the PUBACK's user
	// properties). nil = drop on 0x90 (topic name invalid) and 0x99
	// (payload format invalid), retry on any other.
	Refusal func(reason byte, props []Property) Verdict
	// OnServerDisconnect is called with the reason code and user
	// properties of a DISCONNECT from the upstream.
	OnServerDisconnect func(reason byte, props []Property)

	Logger *slog.Logger // nil = discard
}

// Verdict is what becomes of a refused message.
type Verdict int

// Verdicts of Options.Refusal.
const (
	// Retry pauses (growing up to BackoffMax), reconnects, and sends the
	// message again.
	Retry Verdict = iota
	// Drop removes the message from the outbox, counted as rejected: sent
	// again, it would be refused again.
	Drop
	// RetryLater pauses as Retry does, then sends the message again on the
	// same connection: the upstream is throttling, and a reconnection would
	// only add load.
	RetryLater
)

// Stats are the uplink's counters.
type Stats struct {
	Connected  bool
	Reconnects int64 // successful connections after the first
	Forwarded  int64 // messages acknowledged upstream (QoS 0: sent)
	Resent     int64 // messages sent again after a lost connection
	Rejected   int64 // messages the upstream refused permanently (dropped)
	Refused    int64 // refusals that may pass later (the message is resent)
	Skipped    int64 // messages resent because a later one was acknowledged first
	// NoSubscribers counts messages the upstream accepted with reason 0x10
	// (no matching subscribers): delivered, and dropped there.
	NoSubscribers int64
	Stalls        int64 // connections cut because acknowledgements stopped
	Received      int64 // PUBLISHes received from the upstream
	SentDirect    int64 // QoS 0 publishes sent with Send (responses, requests)
	InFlight      int   // messages sent and not yet acknowledged
	LastError     string
}

// Uplink is the forwarding connection. Start it once; Close it when done.
type Uplink struct {
	opts Options
	log  *slog.Logger
	cm   *autopaho.ConnectionManager
	sess *sessionWrapper

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu         sync.Mutex
	sent       storage.Cursor // per route, the highest seq handed to the session
	maxSent    map[string]uint64
	win        window        // the QoS 1 publishes in flight
	gen        uint64        // incremented when the send cursor moves back
	room       chan struct{} // closed when the window is down to lowWater
	lowWater   int           // see roomLocked
	epoch      uint64        // incremented by each dial: PUBACKs of older connections are ignored
	link       *link         // the current connection's publish loop
	dialled    lockedConn    // the connection dial returned last
	wake       chan struct{} // closed when there may be something to send
	pauseUntil time.Time     // no sends before this (after a transient refusal)
	pause      time.Duration // current pause length, doubles up to BackoffMax
	progress   time.Time     // last PUBACK, or when the window became non-empty
	closing    bool

	conn atomic.Pointer[net.Conn]

	connected                                                       atomic.Bool
	connects, forwarded, resent, rejected, refused, skipped, stalls atomic.Int64
	noSubscribers, received, sentDirect                             atomic.Int64
	lastNoSubWarn                                                   atomic.Int64 // unix nanos
	lastErr                                                         atomic.Value // string
}

type pending struct {
	ref storage.Ref
	id  string // message id
	qos byte
}

// New validates opts. It does not connect; call Start.
func New(opts Options) (*Uplink, error) {
	if opts.URL == nil {
		return nil, errors.New("uplink: no URL")
	}
	switch opts.URL.Scheme {
	case "mqtt", "tcp", "mqtts", "ssl", "tls":
	default:
		return nil, fmt.Errorf("uplink: URL %q: scheme %q not supported (use mqtt:// or mqtts://)", opts.URL.Redacted(), opts.URL.Scheme)
	}
	if opts.URL.Port() == "" {
		return nil, fmt.Errorf("uplink: URL %q: no port", opts.URL.Redacted())
	}
	if opts.Source == nil || opts.Topic == nil {
		return nil, errors.New("uplink: Source and Topic are required")
	}
	if opts.ClientID == "" {
		return nil, errors.New("uplink: empty client id")
	}
	setDefault(&opts.KeepAlive, 30*time.Second)
	setDefault(&opts.ConnectTimeout, 10*time.Second)
	setDefault(&opts.BackoffMin, 500*time.Millisecond)
	setDefault(&opts.BackoffMax, 30*time.Second)
	setDefault(&opts.StallTimeout, 30*time.Second)
	if opts.Batch <= 0 {
		opts.Batch = 256
	}
	if opts.BackoffMax <= opts.BackoffMin {
		return nil, fmt.Errorf("uplink: backoff max %s must be above backoff min %s", opts.BackoffMax, opts.BackoffMin)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	u := &Uplink{
		opts:    opts,
		log:     log,
		sent:    storage.Cursor{},
		maxSent: map[string]uint64{},
	}
	u.sess = newSession(u)
	u.lastErr.Store("")
	return u, nil
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d <= 0 {
		*d = v
	}
}

// Start connects in the background and starts forwarding. It returns at once;
// the connection is retried until Close.
func (u *Uplink) Start() error {
	u.ctx, u.cancel = context.WithCancel(context.Background())
	o := u.opts
	initialMax := min(o.BackoffMin*4, o.BackoffMax)
	if initialMax <= o.BackoffMin {
		initialMax = o.BackoffMax
	}
	cfg := autopaho.ClientConfig{
		ServerUrls:                    []*url.URL{o.URL},
		TlsCfg:                        o.TLS,
		KeepAlive:                     uint16(o.KeepAlive / time.Second),
		CleanStartOnInitialConnection: true,
		SessionExpiryInterval:         0, // the outbox is the session
		ConnectTimeout:                o.ConnectTimeout,
		ReconnectBackoff:              autopaho.NewExponentialBackoff(o.BackoffMin, o.BackoffMax, initialMax, 2),
		AttemptConnection:             u.dial,
		OnConnectionUp:                u.onUp,
		OnConnectionDown:              u.onDown,
		OnConnectError:                u.onConnectError,
		ConnectUsername:               o.Username,
		ConnectPassword:               o.Password,
		ConnectPacketBuilder:          u.connectPacket,
		ClientConfig: paho.ClientConfig{
			ClientID:          o.ClientID,
			Session:           u.sess,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){u.onPublish},
			// Without a receiver paho acknowledges by itself, and no
			// ticker runs for it on an idle gateway.
			EnableManualAcknowledgment: o.OnMessage != nil,
			SendAcksInterval:           ackInterval,
			OnServerDisconnect: func(d *paho.Disconnect) {
				u.setErr(fmt.Errorf("server disconnected: reason 0x%02x %s", d.ReasonCode, reasonString(d.Properties)))
				u.log.Warn("upstream sent DISCONNECT", "reason_code", d.ReasonCode, "reason", reasonString(d.Properties))
				if u.opts.OnServerDisconnect != nil {
					var props []Property
					if d.Properties != nil {
						for _, p := range d.Properties.User {
							props = append(props, Property{Key: p.Key, Value: p.Value})
						}
					}
					u.opts.OnServerDisconnect(d.ReasonCode, props)
				}
			},
			OnClientError: func(err error) {
				u.setErr(err)
				u.log.Warn("upstream connection error", "error", err)
			},
		},
	}
	cm, err := autopaho.NewConnection(u.ctx, cfg)
	if err != nil {
		u.cancel()
		return fmt.Errorf("uplink: %w", err)
	}
	u.mu.Lock()
	u.cm = cm
	u.mu.Unlock()
	u.wg.Add(2)
	go u.notifyLoop()
	go u.watchdog()
	u.log.Info("uplink started", "url", o.URL.Redacted(), "client_id", o.ClientID)
	return nil
}

// ackInterval is how often paho sends the acknowledgements that are ready
// (in order) of received messages: a command's acknowledgement waits for
// its handler anyway.
const ackInterval = 20 * time.Millisecond

func reasonString(p *paho.DisconnectProperties) string {
	if p == nil {
		return ""
	}
	return p.ReasonString
}

// Close stops sending, waits until the messages in flight are acknowledged
// (or ctx ends), then disconnects. Unacknowledged messages stay in the outbox.
func (u *Uplink) Close(ctx context.Context) error {
	if u.cancel == nil {
		return nil
	}
	u.mu.Lock()
	if u.closing {
		u.mu.Unlock()
		return nil
	}
	u.closing = true
	u.wakeLocked()
	u.mu.Unlock()

	// Flush: wait for the acknowledgements of what is in flight.
	t := time.NewTicker(5 * time.Millisecond)
	for u.connected.Load() && u.Stats().InFlight > 0 {
		select {
		case <-ctx.Done():
			u.log.Warn("uplink closing with messages in flight; they stay in the outbox", "in_flight", u.Stats().InFlight)
		case <-t.C:
			continue
		}
		break
	}
	t.Stop()
	var err error
	if u.connected.Load() {
		if derr := u.cm.Disconnect(ctx); derr != nil && !errors.Is(derr, autopaho.ConnectionDownError) {
			err = fmt.Errorf("uplink: disconnect: %w", derr)
		}
	}
	u.cancel()
	select {
	case <-u.cm.Done():
	case <-ctx.Done():
		err = errors.Join(err, fmt.Errorf("uplink: close: %w", ctx.Err()))
	}
	u.stopLink()
	u.wg.Wait()
	return err
}

// Stats returns a snapshot of the uplink's counters.
func (u *Uplink) Stats() Stats {
	u.mu.Lock()
	inflight := u.win.len()
	u.mu.Unlock()
	return Stats{
		Connected:     u.connected.Load(),
		Reconnects:    max(u.connects.Load()-1, 0),
		Forwarded:     u.forwarded.Load(),
		Resent:        u.resent.Load(),
		Rejected:      u.rejected.Load(),
		Refused:       u.refused.Load(),
		Skipped:       u.skipped.Load(),
		NoSubscribers: u.noSubscribers.Load(),
		Stalls:        u.stalls.Load(),
		Received:      u.received.Load(),
		SentDirect:    u.sentDirect.Load(),
		InFlight:      inflight,
		LastError:     u.lastErr.Load().(string),
	}
}

// setErr keeps err for Stats, without the URL's password: paho's errors
// quote the URL whole.
func (u *Uplink) setErr(err error) { u.lastErr.Store(u.scrub(err.Error())) }

// scrub replaces the URL with its redacted form in s.
func (u *Uplink) scrub(s string) string {
	if u.opts.URL == nil || u.opts.URL.User == nil {
		return s
	}
	return strings.ReplaceAll(s, u.opts.URL.String(), u.opts.URL.Redacted())
}

// dial opens the network connection and keeps it so that the watchdog can
// cut it.
func (u *Uplink) dial(ctx context.Context, cfg autopaho.ClientConfig, target *url.URL) (net.Conn, error) {
	// The previous connection's publish loop must not write to the next one.
	u.stopLink()
	ctx, cancel := context.WithTimeout(ctx, u.opts.ConnectTimeout)
	defer cancel()
	var conn net.Conn
	var err error
	switch strings.ToLower(target.Scheme) {
	case "mqtts", "ssl", "tls":
		d := tls.Dialer{Config: cfg.TlsCfg}
		conn, err = d.DialContext(ctx, "tcp", target.Host)
	default:
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp", target.Host)
	}
	if err != nil {
		return nil, err
	}
	u.conn.Store(&conn)
	// paho writes one system call per packet; batchconn coalesces the
	// writes. paho and the publish loop hold the conn's lock (a sync.Locker)
	// across the Writes of one packet, so packets stay whole. The PUBACKs
	// are read here, the rest by paho.
	u.mu.Lock()
	u.epoch++
	epoch := u.epoch
	u.mu.Unlock()
	bc := batchconn.New(conn).(lockedConn)
	ar := newAckReader(bc, conn, func(id uint16, reason byte, props []Property) { u.puback(epoch, id, reason, props) })
	ar.pace = u.ackPace
	u.mu.Lock()
	u.dialled = bc
	u.mu.Unlock()
	return ar, nil
}

// stopLink ends the current publish loop, if any, and waits for it.
func (u *Uplink) stopLink() {
	u.mu.Lock()
	l := u.link
	u.link = nil
	u.mu.Unlock()
	if l != nil {
		l.cancel()
		<-l.done
	}
}

// lostLocked ends the publish loop of a lost connection and rewinds the
// window. u.mu must be held.
func (u *Uplink) lostLocked() {
	if u.link != nil {
		u.link.cancel() // run sees it under u.mu before registering a message
	}
	u.rewindLocked()
}

// cut closes the current network connection; autopaho then reconnects.
func (u *Uplink) cut() {
	if c := u.conn.Load(); c != nil {
		_ = (*c).Close()
	}
}

func (u *Uplink) onUp(cm *autopaho.ConnectionManager, ca *paho.Connack) {
	n := u.connects.Add(1)
	u.lastErr.Store("")
	recvMax := uint16(65535)
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil {
		recvMax = *ca.Properties.ReceiveMaximum
	}
	if recvMax == 0 {
		// A protocol error (MQTT 5 section 3.2.2.3.3); with a window of 0 nothing
		// would ever be sent.
		u.log.Warn("the upstream announced a Receive Maximum of 0 (a protocol error): using 1")
		recvMax = 1
	}
	maxPacket := uint32(0)
	if ca.Properties != nil && ca.Properties.MaximumPacketSize != nil {
		maxPacket = *ca.Properties.MaximumPacketSize
	}
	l := &link{
		maxQoS:    1,
		retain:    true,
		maxPacket: maxPacket,
		recvMax:   int(recvMax),
		done:      make(chan struct{}),
	}
	if ca.Properties != nil {
		if ca.Properties.MaximumQoS != nil {
			l.maxQoS = *ca.Properties.MaximumQoS
		}
		l.retain = ca.Properties.RetainAvailable
	}
	u.log.Info("uplink connected", "url", u.opts.URL.Redacted(), "receive_maximum", recvMax,
		"maximum_packet_size", maxPacket, "reconnects", n-1)
	u.stopLink()
	u.mu.Lock()
	if u.cm == nil && cm != nil {
		// The first connection can be up before NewConnection has returned
		// to Start: Send and Reauthenticate, which the OnConnect callback
		// may call, need the manager now.
		u.cm = cm
	}
	l.conn = u.dialled
	l.ctx, l.cancel = context.WithCancel(u.ctx)
	u.link = l
	// Connected only once the link (and its Maximum Packet Size) is in place:
	// Send checks sizes against it.
	u.connected.Store(true)
	u.wakeLocked()
	epoch := u.epoch
	u.mu.Unlock()
	go u.run(l)
	if cm != nil {
		go u.subscribe(cm, epoch)
	}
}

func (u *Uplink) onDown() bool {
	u.connected.Store(false)
	if u.opts.OnConnectionDown != nil {
		u.opts.OnConnectionDown()
	}
	u.log.Warn("uplink disconnected; storing until it returns")
	return true
}

func (u *Uplink) onConnectError(err error) {
	u.setErr(err)
	u.log.Warn("uplink connect failed", "url", u.opts.URL.Redacted(), "error", u.scrub(err.Error()))
}

// notifyLoop wakes the publish loop when the outbox receives a message.
func (u *Uplink) notifyLoop() {
	defer u.wg.Done()
	for {
		select {
		case <-u.ctx.Done():
			return
		case <-u.opts.Source.Notify():
			u.mu.Lock()
			u.wakeLocked()
			u.mu.Unlock()
		}
	}
}

// watchdog cuts a connection that is up but not flowing: messages are in
// flight and no PUBACK has arrived for StallTimeout.
func (u *Uplink) watchdog() {
	defer u.wg.Done()
	every := max(u.opts.StallTimeout/4, 10*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-u.ctx.Done():
			return
		case <-t.C:
		}
		u.mu.Lock()
		n := u.win.len()
		stalled := n > 0 && time.Since(u.progress) > u.opts.StallTimeout
		if stalled {
			u.progress = time.Now() // one cut per timeout
		}
		u.mu.Unlock()
		if stalled {
			u.stalls.Add(1)
			u.setErr(fmt.Errorf("no PUBACK for %s with %d messages in flight", u.opts.StallTimeout, n))
			u.log.Warn("uplink stalled: reconnecting", "in_flight", n, "stall_timeout", u.opts.StallTimeout)
			u.cut()
		}
	}
}

// wakeLocked releases a waiting publish loop. u.mu must be held.
func (u *Uplink) wakeLocked() {
	if u.wake != nil {
		close(u.wake)
		u.wake = nil
	}
}

// rewindLocked forgets the in-flight window after a lost connection: the
// next sends start again at the oldest unacknowledged message of each route.
// u.mu must be held.
func (u *Uplink) rewindLocked() {
	for _, p := range u.win.all() {
		u.cursorBeforeLocked(p.ref)
	}
	u.win.clear()
	u.gen++
	u.wakeLocked()
	u.freedLocked()
}

// cursorBeforeLocked moves the send cursor of r's route back to just before
// r. u.mu must be held.
func (u *Uplink) cursorBeforeLocked(r storage.Ref) {
	if s, ok := u.sent[r.Route]; ok && r.Seq <= s {
		u.sent[r.Route] = r.Seq - 1
	}
}

// resendFromLocked makes the publish loop send r again, and what follows it,
// on the current connection. u.mu must be held.
func (u *Uplink) resendFromLocked(r storage.Ref) {
	u.cursorBeforeLocked(r)
	u.gen++
	u.wakeLocked()
}

const (
	// ackPaceDelay is how long the PUBACK reader waits before reading the
	// socket again while at least ackPaceMin publishes are in flight. The
	// upstream writes each PUBACK on its own; read as they come, a drain
	// took a read system call and a reader wake-up per few PUBACKs, and the
	// agent used 20-35% more CPU per message (docs/DECISIONS.md). With that
	// many in flight, a millisecond of PUBACKs waiting in the socket does not
	// starve the window.
	ackPaceDelay = time.Millisecond
	ackPaceMin   = 64
)

// ackPace returns how long the PUBACK reader should let PUBACKs gather
// before its next read: ackPaceDelay while the window is large, else 0.
func (u *Uplink) ackPace() time.Duration {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.win.len() >= ackPaceMin {
		return ackPaceDelay
	}
	return 0
}

// puback handles a PUBACK read on the connection of the given epoch.
func (u *Uplink) puback(epoch uint64, id uint16, reason byte, props []Property) {
	u.mu.Lock()
	if epoch != u.epoch {
		// A late PUBACK of a connection that is gone: its window was
		// rewound, and id may be in use again.
		u.mu.Unlock()
		return
	}
	p, skipped, found := u.win.take(id)
	if found {
		u.progress = time.Now()
		for _, q := range skipped {
			u.resendFromLocked(q.ref)
		}
	}
	u.freedLocked()
	u.mu.Unlock()
	if !found {
		u.log.Debug("PUBACK for a packet identifier not in flight: ignored", "packet_id", id, "reason_code", reason)
		return
	}
	if len(skipped) > 0 {
		u.skipped.Add(int64(len(skipped)))
		u.log.Warn("upstream acknowledged a later message first: resending the earlier ones",
			"skipped", len(skipped), "first_message_id", skipped[0].id)
	}
	u.acked(p, reason, props)
}

// acked handles the PUBACK of p.
func (u *Uplink) acked(p pending, reason byte, props []Property) {
	verdict := Retry
	switch {
	case reason < 0x80:
	case u.opts.Refusal != nil:
		verdict = u.opts.Refusal(reason, props)
	case reason == 0x90 || reason == 0x99:
		verdict = Drop
	}
	switch {
	case reason < 0x80:
		if reason == 0x10 {
			u.noSubscribers.Add(1)
			if now := time.Now().UnixNano(); now-u.lastNoSubWarn.Load() > int64(time.Minute) {
				u.lastNoSubWarn.Store(now)
				u.log.Warn("upstream has no subscriber for forwarded messages: it accepts and drops them (PUBACK 0x10)",
					"message_id", p.id, "route", p.ref.Route, "total", u.noSubscribers.Load())
			}
		}
		if err := u.opts.Source.Ack(p.ref); err != nil {
			u.log.Error("outbox ack failed; the message will be sent again", "message_id", p.id, "error", err)
			u.mu.Lock()
			u.resendFromLocked(p.ref)
			u.mu.Unlock()
			return
		}
		u.forwarded.Add(1)
		u.mu.Lock()
		u.pause = 0
		u.mu.Unlock()
	case verdict == Drop:
		// By default topic name invalid and payload format invalid: the
		// message itself is refused, sending it again cannot succeed. Drop
		// it, loudly.
		u.rejected.Add(1)
		u.log.Error("upstream refused message permanently: dropped", "message_id", p.id, "route", p.ref.Route,
			"reason_code", reason, "properties", props)
		if err := u.opts.Source.Ack(p.ref); err != nil {
			u.log.Error("outbox ack failed", "message_id", p.id, "error", err)
		}
	default:
		// Quota exceeded, not authorized, unspecified...: may pass later.
		// Pause, reconnect, and resend from this message on.
		u.refused.Add(1)
		u.mu.Lock()
		// p left the in-flight window with its PUBACK, so the rewind after
		// the cut would not see it.
		u.resendFromLocked(p.ref)
		u.pause = min(max(u.pause*2, u.opts.BackoffMin), u.opts.BackoffMax)
		u.pauseUntil = time.Now().Add(u.pause)
		pause := u.pause
		u.mu.Unlock()
		u.setErr(fmt.Errorf("upstream refused message %s with reason 0x%02x %v", p.id, reason, props))
		u.log.Warn("upstream refused message: pausing and resending", "message_id", p.id, "reason_code", reason,
			"properties", props, "pause", pause)
		time.AfterFunc(pause, func() {
			u.mu.Lock()
			u.wakeLocked()
			u.mu.Unlock()
		})
		if verdict != RetryLater {
			u.cut()
		}
	}
}
