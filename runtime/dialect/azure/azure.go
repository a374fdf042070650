// Package azure is the device side of the Azure IoT Hub MQTT 5 API
// (api-version 2020-10-01-preview, PROTOCOLS.md section 3): SAS and X.509
// authentication with re-authentication before the signature expires,
// telemetry on $iothub/telemetry, commands acknowledged by their handler's
// result with a journal against redelivery, direct methods, and the twin.
//
// The package knows the API's topics, properties and statuses; the uplink
// carries the packets, the dispatcher runs the handlers.
package azure

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/dm"
	"github.com/outpost-edge/outpost/runtime/twin"
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// Topics of the API. Names are exact and case-sensitive.
const (
	TopicTelemetry     = "$iothub/telemetry"
	TopicCommands      = "$iothub/commands"
	TopicMethods       = "$iothub/methods/+"
	TopicMethodsPrefix = "$iothub/methods/"
	TopicResponses     = "$iothub/responses"
	TopicTwinGet       = "$iothub/twin/get"
	TopicTwinReported  = "$iothub/twin/patch/reported"
	TopicTwinDesired   = "$iothub/twin/patch/desired"
)

// Limits of the API (PROTOCOLS.md 3.1, 3.6).
const (
	MaxPacket      = 262144    // Maximum Packet Size of the CONNACK
	MaxCorrelation = 16        // bytes of Correlation Data
	MaxMethodBytes = 128 << 10 // a method's request or response payload
)

// User properties of the API.
const (
	PropStatus        = "status"
	PropReason        = "reason"
	PropTraceID       = "trace-id"
	PropResponseCode  = "response-code"
	PropVersion       = "version"
	PropIfVersion     = "if-version"
	PropSequenceNo    = "sequence-no"
	PropDeliveryCount = "delivery-count"
	PropEnqueuedTime  = "enqueued-time"
	PropCreationTime  = "creation-time"
	PropMessageID     = "message-id"
)

// CommandProperty is the application property whose value names the
// handler of a command: cloud-to-device messages have no name of their own.
const CommandProperty = "@command"

// Link is the uplink, as the dialect uses it.
type Link interface {
	Send(ctx context.Context, o uplink.Outbound) error
	Reauthenticate(ctx context.Context, c uplink.Credentials) error
}

// Server serves requests (the dispatcher).
type Server interface {
	Serve(c dispatch.Call, done func(*sandbox.Response))
}

// Options configure a Dialect.
type Options struct {
	Host     string // the hub's host name, as signed
	DeviceID string
	ModuleID string // "" = a device identity
	// Key is the decoded shared access key: the device's, or the policy's
	// when Policy is set. nil = X.509 (the certificate is in the TLS
	// handshake).
	Key    []byte
	Policy string
	// SendHost puts the host user property in the CONNECT: needed when the
	// TLS handshake carries no server name (plain TCP, an IP address).
	SendHost bool
	// SASLifetime is how long a signature is valid; the dialect
	// re-authenticates at four fifths of it. Default 1h.
	SASLifetime time.Duration
	// DefaultCommand names the handler of commands without CommandProperty.
	// Default "c2d".
	DefaultCommand string
	// MethodTimeout is the deadline of a direct method's handler when the
	// request has no Message Expiry. Default 30s.
	MethodTimeout time.Duration
	// CommandTimeout is the deadline of a command's handler. Default 60s.
	CommandTimeout time.Duration
	// Journal records the commands run, by sequence number.
	Journal *storage.State
	// Twin is the cached twin the dialect keeps in line with the hub; nil
	// = the twin is not used.
	Twin *twin.Twin
	// RequestTimeout bounds the wait for the hub's answer to a twin
	// request. Default 30s.
	RequestTimeout time.Duration
	// State keeps the firmware state machine; nil = no firmwareUpdate
	// method (501).
	State *storage.State
	// Actions run the operator's install command.
	Actions dm.Actions
	// Running is the firmware version the device runs (as configured).
	Running string
	// ActionTimeout is the deadline of a firmware handler. Default 10m.
	ActionTimeout time.Duration
	Server        Server
	Agent         string // client-agent property, e.g. "outpost/1.0"
	Log           *slog.Logger
	now           func() time.Time // tests
}

