// Package hub is the cloud side of Outpost's hub dialects, as a local
// emulator (`outpost hub`): an embedded MQTT broker that speaks the service
// side of the Azure IoT Hub MQTT 5 API and of the Watson IoT Platform with
// its device-management protocol (PROTOCOLS.md), with an HTTP/JSON API for
// the operator: invoke methods, send commands, patch the desired twin,
// start a firmware update, follow telemetry, and inject the hub's error
// statuses on purpose.
//
// It follows PROTOCOLS.md closely enough to test a device against, error
// statuses included; it is not a hub to run a fleet on (state is in
// memory, one process).
package hub

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Options configure a Hub.
type Options struct {
	// Listen is the MQTT listener's address. Default 127.0.0.1:8883.
	Listen string
	// TLS, when set, makes the MQTT listener TLS; a verified client
	// certificate whose common name is the device id then authenticates
	// an Azure X509 device.
	TLS *tls.Config
	// API is the HTTP API's address. Default 127.0.0.1:8080; "off" = none.
	API string
	// FilesDir is a directory the API serves at /files/NAME, for devices
	// to download plugins (and firmware) from; "" = none. Files wins for a
	// name in both.
	FilesDir string

	// AzureHost is the host name Azure devices sign their SAS with.
	// Default "outpost-hub.local".
	AzureHost string
	// AzureKeys are the devices' shared access keys (decoded), by device
	// id; DefaultKey serves any other device (nil = refuse them).
	AzureKeys  map[string][]byte
	DefaultKey []byte

	// WatsonOrg is the organization id of Watson devices. Default "outpst".
	WatsonOrg string
	// WatsonTokens are the devices' auth tokens, by client id
	// (d:org:type:id or g:org:type:id); DefaultToken serves any other.
	WatsonTokens map[string]string
	DefaultToken string

	// MethodTimeout is the default wait for a method's response. Default 30s.
	MethodTimeout time.Duration
	// MaxDeliveries dead-letters a command abandoned this many times.
	// Default 10.
	MaxDeliveries int
	// RedeliveryDelay is how long an abandoned command waits before it is
	// delivered again. Default 1s.
	RedeliveryDelay time.Duration

	// Files are served by the API at GET /files/{name}, for devices to
	// download: firmware images, plugin modules.
	Files map[string][]byte

	Log *slog.Logger // nil = discard
}

// Hub is a running emulator. Close it when done.
type Hub struct {
	o    Options
	log  *slog.Logger
	srv  *mqtt.Server
	addr string
	api  *http.Server
	apiL net.Listener

	mu      sync.Mutex
	devices map[string]*device // by key: "azure/" + device id, "watson/" + type + "/" + id
	conns   map[*mqtt.Client]*conn
	faults  []*Fault
	events  []Event // the last maxEvents telemetry messages
	follow  map[chan Event]struct{}
	seq     uint64 // command sequence numbers, hub-wide
	stats   Stats
	closed  bool
	offline bool // Offline: the MQTT listener is closed
	wg      sync.WaitGroup
	ctx     context.Context
	cancel  context.CancelFunc
}

// Stats are the hub's counters.
type Stats struct {
	Connects    int64 `json:"connects"`
	Refused     int64 `json:"refused_connects"`
	Telemetry   int64 `json:"telemetry"`
	Disconnects int64 `json:"disconnects_by_hub"` // a device broke the protocol
	Offline     bool  `json:"offline"`            // in an outage begun by Offline
}

// conn is one device connection.
type conn struct {
	cl      *mqtt.Client
	dev     *device
	expiry  *time.Timer // Azure SAS: the connection ends when it expires
	gateway bool        // Watson gateway
}

// maxEvents bounds the telemetry kept for the API.
const maxEvents = 10000

// New listens on the MQTT and API addresses.
func New(o Options) (*Hub, error) {
	if o.Listen == "" {
		o.Listen = "127.0.0.1:8883"
	}
	if o.API == "" {
		o.API = "127.0.0.1:8080"
	}
	if o.AzureHost == "" {
		o.AzureHost = "outpost-hub.local"
	}
	if o.WatsonOrg == "" {
		o.WatsonOrg = "outpst"
	}
	if o.MethodTimeout <= 0 {
		o.MethodTimeout = 30 * time.Second
	}
	if o.MaxDeliveries <= 0 {
		o.MaxDeliveries = 10
	}
	if o.RedeliveryDelay <= 0 {
		o.RedeliveryDelay = time.Second
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Hub{o: o, log: log, devices: map[string]*device{}, conns: map[*mqtt.Client]*conn{}, follow: map[chan Event]struct{}{}}
	h.ctx, h.cancel = context.WithCancel(context.Background())

	caps := mqtt.NewDefaultServerCapabilities()
	// Azure's CONNACK (PROTOCOLS.md 3.1); Watson's limits are checked per
	// message.
	caps.ReceiveMaximum = 16
	caps.MaximumQos = 1
	caps.RetainAvailable = 0
	caps.MaximumPacketSize = 262144
	caps.TopicAliasMaximum = 10
	caps.SharedSubAvailable = 0
	caps.SubIDAvailable = 0
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	h.srv = mqtt.New(&mqtt.Options{Capabilities: caps, Logger: slog.New(slog.DiscardHandler)})
	if err := h.srv.AddHook(&hook{h: h}, nil); err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: listenerID, Address: o.Listen, TLSConfig: o.TLS})
	if err := h.srv.AddListener(tcp); err != nil {
		return nil, fmt.Errorf("hub: listen on %s: %w", o.Listen, err)
	}
	h.addr = tcp.Address()
	if o.API != "off" {
		ln, err := net.Listen("tcp", o.API)
		if err != nil {
			_ = h.srv.Close()
			return nil, fmt.Errorf("hub: api: listen on %s: %w", o.API, err)
		}
		h.apiL = ln
		h.api = &http.Server{Handler: h.routes(), ReadHeaderTimeout: 10 * time.Second}
	}
	return h, nil
}

