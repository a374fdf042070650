// Package broker embeds the local MQTT broker (mochi-mqtt: MQTT 3.1.1 and 5
// over TCP or TLS) that plant devices and apps connect to, with a durable
// ingest hook: a PUBLISH that matches a route is stored before it is
// acknowledged. Clients authenticate with a username and a hashed password
// (or connect anonymously where a listener allows it), are held to per-user
// ACLs and to a publish rate, and password guessing is slowed
// (docs/SECURITY.md).
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	goruntime "runtime"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/outpost-edge/outpost/internal/batchconn"
	"github.com/outpost-edge/outpost/runtime/router"
	"github.com/outpost-edge/outpost/storage"
)

// Listener is one TCP listener of the local broker.
type Listener struct {
	// Address is host:port; port 0 picks a free port (see Broker.Addrs).
	Address string
	// AllowAnonymous admits clients without credentials on a listener that
	// is not bound to a loopback address. Loopback listeners always admit
	// anonymous clients.
	AllowAnonymous bool
	// TLS, when set, makes this a TLS listener.
	TLS *TLS
}

// User is an account of the local broker.
type User struct {
	// Username is what the client sends in CONNECT; unique, without '/',
	// '+' or '#' (it may be substituted into ACL filters).
	Username string
	// PasswordHash is a bcrypt or argon2id hash (see CheckHash).
	PasswordHash string
	// ACL is what the user may do besides Options.UserACL; nothing else is
	// allowed.
	ACL ACL
}

// Options configure a Broker.
type Options struct {
	Listeners []Listener
	// Users are the accounts clients log in with. A client that sends a
	// username or password must match one (on any listener); when there are
	// no users, credentials are ignored and clients are anonymous.
	Users []User
	// UserACL applies to every user, in addition to the user's own ACL:
	// typically patterns with %u such as devices/%u/#.
	UserACL ACL
	// AnonymousACL, when set, limits anonymous clients; nil lets them
	// publish and subscribe to anything.
	AnonymousACL *ACL
	// MaxClients bounds the connected clients; more are refused (CONNACK
	// 0x89 Server busy, MQTT 3.1.1 0x03 Server unavailable). 0 = no limit.
	MaxClients int
	// RateLimit bounds each client's publishes.
	RateLimit RateLimit
	// AuthBackoff slows password guessing.
	AuthBackoff AuthBackoff
	// MaxPacketSize is the largest MQTT packet accepted from a client, in
	// bytes, announced in CONNACK; larger packets close the connection with
	// reason 0x95 (Packet too large). 0 = no limit.
	MaxPacketSize uint32
	// Route returns the outbox route of a topic, or false to keep the
	// message local.
	Route func(topic string) (route string, ok bool)
	// Store queues m to be stored durably and calls done, once, when it is
	// (or failed); see storage.Outbox.AppendAsync. It is called on the
	// client's connection goroutine. An error means m was refused at once
	// (storage.ErrFull: the store is full) and done is not called.
	Store  func(m *storage.Message, done func(seq uint64, err error)) error
	Logger *slog.Logger // nil = discard

	// now and sleep replace the clock in tests; verifyWait the wait for a
	// password check slot.
	now        func() time.Time
	sleep      func(d time.Duration, done <-chan struct{})
	verifyWait time.Duration
}

// Stats are the broker's counters.
type Stats struct {
	Clients  int   // clients connected now
	Stored   int64 // publishes stored in the outbox
	Refused  int64 // publishes refused because the outbox was full
	Failed   int64 // publishes refused because the store failed
	Local    int64 // publishes that matched no route (delivered locally only)
	Listener []string

	AuthFailures int64 // logins refused for a wrong username or password
	AuthLocked   int64 // logins refused because their address was locked out
	Anonymous    int64 // anonymous logins refused (listener does not allow them)
	Busy         int64 // logins refused because max_clients were connected or no password check could start within 2s
	ACLDenied    int64 // publishes, subscriptions and deliveries the ACL refused
	RateLimited  int64 // publishes over a client's rate limit
	TLSFailures  int64 // TLS handshakes that failed (e.g. no client certificate)
}

// Broker is the embedded local MQTT broker. Its methods are safe for
// concurrent use. Close it when done.
type Broker struct {
	srv   *mqtt.Server
	log   *slog.Logger
	addrs []string
	hook  *ingestHook

	closeOnce sync.Once
}

// maxSessionExpiry caps the session expiry interval a client may ask for,
// in seconds (mochi grants up to 136 years), and is the expiry of an MQTT
// 3.1.1 persistent session.
const maxSessionExpiry = 7 * 24 * 60 * 60

