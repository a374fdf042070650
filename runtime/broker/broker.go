// Package broker embeds the local MQTT broker (mochi-mqtt: MQTT 3.1.1 and 5
// over TCP) that plant devices and apps connect to, with a durable ingest
// hook: a PUBLISH that matches a route is stored before it is acknowledged.
package broker

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
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
}

// Options configure a Broker.
type Options struct {
	Listeners []Listener
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
}

// Stats are the broker's counters.
type Stats struct {
	Clients  int   // clients connected now
	Stored   int64 // publishes stored in the outbox
	Refused  int64 // publishes refused because the outbox was full
	Failed   int64 // publishes refused because the store failed
	Local    int64 // publishes that matched no route (delivered locally only)
	Listener []string
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
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = opts.MaxPacketSize
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		InlineClient: true,
		Logger:       log,
	})

	h := &ingestHook{
		maxPacket: opts.MaxPacketSize,
		route:     opts.Route,
		store:     opts.Store,
		log:       log,
		anonymous: map[string]bool{},
	}
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
		tcp := &batchedTCP{TCP: listeners.NewTCP(listeners.Config{ID: id, Address: l.Address}), srv: srv, log: log}
		if err := srv.AddListener(tcp); err != nil {
			_ = srv.Close()
			return nil, fmt.Errorf("broker: listen on %s: %w", l.Address, err)
		}
		b.addrs = append(b.addrs, tcp.Address())
		if !h.anonymous[id] {
			log.Warn("listener is not on loopback and anonymous access is off: clients without credentials are refused",
				"listener", tcp.Address())
		}
	}
	return b, nil
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
	return Stats{
		Clients:  connected,
		Stored:   b.hook.stored.Load(),
		Refused:  b.hook.refused.Load(),
		Failed:   b.hook.failed.Load(),
		Local:    b.hook.local.Load(),
		Listener: b.Addrs(),
	}
}

// Close stops accepting connections and disconnects every client. It is
// idempotent.
func (b *Broker) Close() error {
	var err error
	b.closeOnce.Do(func() {
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
	srv *mqtt.Server
	log *slog.Logger
}

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

// Serve wraps each accepted connection before mochi takes it.
// A client that closes its socket without DISCONNECT (most command-line
// clients do) ends with io.EOF; mochi would log that as a warning with no
// message, for every such client. It is logged here at debug level, and
// other errors with a message.
func (l *batchedTCP) Serve(establish listeners.EstablishFn) {
	l.TCP.Serve(func(id string, c net.Conn) error {
		remote := c.RemoteAddr().String()
		err := establish(id, batchconn.New(c))
		switch {
		case err == nil:
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
			l.log.Debug("client connection closed", "remote", remote, "listener", id, "error", err)
		default:
			l.log.Warn("client connection ended with an error", "remote", remote, "listener", id, "error", err)
		}
		return nil
	})
}

// ingestHook stores routed publishes before their acknowledgement reaches
// the publisher. mochi calls OnPublish on the client's read goroutine and
// writes the PUBACK after it returns; OnPublish queues the write to the
// store and holds the client's connection (batchconn.Holder) so that the
// PUBACK, and everything written after it, leaves only once the message is
// stored. The read goroutine goes on meanwhile, so the publishes a client
// has in flight are stored together in one write (docs/DECISIONS.md).
type ingestHook struct {
	mqtt.HookBase
	maxPacket uint32
	route     func(string) (string, bool)
	store     func(*storage.Message, func(uint64, error)) error
	log       *slog.Logger
	anonymous map[string]bool // listener id -> anonymous allowed; read-only after New
	// requests matches the filters served by HandleRequests: never stored.
	// Set before Start, read-only after.
	requestFilters []string
	requests       *router.Router

	stored, refused, failed, local atomic.Int64
	lastWarn                       atomic.Int64 // unix nanos of the last "full" warning
}

func (h *ingestHook) ID() string { return "outpost-ingest" }

func (h *ingestHook) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck ||
		b == mqtt.OnPacketEncode || b == mqtt.OnDisconnect
}

// OnPacketEncode announces the maximum packet size in CONNACK to MQTT 5
// clients [MQTT-3.2.2.3.6], which mochi enforces but does not announce.
func (h *ingestHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && h.maxPacket > 0 && cl.Properties.ProtocolVersion == 5 {
		pk.Properties.MaximumPacketSize = h.maxPacket
	}
	return pk
}

// OnDisconnect says why a client that sent an oversized packet was cut off:
// mochi closes such connections without a DISCONNECT.
func (h *ingestHook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	if errors.Is(err, packets.ErrPacketTooLarge) {
		h.log.Warn("client sent a packet larger than broker.max_packet_size: disconnected",
			"client", cl.ID, "remote", cl.Net.Remote, "max_packet_size", h.maxPacket)
	}
}

// OnConnectAuthenticate admits anonymous clients on listeners that allow
// them. Users and passwords come with the local security work.
func (h *ingestHook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	if cl.Net.Inline {
		return true
	}
	ok := h.anonymous[cl.Net.Listener]
	if !ok {
		h.log.Warn("refused anonymous client", "client", cl.ID, "remote", cl.Net.Remote, "listener", cl.Net.Listener)
	}
	return ok
}

// OnACLCheck allows every topic to admitted clients (per-user ACLs come with
// the local security work).
func (h *ingestHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// OnPublish stores a routed publish. When the store refuses it at once
// (full), the publisher gets a negative acknowledgement (MQTT 5: PUBACK 0x97
// Quota exceeded, or 0x80 when the store failed); an MQTT 3.1.1 client,
// which has no negative PUBACK, is disconnected without an acknowledgement
// so that it publishes again later. When the write fails later, the
// connection is closed before the acknowledgement leaves.
func (h *ingestHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	// The agent's own publishes (responses) and requests stay local.
	if cl.Net.Inline || h.isRequest(pk.TopicName) {
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