// Start serves MQTT and the API in the background.
func (h *Hub) Start() error {
	if err := h.srv.Serve(); err != nil {
		return fmt.Errorf("hub: serve: %w", err)
	}
	if h.api != nil {
		go func() {
			if err := h.api.Serve(h.apiL); err != nil && !errors.Is(err, http.ErrServerClosed) {
				h.log.Error("hub api stopped", "error", err)
			}
		}()
	}
	h.log.Info("hub listening", "mqtt", h.addr, "api", h.APIAddr(), "azure_host", h.o.AzureHost, "watson_org", h.o.WatsonOrg)
	return nil
}

// Addr is the MQTT listener's bound address.
func (h *Hub) Addr() string { return h.addr }

// APIAddr is the HTTP API's bound address ("" when off).
func (h *Hub) APIAddr() string {
	if h.apiL == nil {
		return ""
	}
	return h.apiL.Addr().String()
}

// Stats returns the hub's counters.
func (h *Hub) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.stats
	s.Offline = h.offline
	return s
}

// Close stops the API and the broker.
func (h *Hub) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	offline := h.offline
	for ch := range h.follow {
		close(ch)
		delete(h.follow, ch)
	}
	h.mu.Unlock()
	h.cancel()
	if offline {
		// With its listener gone, mochi's Close would not end the clients
		// still connected (observers), and would wait for them.
		for _, cl := range h.srv.Clients.GetAll() {
			cl.Stop(packets.ErrServerShuttingDown)
		}
	}
	var errs []error
	if h.api != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := h.api.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if err := h.srv.Close(); err != nil {
		errs = append(errs, err)
	}
	h.wg.Wait()
	return errors.Join(errs...)
}

// Event is a telemetry message the hub received.
type Event struct {
	Time        time.Time         `json:"time"`
	Dialect     string            `json:"dialect"`
	Device      string            `json:"device"`
	Topic       string            `json:"topic"`
	QoS         byte              `json:"qos"`
	ContentType string            `json:"content_type,omitempty"`
	Props       map[string]string `json:"properties,omitempty"`
	Payload     string            `json:"payload"`
}

// record keeps a telemetry event and hands it to the followers.
func (h *Hub) record(e Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stats.Telemetry++
	h.events = append(h.events, e)
	if len(h.events) > maxEvents {
		h.events = append(h.events[:0:0], h.events[len(h.events)-maxEvents/2:]...)
	}
	for ch := range h.follow {
		select {
		case ch <- e:
		default: // a slow follower misses events rather than holding the hub
		}
	}
}

// Telemetry returns the telemetry received, oldest first.
func (h *Hub) Telemetry() []Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Event(nil), h.events...)
}

// Follow returns a channel of the telemetry received from now on, and a
// function that ends it.
func (h *Hub) Follow() (<-chan Event, func()) {
	ch := make(chan Event, 1024)
	h.mu.Lock()
	if h.closed {
		close(ch)
		h.mu.Unlock()
		return ch, func() {}
	}
	h.follow[ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		if _, ok := h.follow[ch]; ok {
			delete(h.follow, ch)
			close(ch)
		}
		h.mu.Unlock()
	}
}

// Fault makes the hub answer an operation of a device with an error status
// (or not at all), Count times.
type Fault struct {
	Device string `json:"device"` // "" = any device
	// Op is the operation: telemetry, twin.get, twin.reported (Azure);
	// event, or a device request with "." for "/" such as mgmt.manage,
	// notify, device.update.location (Watson).
	Op string `json:"op"`
	// Status is the Azure status to answer (e.g. "0501"), or the Watson rc
	// (e.g. "500").
	Status string `json:"status,omitempty"`
	Drop   bool   `json:"drop,omitempty"` // answer nothing: the device times out
	Count  int    `json:"count"`          // times it applies; default 1
}

// AddFault arms a fault.
func (h *Hub) AddFault(f Fault) {
	if f.Count <= 0 {
		f.Count = 1
	}
	h.mu.Lock()
	h.faults = append(h.faults, &f)
	h.mu.Unlock()
}

// fault takes one use of the first fault armed for dev and op.
func (h *Hub) fault(dev, op string) *Fault {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, f := range h.faults {
		if f.Op == op && (f.Device == "" || f.Device == dev) {
			f.Count--
			if f.Count <= 0 {
				h.faults = append(h.faults[:i], h.faults[i+1:]...)
			}
			c := *f
			return &c
		}
	}
	return nil
}

// disconnect ends a device's connection for breaking the protocol, as the
// hub does: a DISCONNECT with the reason code and user properties.
func (h *Hub) disconnect(cl *mqtt.Client, code packets.Code, props ...packets.UserProperty) {
	h.mu.Lock()
	h.stats.Disconnects++
	h.mu.Unlock()
	h.log.Warn("hub disconnects a device", "client", cl.ID, "reason_code", code.Code, "reason", code.Reason, "properties", props)
	if cl.Properties.ProtocolVersion == 5 {
		_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ReasonCode: code.Code,
			Properties: packets.Properties{ReasonString: code.Reason, User: props}})
	}
	cl.Stop(code)
}

// after runs fn after d, unless the hub closes first.
func (h *Hub) after(d time.Duration, fn func()) {
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			fn()
		case <-h.ctx.Done():
		}
	}()
}