// New binds the listeners and returns a broker that is not yet serving; call
// Start. Binding happens here so that Addrs is known before Start.
func New(opts Options) (*Broker, error) {
	if len(opts.Listeners) == 0 {
		return nil, errors.New("broker: no listener configured")
	}
	if opts.Route == nil || opts.Store == nil {
		return nil, errors.New("broker: Route and Store are required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	if opts.sleep == nil {
		opts.sleep = sleep
	}
	if opts.verifyWait == 0 {
		opts.verifyWait = verifyWait
	}
	verifySlots := max(1, min(4, goruntime.GOMAXPROCS(0)))
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = opts.MaxPacketSize
	caps.MaximumSessionExpiryInterval = maxSessionExpiry
	if opts.MaxClients > 0 {
		caps.MaximumClients = int64(opts.MaxClients)
	}
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true,
		Logger:       log,
	})

	h := &ingestHook{
		srv:       srv,
		maxPacket: opts.MaxPacketSize,
		route:     opts.Route,
		store:     opts.Store,
		log:       log,
		anonymous: map[string]bool{},
		rate:      opts.RateLimit,
		guard:     newAuthGuard(opts.AuthBackoff, opts.now),
		now:       opts.now,
		sleep:     opts.sleep,
		done:      make(chan struct{}),
		verifying: make(chan struct{}, verifySlots),
		// argon2id checks take up to 64 MiB each: half the slots.
		argonSlots: make(chan struct{}, max(1, verifySlots/2)),
		verifyWait: opts.verifyWait,
	}
	c, err := compileCreds(opts.Users, opts.UserACL, opts.AnonymousACL)
	if err != nil {
		return nil, err
	}
	h.creds.Store(c)
	if err := srv.AddHook(h, nil); err != nil {
		return nil, fmt.Errorf("broker: add ingest hook: %w", err)
	}

	b := &Broker{srv: srv, log: log, hook: h}
	for i, l := range opts.Listeners {
		id := fmt.Sprintf("tcp%d", i)
		loopback, err := isLoopback(l.Address)
		if err != nil {
			_ = srv.Close()
			return nil, fmt.Errorf("broker: listener %q: %w", l.Address, err)
		}
		h.anonymous[id] = loopback || l.AllowAnonymous
		cfg := listeners.Config{ID: id, Address: l.Address}
		if l.TLS != nil {
			if cfg.TLSConfig, err = l.TLS.config(); err != nil {
				_ = srv.Close()
				return nil, fmt.Errorf("broker: listener %q: tls: %w", l.Address, err)
			}
		}
		tcp := &batchedTCP{TCP: listeners.NewTCP(cfg), srv: srv, log: log, hook: h}
		if err := srv.AddListener(tcp); err != nil {
			_ = srv.Close()
			return nil, fmt.Errorf("broker: listen on %s: %w", l.Address, err)
		}
		b.addrs = append(b.addrs, tcp.Address())
		warnListener(log, tcp.Address(), l, loopback, len(h.creds.Load().users) > 0)
	}
	return b, nil
}

// warnListener says what a listener's settings mean when they are risky or
// will refuse everyone.
func warnListener(log *slog.Logger, addr string, l Listener, loopback, users bool) {
	switch {
	case loopback:
	case l.AllowAnonymous:
		log.Warn("listener is not on loopback and allow_anonymous is on: anyone who reaches it can connect without credentials",
			"listener", addr)
	case !users:
		log.Warn("listener is not on loopback, anonymous access is off and no broker users are configured: every client is refused",
			"listener", addr)
	}
	if !loopback && users && l.TLS == nil {
		log.Warn("listener is not on loopback and has no TLS: passwords cross the network in the clear (set cert_file and key_file)",
			"listener", addr)
	}
}

// sleep waits d, or until done is closed.
func sleep(d time.Duration, done <-chan struct{}) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-done:
	}
}

// Start serves the listeners in the background.
func (b *Broker) Start() error {
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("broker: serve: %w", err)
	}
	for _, a := range b.addrs {
		b.log.Info("local broker listening", "address", a)
	}
	return nil
}

// Addrs returns the bound address of each listener, in configuration order.
func (b *Broker) Addrs() []string { return append([]string(nil), b.addrs...) }

// Stored is the count of publishes stored in the outbox (Stats.Stored),
// without the walk over the clients that Stats makes.
func (b *Broker) Stored() int64 { return b.hook.stored.Load() }