// Dialect is one device connection's protocol state. Create it with New,
// give its methods to the uplink (Credentials, Subscriptions, Telemetry,
// OnMessage, OnConnect, Refusal), then Attach the uplink.
type Dialect struct {
	o   Options
	log *slog.Logger

	mu       sync.Mutex
	closeMu  sync.Mutex // orders hold's wg.Add before Close's Wait
	reauthMu sync.Mutex
	link     Link
	expiry   time.Time // of the signature of the current connection
	reauth   *time.Timer
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	cmdMu   sync.Mutex      // orders a command's journal read and write
	running map[uint64]*run // commands being served, by sequence number

	fw    *dm.Machine // nil when State is
	fwRun *dm.Runner

	reqMu    sync.Mutex
	requests map[string]chan *uplink.Inbound // twin requests waiting for their response, by correlation data
	corrBase [8]byte                         // random: correlation data of this process never repeat an earlier one's
	corrSeq  uint64
	wake     chan struct{} // buffered 1: the twin loop has something to do
	needGet  bool          // the twin must be read whole (reqMu)
	getAsked uint64        // counts getWhole calls, so a read clears needGet only if none came meanwhile (reqMu)
	up       bool          // a connection is up (reqMu)
}

// New checks o and returns a dialect.
func New(o Options) (*Dialect, error) {
	if o.Host == "" || o.DeviceID == "" {
		return nil, errors.New("azure: the hub host and the device id are required")
	}
	if strings.ContainsAny(o.DeviceID, "/+#") || strings.ContainsAny(o.ModuleID, "/+#") || len(o.DeviceID) > 128 {
		return nil, fmt.Errorf("azure: device id %q / module id %q: at most 128 characters, without '/', '+', '#'", o.DeviceID, o.ModuleID)
	}
	if o.Policy != "" && o.Key == nil {
		return nil, errors.New("azure: a SAS policy needs the policy's key")
	}
	if o.Journal == nil || o.Server == nil {
		return nil, errors.New("azure: Journal and Server are required")
	}
	if o.SASLifetime <= 0 {
		o.SASLifetime = time.Hour
	}
	if o.DefaultCommand == "" {
		o.DefaultCommand = "c2d"
	}
	if o.MethodTimeout <= 0 {
		o.MethodTimeout = 30 * time.Second
	}
	if o.CommandTimeout <= 0 {
		o.CommandTimeout = 60 * time.Second
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	if o.ActionTimeout <= 0 {
		o.ActionTimeout = 10 * time.Minute
	}
	if o.now == nil {
		o.now = time.Now
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dialect{o: o, log: log, requests: map[string]chan *uplink.Inbound{}, wake: make(chan struct{}, 1)}
	_, _ = rand.Read(d.corrBase[:])
	d.ctx, d.cancel = context.WithCancel(context.Background())
	if err := d.newFirmware(); err != nil {
		return nil, err
	}
	if o.Twin != nil {
		d.wg.Add(1)
		go d.twinLoop()
	}
	return d, nil
}

// Attach gives the dialect the uplink it sends on, and resumes a firmware
// update a restart cut in the middle.
func (d *Dialect) Attach(l Link) {
	d.mu.Lock()
	d.link = l
	d.mu.Unlock()
	if d.fwRun != nil {
		d.fwRun.Recover(d.afterDownload)
	}
}

// Stop ends the dialect's work without waiting: no re-authentication,
// and firmware steps cut now are taken up at the next start.
func (d *Dialect) Stop() {
	d.closeMu.Lock()
	d.cancel()
	d.closeMu.Unlock()
}

// hold counts a piece of work Close waits for, unless the dialect is
// stopping; the caller calls d.wg.Done when the work ends.
func (d *Dialect) hold() bool {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.ctx.Err() != nil {
		return false
	}
	d.wg.Add(1)
	return true
}

// Close stops re-authentication and waits (bounded by ctx) for the
// requests in progress to answer.
func (d *Dialect) Close(ctx context.Context) {
	d.Stop()
	d.mu.Lock()
	if d.reauth != nil {
		d.reauth.Stop()
	}
	d.mu.Unlock()
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// ClientID is the MQTT client id: the device id, or device/module.
func (d *Dialect) ClientID() string {
	if d.o.ModuleID != "" {
		return d.o.DeviceID + "/" + d.o.ModuleID
	}
	return d.o.DeviceID
}

// Credentials builds a CONNECT's (or AUTH's) authentication: a fresh SAS
// signature, or the X.509 method.
func (d *Dialect) Credentials() (uplink.Credentials, error) {
	c := uplink.Credentials{UserProps: []uplink.Property{{Key: "api-version", Value: APIVersion}}}
	if d.o.SendHost {
		c.UserProps = append(c.UserProps, uplink.Property{Key: "host", Value: d.o.Host})
	}
	if d.o.Agent != "" {
		c.UserProps = append(c.UserProps, uplink.Property{Key: "client-agent", Value: d.o.Agent})
	}
	if d.o.Key == nil {
		c.AuthMethod = AuthX509
		return c, nil
	}
	at := d.o.now()
	exp := at.Add(d.o.SASLifetime)
	c.AuthMethod = AuthSAS
	c.AuthData = Sign(d.o.Key, d.o.Host, d.ClientID(), d.o.Policy, at, exp)
	c.UserProps = append(c.UserProps,
		uplink.Property{Key: "sas-at", Value: ms(at)},
		uplink.Property{Key: "sas-expiry", Value: ms(exp)})
	if d.o.Policy != "" {
		c.UserProps = append(c.UserProps, uplink.Property{Key: "sas-policy", Value: d.o.Policy})
	}
	d.mu.Lock()
	d.expiry = exp
	d.mu.Unlock()
	return c, nil
}

// Subscriptions are the API's request topics, subscribed in one SUBSCRIBE
// as the API recommends: methods and desired patches at QoS 0, commands at
// QoS 1. $iothub/responses is subscribed implicitly.
func (d *Dialect) Subscriptions() []uplink.Subscription {
	return []uplink.Subscription{{Filter: TopicMethods, QoS: 0}, {Filter: TopicCommands, QoS: 1}, {Filter: TopicTwinDesired, QoS: 0}}
}

// TelemetryTopic is the topic of every telemetry message.
func (d *Dialect) TelemetryTopic(*storage.Message) string { return TopicTelemetry }

// systemProps are the telemetry system properties a local publisher may
// set itself (PROTOCOLS.md 3.6); message-id is the agent's.
var systemProps = map[string]bool{"content-encoding": true, "user-id": true, "correlation-id": true}

// PropTopic is the application property that carries a telemetry
// message's local topic (all telemetry shares one topic upstream).
const PropTopic = "@topic"

func hasProp(ps []storage.Property, key string) bool {
	for _, p := range ps {
		if p.Key == key {
			return true
		}
	}
	return false
}

// TelemetryProps maps a stored message's user properties to the API's:
// a known system property passes (creation-time only as a decimal
// millisecond time), any other becomes an application property ("@" put
// before its name unless it has one); then @topic, the local topic, unless
// the publisher gave one; message-id, the message's stable id; and
// creation-time, when it was accepted locally, unless the publisher gave
// one. The hub refuses an unknown property without "@".
func (d *Dialect) TelemetryProps(dst []uplink.Property, m *storage.Message, id string) []uplink.Property {
	created := false
	for _, p := range m.UserProps {
		switch {
		case strings.HasPrefix(p.Key, "@"), systemProps[p.Key]:
			dst = append(dst, p)
		case p.Key == PropCreationTime:
			if _, err := parseMS(p.Value); err == nil {
				dst, created = append(dst, p), true
				continue
			}
			dst = append(dst, uplink.Property{Key: "@" + p.Key, Value: p.Value})
		default:
			dst = append(dst, uplink.Property{Key: "@" + p.Key, Value: p.Value})
		}
	}
	if !hasProp(m.UserProps, PropTopic) {
		dst = append(dst, uplink.Property{Key: PropTopic, Value: m.Topic})
	}
	dst = append(dst, uplink.Property{Key: PropMessageID, Value: id})
	if !created && !m.Created.IsZero() {
		dst = append(dst, uplink.Property{Key: PropCreationTime, Value: ms(m.Created)})
	}
	return dst
}

// Refusal decides what becomes of telemetry the hub refused, from its
// status: retried when the status is retryable (or re-authentication may
// cure it), dropped otherwise (Bad Request: sent again it would be refused
// again).
func (d *Dialect) Refusal(reason byte, props []uplink.Property) uplink.Verdict {
	st, err := ParseStatus(prop(props, PropStatus))
	if err != nil {
		// No status (or not one): as any MQTT 5 server's refusal, dropped
		// only when the message itself is invalid.
		if reason == 0x90 || reason == 0x99 {
			return uplink.Drop
		}
		return uplink.Retry
	}
	switch st.Action() {
	case Fail:
		d.log.Error("hub refused telemetry: dropped", "status", st.String(), "name", st.Name(),
			"reason", prop(props, PropReason), "trace_id", prop(props, PropTraceID))
		return uplink.Drop
	case Reauth:
		return uplink.Retry // the reconnection signs afresh
	}
	return uplink.RetryLater // throttled or busy: pause on this connection
}

// OnServerDisconnect logs the status of a DISCONNECT from the hub. The
// next connection signs afresh, which cures an expired signature.
func (d *Dialect) OnServerDisconnect(reason byte, props []uplink.Property) {
	args := []any{"reason_code", reason, "reason", prop(props, PropReason), "trace_id", prop(props, PropTraceID)}
	if st, err := ParseStatus(prop(props, PropStatus)); err == nil {
		args = append(args, "status", st.String(), "name", st.Name(), "action", st.Action().String())
	}
	switch reason {
	case 0x87:
		d.log.Warn("hub disconnected: not authorized; reconnecting with a new signature", args...)
	case 0x8E:
		d.log.Warn("hub disconnected: session taken over by another connection with this identity", args...)
	case 0x9F:
		d.log.Warn("hub disconnected: connection rate exceeded", args...)
	default:
		d.log.Warn("hub disconnected", args...)
	}
}

// OnConnect schedules the re-authentication of the new connection and
// brings the twin in line: a full read, then the reported patches queued
// meanwhile, in order.
func (d *Dialect) OnConnect() {
	d.scheduleReauth()
	d.reqMu.Lock()
	d.up, d.needGet = true, true
	d.reqMu.Unlock()
	d.poke()
}

// OnConnectionDown stops the twin loop's sends until the next connection,
// and ends the requests waiting for an answer that cannot come.
func (d *Dialect) OnConnectionDown() {
	d.reqMu.Lock()
	d.up = false
	for _, ch := range d.requests {
		select {
		case ch <- nil:
		default:
		}
	}
	d.reqMu.Unlock()
}

// scheduleReauth arms the timer that re-authenticates at four fifths of
// the current signature's lifetime.
func (d *Dialect) scheduleReauth() {
	if d.o.Key == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx.Err() != nil {
		return
	}
	if d.reauth != nil {
		d.reauth.Stop()
	}
	in := max(time.Until(d.expiry)-d.o.SASLifetime/5, time.Second)
	d.reauth = time.AfterFunc(in, d.reauthenticate)
}

// reauthenticate sends a new signature on the current connection. A
// refusal ends in a DISCONNECT from the hub, and the reconnection signs
// afresh; any other failure is retried.
func (d *Dialect) reauthenticate() {
	if d.o.Key == nil {
		return // X.509: the certificate does not expire with the connection
	}
	d.reauthMu.Lock() // one re-authentication at a time
	defer d.reauthMu.Unlock()
	d.mu.Lock()
	l := d.link
	d.mu.Unlock()
	if l == nil || d.ctx.Err() != nil {
		return
	}
	c, err := d.Credentials()
	if err == nil {
		ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
		err = l.Reauthenticate(ctx, c)
		cancel()
	}
	var re *uplink.ReauthError
	switch {
	case err == nil:
		d.log.Info("re-authenticated with a new SAS signature")
		d.scheduleReauth()
	case errors.As(err, &re):
		d.log.Error("hub refused the re-authentication; it will disconnect, and the reconnection signs afresh",
			"reason_code", re.Reason, "status", prop(re.Props, PropStatus))
	case errors.Is(err, uplink.ErrLost):
		// The next connection signs afresh and schedules again.
	default:
		d.log.Warn("re-authentication failed; retrying in 30s", "error", err)
		d.mu.Lock()
		if d.reauth != nil {
			d.reauth.Stop()
		}
		if d.ctx.Err() == nil {
			d.reauth = time.AfterFunc(30*time.Second, d.reauthenticate)
		}
		d.mu.Unlock()
	}
}

// Kind is what a message from the hub is, by its topic.
type Kind int

// Kinds of ParseTopic.
const (
	KindUnknown  Kind = iota
	KindResponse      // $iothub/responses
	KindDesired       // $iothub/twin/patch/desired
	KindCommand       // $iothub/commands
	KindMethod        // $iothub/methods/{name}
)

// ParseTopic reads the topic of a message from the hub: its kind and, for
// a method, the method's name (one non-empty topic level).
func ParseTopic(topic string) (Kind, string, error) {
	switch topic {
	case TopicResponses:
		return KindResponse, "", nil
	case TopicTwinDesired:
		return KindDesired, "", nil
	case TopicCommands:
		return KindCommand, "", nil
	}
	if name, ok := strings.CutPrefix(topic, TopicMethodsPrefix); ok {
		if name == "" || strings.ContainsAny(name, "/+#") {
			return KindMethod, name, fmt.Errorf("azure: method topic %q: the name must be one topic level", topic)
		}
		return KindMethod, name, nil
	}
	return KindUnknown, "", fmt.Errorf("azure: %q is not a topic the hub sends on", topic)
}

// OnMessage serves a PUBLISH from the hub by its topic.
func (d *Dialect) OnMessage(m *uplink.Inbound) {
	kind, name, err := ParseTopic(m.Topic)
	switch kind {
	case KindResponse:
		d.response(m)
	case KindDesired:
		d.desired(m)
	case KindCommand:
		d.command(m)
	case KindMethod:
		d.method(m, name, err)
	default:
		d.log.Warn("message from the hub on a topic the dialect does not serve: dropped", "topic", m.Topic, "qos", m.QoS)
		_ = m.Ack(0)
	}
}

// method serves a direct method and answers on $iothub/responses with the
// request's Correlation Data and the handler's status as response-code.
func (d *Dialect) method(m *uplink.Inbound, name string, bad error) {
	corr := m.CorrelationData
	if len(corr) == 0 || len(corr) > MaxCorrelation {
		// No answer can be matched to it; the hub never sends one.
		d.log.Warn("direct method without valid Correlation Data: not served", "method", name, "correlation_bytes", len(corr))
		return
	}
	resp := func(r *sandbox.Response) { d.methodResponse(name, corr, r) }
	if bad != nil {
		resp(&sandbox.Response{Status: abi.StatusBadRequest, Payload: []byte(bad.Error())})
		return
	}
	if !d.hold() {
		return // stopping: the caller times out
	}
	if name == MethodFirmwareUpdate {
		// Off paho's receive goroutine: it stores state and sends.
		go func() {
			defer d.wg.Done()
			d.firmwareMethod(m, corr)
		}()
		return
	}
	timeout := d.o.MethodTimeout
	if m.Expiry > 0 {
		timeout = time.Duration(m.Expiry) * time.Second
	}
	meta := abi.Meta{Kind: abi.KindMethod, Name: name, Flags: abi.FlagResponseExpected, Deadline: timeout,
		RequestID: hex.EncodeToString(corr), ContentType: m.ContentType, Props: abiProps(m.UserProps)}
	d.o.Server.Serve(dispatch.Call{Meta: meta, Payload: m.Payload}, func(r *sandbox.Response) {
		defer d.wg.Done()
		resp(r)
	})
}

// methodResponse publishes a method's response. Only application
// properties ("@") of the handler pass: the hub refuses others.
func (d *Dialect) methodResponse(name string, corr []byte, r *sandbox.Response) {
	status, payload := r.Status, r.Payload
	if len(payload) > MaxMethodBytes {
		d.log.Warn("method response over the hub's 128 KiB: answered 507 instead", "method", name, "bytes", len(payload))
		status, payload = abi.StatusInsufficientStorage, fmt.Appendf(nil, "the response of %d bytes is over the hub's limit of %d", len(payload), MaxMethodBytes)
	}
	o := uplink.Outbound{Topic: TopicResponses, Payload: payload, ContentType: r.ContentType, CorrelationData: corr,
		UserProps: []uplink.Property{{Key: PropResponseCode, Value: strconv.Itoa(int(status))}}}
	for _, p := range r.Props {
		if strings.HasPrefix(p.Key, "@") {
			o.UserProps = append(o.UserProps, uplink.Property{Key: p.Key, Value: p.Value})
		}
	}
	d.mu.Lock()
	l := d.link
	d.mu.Unlock()
	if l == nil {
		return
	}
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	if err := l.Send(ctx, o); err != nil {
		// Methods are never queued: the caller's request has timed out by
		// the time a new connection is up.
		d.log.Warn("method response not sent", "method", name, "status", int(status), "error", err)
		return
	}
	d.log.Debug("method answered", "method", name, "status", int(status))
}

// Command outcomes, from the handler's status: 2xx complete; 429 and 503
// (the handler did not run, or says it did nothing: busy) abandon, so the
// hub delivers the command again later; anything else rejects
// (dead-letters) it, 504 included: a handler out of time may have acted,
// and must not run twice.
type outcome byte

const (
	outcomeComplete outcome = 'c'
	outcomeReject   outcome = 'r'
	outcomeAbandon  outcome = 'a'
	outcomeStarted  outcome = 's' // journal only: running, or the agent stopped while it ran
)

func outcomeOf(st abi.Status) outcome {
	switch {
	case st >= 200 && st < 300:
		return outcomeComplete
	case st == abi.StatusTooManyRequests || st == abi.StatusUnavailable:
		return outcomeAbandon
	}
	return outcomeReject
}

// CommandInfo is what the dialect reads from a command's properties.
type CommandInfo struct {
	Seq        uint64 // sequence-no
	Deliveries uint32 // delivery-count
	Name       string // the handler: @command, or the default
}

// ParseCommand reads a command's properties: sequence-no (u64, required),
// delivery-count (u32; 1 when absent), and the handler's name.
func ParseCommand(props []uplink.Property, defaultName string) (CommandInfo, error) {
	var c CommandInfo
	seq, err := strconv.ParseUint(prop(props, PropSequenceNo), 10, 64)
	if err != nil {
		return c, fmt.Errorf("azure: command: sequence-no %q is not a u64", prop(props, PropSequenceNo))
	}
	c.Seq, c.Deliveries = seq, 1
	if s := prop(props, PropDeliveryCount); s != "" {
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return c, fmt.Errorf("azure: command: delivery-count %q is not a u32", s)
		}
		c.Deliveries = uint32(n)
	}
	c.Name = prop(props, CommandProperty)
	if c.Name == "" {
		c.Name = defaultName
	}
	if c.Name == "" || len(c.Name) > 256 || strings.ContainsAny(c.Name, "/+#\x00") {
		return c, fmt.Errorf("azure: command: handler name %q: want 1 to 256 characters without '/', '+', '#'", c.Name)
	}
	return c, nil
}

// journalTTL is how long a command's journal entry is kept: beyond the
// longest a command can stay queued in the hub (two days).
const journalTTL = 72 * time.Hour

// command serves a cloud-to-device command and acknowledges it by its
// handler's outcome. The journal, by sequence number, makes a redelivered
// command that ran (or that was running when the agent stopped) not run
// again.
func (d *Dialect) command(m *uplink.Inbound) {
	if !d.hold() {
		return // stopping: unacknowledged, the hub delivers it again
	}
	if !d.serveCommand(m) {
		d.wg.Done()
	}
}

// serveCommand serves a held command; it reports whether a handler runs
// it (and will release the hold).
func (d *Dialect) serveCommand(m *uplink.Inbound) bool {
	info, err := ParseCommand(m.UserProps, d.o.DefaultCommand)
	if err != nil {
		d.log.Error("malformed command: rejected", "error", err)
		d.ack(m, outcomeReject)
		return false
	}
	seq, deliveries, name := info.Seq, info.Deliveries, info.Name
	// Sequence numbers are the hub's, per device: a device provisioned
	// again, or on another hub, starts them again.
	key := fmt.Sprintf("c/%s/%s/%020d", d.o.Host, d.ClientID(), seq)
	log := d.log.With("sequence_no", seq, "command", name, "delivery_count", deliveries)

	d.cmdMu.Lock()
	if r, ok := d.running[seq]; ok {
		// Delivered again while it runs (the connection was lost meanwhile):
		// acknowledged with the outcome of the run in progress.
		r.waiters = append(r.waiters, m)
		d.cmdMu.Unlock()
		log.Info("command redelivered while it runs: it will be acknowledged when the run ends")
		return false
	}
	prev, err := d.o.Journal.Get(key)
	if err == nil && len(prev) > 0 {
		d.cmdMu.Unlock()
		switch outcome(prev[0]) {
		case outcomeStarted:
			log.Error("command redelivered that was running when the agent stopped: rejected, not run twice")
			d.ack(m, outcomeReject)
		default:
			log.Info("command redelivered after it ran: acknowledged as before, not run again", "outcome", string(prev[0]))
			d.ack(m, outcome(prev[0]))
		}
		return false
	}
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		d.cmdMu.Unlock()
		log.Error("command journal unreadable: abandoned, to be delivered again", "error", err)
		d.ack(m, outcomeAbandon)
		return false
	}
	if err := d.o.Journal.Put(key, []byte{byte(outcomeStarted)}, journalTTL); err != nil {
		d.cmdMu.Unlock()
		log.Error("command journal not written: abandoned, to be delivered again", "error", err)
		d.ack(m, outcomeAbandon)
		return false
	}
	if d.running == nil {
		d.running = map[uint64]*run{}
	}
	d.running[seq] = &run{waiters: []*uplink.Inbound{m}}
	d.cmdMu.Unlock()

	meta := abi.Meta{Kind: abi.KindCommand, Name: name, Deadline: d.o.CommandTimeout, RequestID: strconv.FormatUint(seq, 10),
		ContentType: m.ContentType, Props: abiProps(m.UserProps)}
	if deliveries > 1 || m.Dup {
		meta.Flags |= abi.FlagRedelivery
	}
	d.o.Server.Serve(dispatch.Call{Meta: meta, Payload: m.Payload}, func(r *sandbox.Response) {
		defer d.wg.Done()
		d.finish(seq, key, outcomeOf(r.Status), log.With("status", int(r.Status)))
	})
	return true
}

// finish records a command's outcome and acknowledges its deliveries. An
// abandoned command leaves the journal, so that its redelivery runs.
func (d *Dialect) finish(seq uint64, key string, out outcome, log *slog.Logger) {
	d.cmdMu.Lock()
	var err error
	if out == outcomeAbandon {
		err = d.o.Journal.Delete(key)
	} else {
		err = d.o.Journal.Put(key, []byte{byte(out)}, journalTTL)
	}
	r := d.running[seq]
	delete(d.running, seq)
	d.cmdMu.Unlock()
	if err != nil {
		// The entry says "started": a redelivery is rejected, not run twice.
		log.Error("command journal not updated", "error", err)
	}
	log.Info("command served", "outcome", map[outcome]string{outcomeComplete: "complete", outcomeReject: "reject", outcomeAbandon: "abandon"}[out])
	for _, m := range r.waiters {
		d.ack(m, out)
	}
}

// run is a command being served, with its deliveries waiting for the
// acknowledgement (the first, and any redelivered meanwhile).
type run struct {
	waiters []*uplink.Inbound
}

// ack sends a command's PUBACK: complete is reason 0; abandon is 131 with
// status 0603; reject is 131 with status 0100.
func (d *Dialect) ack(m *uplink.Inbound, out outcome) {
	var err error
	switch out {
	case outcomeComplete:
		err = m.Ack(0)
	case outcomeAbandon:
		err = m.Ack(StatusServerBusy.Reason(), uplink.Property{Key: PropStatus, Value: StatusServerBusy.String()})
	default:
		err = m.Ack(StatusBadRequest.Reason(), uplink.Property{Key: PropStatus, Value: StatusBadRequest.String()})
	}
	if err != nil {
		d.log.Warn("command acknowledgement not sent; the hub will deliver the command again", "error", err)
	}
}

func abiProps(ps []uplink.Property) []abi.Property {
	if len(ps) == 0 {
		return nil
	}
	out := make([]abi.Property, len(ps))
	for i, p := range ps {
		out[i] = abi.Property{Key: p.Key, Value: p.Value}
	}
	return out
}

func prop(ps []uplink.Property, key string) string {
	for _, p := range ps {
		if p.Key == key {
			return p.Value
		}
	}
	return ""
}