// Stats returns a snapshot of the broker's counters.
func (b *Broker) Stats() Stats {
	connected := 0
	for id, cl := range b.srv.Clients.GetAll() {
		// The inline client is the broker's own; a client whose session
		// outlives its connection is not connected.
		if id != mqtt.InlineClientId && !cl.Closed() {
			connected++
		}
	}
	h := b.hook
	return Stats{
		Clients:      connected,
		Stored:       h.stored.Load(),
		Refused:      h.refused.Load(),
		Failed:       h.failed.Load(),
		Local:        h.local.Load(),
		Listener:     b.Addrs(),
		AuthFailures: h.authFailures.Load(),
		AuthLocked:   h.authLocked.Load(),
		Anonymous:    h.anonRefused.Load(),
		Busy:         h.busy.Load(),
		ACLDenied:    h.aclDenied.Load(),
		RateLimited:  h.rateLimited.Load(),
		TLSFailures:  h.tlsFailures.Load(),
	}
}

// Close stops accepting connections and disconnects every client. It is
// idempotent.
func (b *Broker) Close() error {
	var err error
	b.closeOnce.Do(func() {
		close(b.hook.done)
		if cerr := b.srv.Close(); cerr != nil {
			err = fmt.Errorf("broker: close: %w", cerr)
		}
	})
	return err
}

// batchedTCP is mochi's TCP listener with coalesced writes on every client
// connection: mochi writes each PUBACK with its own system call, which was
// the largest cost of ingest in a profile (docs/DECISIONS.md).
type batchedTCP struct {
	*listeners.TCP
	srv  *mqtt.Server
	log  *slog.Logger
	hook *ingestHook
}

// handshakeTimeout bounds a client's TLS handshake.
const handshakeTimeout = 10 * time.Second

// Close stops the listener and disconnects its clients (DISCONNECT 0x8B,
// server shutting down). It does what mochi's own closer does without
// Clients.GetByListener, which takes the clients' read lock twice: a client
// leaving in between queues for the write lock and the broker deadlocks
// (mochi-mqtt/server#488, still in v2.7.9).
func (l *batchedTCP) Close(listeners.CloseFn) {
	l.TCP.Close(func(id string) {
		for _, cl := range l.srv.Clients.GetAll() {
			if cl.Net.Listener == id && !cl.Closed() {
				_ = l.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
			}
		}
	})
}

// Serve wraps each accepted connection before mochi takes it. On a TLS
// listener it completes the handshake first, within handshakeTimeout, so
// that a client refused by TLS (no or a bad client certificate) is counted
// and logged as such.
// A client that closes its socket without DISCONNECT (most command-line
// clients do) ends with io.EOF; mochi would log that as a warning with no
// message, for every such client. It is logged here at debug level, and
// other errors with a message.
func (l *batchedTCP) Serve(establish listeners.EstablishFn) {
	l.TCP.Serve(func(id string, c net.Conn) error {
		remote := c.RemoteAddr().String()
		if tc, ok := c.(*tls.Conn); ok {
			ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
			err := tc.HandshakeContext(ctx)
			cancel()
			if err != nil {
				l.hook.tlsFailures.Add(1)
				if every(&l.hook.lastTLSWarn, 10*time.Second) {
					l.log.Warn("TLS handshake failed (logged once per 10s)", "remote", remote, "listener", id,
						"tls_failures_total", l.hook.tlsFailures.Load(), "error", err)
				}
				_ = c.Close()
				return nil
			}
		}
		err := establish(id, batchconn.New(c))
		switch {
		case err == nil:
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
			l.log.Debug("client connection closed", "remote", remote, "listener", id, "error", err)
		case errors.Is(err, packets.ErrBadUsernameOrPassword):
			// Refused by the hook, which logged why.
		case errors.Is(err, packets.ErrServerBusy):
			l.hook.busy.Add(1)
			if every(&l.hook.lastBusyWarn, 10*time.Second) {
				l.log.Warn("broker.max_clients are connected: refusing new clients (logged once per 10s)",
					"remote", remote, "listener", id, "refused_total", l.hook.busy.Load())
			}
		default:
			l.log.Warn("client connection ended with an error", "remote", remote, "listener", id, "error", err)
		}
		return nil
	})
}

// every reports whether d has passed since the time in last (unix nanos),
// and if so sets last to now; it lets one of many callers log.
func every(last *atomic.Int64, d time.Duration) bool {
	now := time.Now().UnixNano()
	l := last.Load()
	return now-l >= int64(d) && last.CompareAndSwap(l, now)
}

// ingestHook stores routed publishes before their acknowledgement reaches
// the publisher. mochi calls OnPublish on the client's read goroutine and
// writes the PUBACK after it returns; OnPublish queues the write to the
// store and holds the client's connection (batchconn.Holder) so that the
// PUBACK, and everything written after it, leaves only once the message is
// stored. The read goroutine goes on meanwhile, so the publishes a client
// has in flight are stored together in one write (docs/DECISIONS.md).
//
// It also authenticates clients, applies the ACLs and the rate limit
// (security.go): mochi admits a client when any hook does, so one hook
// decides.
type ingestHook struct {
	mqtt.HookBase
	srv       *mqtt.Server
	maxPacket uint32
	route     func(string) (string, bool)
	store     func(*storage.Message, func(uint64, error)) error
	log       *slog.Logger
	anonymous map[string]bool // listener id -> anonymous allowed; read-only after New
	// requests matches the filters served by HandleRequests: never stored.
	// Set before Start, read-only after.
	requestFilters []string
	requests       *router.Router

	creds atomic.Pointer[creds] // the users and ACLs: replaced by SetUsers

	// Read-only after New.
	rate       RateLimit
	guard      *authGuard
	now        func() time.Time
	sleep      func(time.Duration, <-chan struct{})
	done       chan struct{} // closed by Close: delayed refusals end
	verifying  chan struct{} // bounds concurrent password verifications
	argonSlots chan struct{} // bounds concurrent argon2id verifications
	verifyWait time.Duration // bounds the wait for a verification slot
	buckets    sync.Map      // *mqtt.Client -> *bucket
	refusals   sync.Map      // *mqtt.Client -> packets.Code for its CONNACK

	stored, refused, failed, local atomic.Int64
	lastWarn                       atomic.Int64 // unix nanos of the last "full" warning

	authFailures, authLocked, anonRefused, busy, aclDenied, rateLimited, tlsFailures atomic.Int64
	checks                                                                           atomic.Int64 // password verifications
	lastTLSWarn, lastBusyWarn, lastACLWarn, lastRateWarn                             atomic.Int64
}

func (h *ingestHook) ID() string { return "outpost-ingest" }

func (h *ingestHook) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck ||
		b == mqtt.OnPacketEncode || b == mqtt.OnDisconnect
}

// OnPacketEncode announces the maximum packet size in CONNACK to MQTT 5
// clients [MQTT-3.2.2.3.6], which mochi enforces but does not announce.
// It also gives a refused client the CONNACK reason the hook chose
// (refuse), which mochi cannot express: it answers every failed
// authentication with 0x86, or 0x05 to MQTT 3.1.1.
func (h *ingestHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Connack {
		return pk
	}
	if h.maxPacket > 0 && cl.Properties.ProtocolVersion == 5 {
		pk.Properties.MaximumPacketSize = h.maxPacket
	}
	if v, ok := h.refusals.LoadAndDelete(cl); ok {
		code := v.(packets.Code)
		if cl.Properties.ProtocolVersion < 5 {
			// A refusal without a 3.1.1 equivalent is "not authorized",
			// never 0x00 (accepted).
			v3, ok := v3Refusal[code.Code]
			if !ok {
				v3 = 0x05
			}
			pk.ReasonCode = v3
		} else {
			pk.ReasonCode, pk.Properties.ReasonString = code.Code, code.Reason
		}
	}
	return pk
}

// OnDisconnect says why a client that sent an oversized packet was cut off:
// mochi closes such connections without a DISCONNECT. It also forgets the
// client's rate limit.
func (h *ingestHook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	h.buckets.Delete(cl)
	if errors.Is(err, packets.ErrPacketTooLarge) {
		h.log.Warn("client sent a packet larger than broker.max_packet_size: disconnected",
			"client", cl.ID, "remote", cl.Net.Remote, "max_packet_size", h.maxPacket)
	}
}

// OnPublish stores a routed publish. When the store refuses it at once
// (full), the publisher gets a negative acknowledgement (MQTT 5: PUBACK 0x97
// Quota exceeded, or 0x80 when the store failed); an MQTT 3.1.1 client,
// which has no negative PUBACK, is disconnected without an acknowledgement
// so that it publishes again later. When the write fails later, the
// connection is closed before the acknowledgement leaves.
func (h *ingestHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		h.local.Add(1)
		return pk, nil
	}
	// The topic is checked again now that a topic alias is resolved
	// (OnACLCheck lets an alias's empty topic through).
	if !h.allowed(cl, pk.TopicName, true) {
		h.warnACL(cl, "publish", pk.TopicName)
		return h.refuse(cl, pk, packets.ErrNotAuthorized)
	}
	if h.rate.MessagesPerSecond > 0 && !h.takeToken(cl) {
		return h.refuse(cl, pk, packets.ErrMessageRateTooHigh)
	}
	// Requests stay local; the agent answers on their response topic as
	// the requester could have published itself.
	if h.isRequest(pk.TopicName) {
		if rt := pk.Properties.ResponseTopic; rt != "" && !h.allowed(cl, rt, true) {
			h.warnACL(cl, "response topic", rt)
			return h.refuse(cl, pk, packets.ErrNotAuthorized)
		}
		h.local.Add(1)
		return pk, nil
	}
	route, ok := h.route(pk.TopicName)
	if !ok {
		h.local.Add(1)
		return pk, nil
	}
	m := toMessage(route, pk)
	qos := pk.FixedHeader.Qos
	// release lets the held acknowledgement go; wait is used instead on a
	// connection that cannot hold (the inline client).
	var release func(error)
	var wait chan error
	if qos > 0 {
		if holder, ok := cl.Net.Conn.(batchconn.Holder); ok {
			release = holder.Hold()
		} else {
			wait = make(chan error, 1)
		}
	}
	clientID, topic := cl.ID, pk.TopicName
	err := h.store(m, func(_ uint64, err error) {
		if err == nil {
			h.stored.Add(1)
		} else {
			h.failed.Add(1)
			if release != nil {
				h.log.Error("store failed: closing the client's connection before its acknowledgement", "client", clientID, "topic", topic, "error", err)
			}
		}
		if release != nil {
			release(err)
		}
		if wait != nil {
			wait <- err
		}
	})
	counted := false // the failure was counted by the callback
	if err == nil && wait != nil {
		err = <-wait
		counted = true
	}
	if err == nil {
		return pk, nil
	}
	if release != nil {
		release(nil) // refused at once: the negative acknowledgement may go
	}
	code := packets.ErrUnspecifiedError
	if errors.Is(err, storage.ErrFull) {
		h.refused.Add(1)
		code = packets.ErrQuotaExceeded
		h.warnFull(cl, pk, err)
	} else {
		if !counted {
			h.failed.Add(1)
		}
		h.log.Error("store failed: publish refused", "client", cl.ID, "topic", pk.TopicName, "error", err)
	}
	if qos == 0 {
		// Best effort: local subscribers still get it.
		return pk, nil
	}
	if cl.Properties.ProtocolVersion == 5 && qos == 1 {
		return pk, code
	}
	// MQTT 3.1.1 (no reason codes) and QoS 2 (mochi answers a refused QoS 2
	// with a PUBACK, which is a protocol error): close without acknowledging.
	cl.Stop(code)
	return pk, packets.ErrRejectPacket
}

func (h *ingestHook) isRequest(topic string) bool {
	if h.requests == nil {
		return false
	}
	_, ok := h.requests.Match(topic)
	return ok
}

// warnFull logs a refusal at most once every 10 s: a full store under load
// refuses thousands of messages per second.
func (h *ingestHook) warnFull(cl *mqtt.Client, pk packets.Packet, err error) {
	now := time.Now().UnixNano()
	last := h.lastWarn.Load()
	if now-last < int64(10*time.Second) || !h.lastWarn.CompareAndSwap(last, now) {
		return
	}
	h.log.Warn("outbox full: refusing publishes (logged once per 10s)",
		"client", cl.ID, "topic", pk.TopicName, "refused_total", h.refused.Load(), "error", err)
}

// toMessage converts a mochi packet. The payload is not copied: the store
// encodes it before OnPublish returns.
func toMessage(route string, pk packets.Packet) *storage.Message {
	p := &pk.Properties
	m := &storage.Message{
		Route:           route,
		Topic:           pk.TopicName,
		Payload:         pk.Payload,
		QoS:             pk.FixedHeader.Qos,
		Retain:          pk.FixedHeader.Retain,
		ContentType:     p.ContentType,
		ResponseTopic:   p.ResponseTopic,
		CorrelationData: p.CorrelationData,
		PayloadUTF8:     p.PayloadFormatFlag && p.PayloadFormat == 1,
		Created:         time.Now(),
	}
	if p.MessageExpiryInterval > 0 {
		m.Expires = m.Created.Add(time.Duration(p.MessageExpiryInterval) * time.Second)
	}
	if len(p.User) > 0 {
		m.UserProps = make([]storage.Property, len(p.User))
		for i, u := range p.User {
			m.UserProps[i] = storage.Property{Key: u.Key, Value: u.Val}
		}
	}
	return m
}

// isLoopback reports whether a listen address binds only loopback.
func isLoopback(addr string) (bool, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false, err
	}
	if host == "localhost" {
		return true, nil
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback(), nil
}
