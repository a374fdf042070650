// Package watson is the device side of the Watson IoT Platform
// (PROTOCOLS.md sections 1 and 2): device and gateway identities with token
// authentication, events and commands, and the device-management protocol
// (manage, reboot, factory reset, firmware download and update with its
// state machine, observe/notify/cancel, attribute updates, custom actions,
// location and diagnostics), for the device itself and, as a gateway, for
// its child devices.
//
// The dialect owns the wire; runtime/dm owns the firmware state machine;
// handlers (kind dm_action) do the device-specific work, and the host runs
// the operator's commands for reboot, factory reset and install.
package watson

import (
	"context"
	"encoding/json"
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
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// Handler names (kind dm_action) of the DM operations.
const (
	ActionReboot         = "device.reboot"
	ActionFactoryReset   = "device.factory_reset"
	ActionFirmwareGet    = dm.ActionDownload
	ActionFirmwareUpdate = dm.ActionUpdate
)

// CustomAction is the handler name of a custom action: custom:BUNDLE:ACTION.
func CustomAction(bundle, action string) string { return "custom:" + bundle + ":" + action }

// Link is the uplink, as the dialect uses it.
type Link interface {
	Send(ctx context.Context, o uplink.Outbound) error
}

// Server serves requests (the dispatcher).
type Server interface {
	Serve(c dispatch.Call, done func(*sandbox.Response))
}

// Actions run the operator's system commands: reboot, factory_reset,
// install. Has reports whether one is configured.
type Actions = dm.Actions

// Options configure a Dialect.
type Options struct {
	Org, Type, ID string
	Token         string // the auth token ("" on quickstart)
	// Gateway connects as a gateway (g:...), for itself and for Children.
	Gateway  bool
	Children []Identity
	// Manage makes the device (and the children) managed: DM requests are
	// served after a manage request on every connection.
	Manage bool
	// Lifetime is the manage lifetime: a new manage goes out two minutes
	// before it ends. 0 = never dormant; otherwise at least an hour.
	Lifetime        time.Duration
	DeviceInfo      map[string]any
	Metadata        map[string]any
	DeviceActions   bool     // reboot and factory reset
	FirmwareActions bool     // firmware download and update
	Bundles         []string // custom action bundles served
	// SelfBundles are bundles served for this device (the gateway) only,
	// not for its children: the agent's own, such as the plugin rollout.
	SelfBundles []string
	// Installed is the firmware version running (deviceInfo.fwVersion)
	// until an update changes it.
	Installed string
	// EventFormat is the format of events whose local topic does not give
	// one. Default json.
	EventFormat string

	State   *storage.State // DM state (firmware machines, attributes)
	Server  Server
	Actions Actions
	// Local publishes on the local broker: commands for child devices are
	// relayed there, on their own topic.
	Local func(topic string, payload []byte) error
	// RequestTimeout bounds the wait for the platform's answer to a DM
	// request of the device. Default 30s.
	RequestTimeout time.Duration
	// ActionTimeout is the deadline of a DM handler. Default 10m (a
	// firmware download).
	ActionTimeout time.Duration
	Log           *slog.Logger
}

// Dialect is one connection's protocol state. Create it with New, give its
// methods to the uplink, then Attach the uplink.
type Dialect struct {
	o   Options
	log *slog.Logger

	mu       sync.Mutex
	link     Link
	up       bool
	self     *managed
	children map[Identity]*managed

	reqMu   sync.Mutex
	pending map[string]chan dmResponse // device requests waiting, by reqId
	reqSeq  uint64
	reqBase string

	// renewBefore is how long before the lifetime ends manage is sent
	// again: two minutes, as the SDKs do (tests shorten it).
	renewBefore time.Duration

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// closeMu orders wg.Add after Close's cancel: nothing starts once
	// Close waits.
	closeMu sync.Mutex
}

// hold counts a piece of work Close waits for, unless the dialect is
// closing; the caller calls d.wg.Done when the work ends.
func (d *Dialect) hold() bool {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.ctx.Err() != nil {
		return false
	}
	d.wg.Add(1)
	return true
}

// spawn runs fn in a goroutine Close waits for, unless the dialect is
// closing.
func (d *Dialect) spawn(fn func()) bool {
	if !d.hold() {
		return false
	}
	go func() {
		defer d.wg.Done()
		fn()
	}()
	return true
}

// New checks o and returns a dialect.
func New(o Options) (*Dialect, error) {
	if err := ValidOrg(o.Org); err != nil {
		return nil, err
	}
	if err := ValidID("type", o.Type); err != nil {
		return nil, err
	}
	if err := ValidID("device", o.ID); err != nil {
		return nil, err
	}
	if o.Org == Quickstart {
		if o.Gateway {
			return nil, errors.New("watson: a gateway cannot connect to quickstart")
		}
		if o.Manage {
			return nil, errors.New("watson: quickstart has no device management")
		}
	} else if o.Token == "" {
		return nil, errors.New("watson: the device's auth token is required")
	}
	if len(o.Children) > 0 && !o.Gateway {
		return nil, errors.New("watson: child devices need a gateway identity")
	}
	for _, c := range o.Children {
		if err := errors.Join(ValidID("child type", c.Type), ValidID("child device", c.ID)); err != nil {
			return nil, err
		}
	}
	if o.Lifetime != 0 && o.Lifetime < time.Hour {
		return nil, fmt.Errorf("watson: manage lifetime %s: 0 (never dormant) or at least 1h", o.Lifetime)
	}
	for _, b := range append(append([]string(nil), o.Bundles...), o.SelfBundles...) {
		if !customRe.MatchString(b) {
			return nil, fmt.Errorf("watson: bundle %q: want 1 to 255 of A-Z a-z 0-9 . _ -", b)
		}
	}
	if o.State == nil || o.Server == nil {
		return nil, errors.New("watson: State and Server are required")
	}
	if o.EventFormat == "" {
		o.EventFormat = "json"
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 30 * time.Second
	}
	if o.ActionTimeout <= 0 {
		o.ActionTimeout = 10 * time.Minute
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dialect{o: o, log: log, children: map[Identity]*managed{}, pending: map[string]chan dmResponse{},
		reqBase: strconv.FormatInt(time.Now().UnixNano(), 36), renewBefore: 2 * time.Minute}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	var err error
	self := Identity{}
	if o.Gateway {
		self = Identity{o.Type, o.ID}
	}
	if d.self, err = d.newManaged(Identity{o.Type, o.ID}, self); err != nil {
		return nil, err
	}
	d.self.run.Actions, d.self.run.Running = o.Actions, o.Installed
	for _, c := range o.Children {
		if d.children[c], err = d.newManaged(c, c); err != nil {
			return nil, err
		}
	}
	if o.Installed != "" {
		if err := d.self.fw.SetInstalled(o.Installed); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Attach gives the dialect the uplink it sends on, and resumes what a
// restart cut in the middle (firmware downloads and updates).
func (d *Dialect) Attach(l Link) {
	d.mu.Lock()
	d.link = l
	d.mu.Unlock()
	for _, mg := range d.all() {
		mg.run.Recover(nil)
	}
}

// Stop ends the dialect's work without waiting: no new requests are
// served, and steps cut now are taken up at the next start.
func (d *Dialect) Stop() {
	d.closeMu.Lock()
	d.cancel()
	d.closeMu.Unlock()
}

// Close stops the dialect's timers and waits (bounded by ctx) for the
// requests in progress.
func (d *Dialect) Close(ctx context.Context) {
	d.closeMu.Lock()
	d.cancel()
	d.closeMu.Unlock()
	for _, mg := range d.all() {
		mg.mu.Lock()
		if mg.manageTimer != nil {
			mg.manageTimer.Stop()
		}
		mg.mu.Unlock()
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

func (d *Dialect) all() []*managed {
	out := []*managed{d.self}
	for _, c := range d.o.Children {
		out = append(out, d.children[c])
	}
	return out
}

// ClientID is the MQTT client id: d:org:type:id or g:org:type:id.
func (d *Dialect) ClientID() string {
	kind := "d"
	if d.o.Gateway {
		kind = "g"
	}
	return kind + ":" + d.o.Org + ":" + d.o.Type + ":" + d.o.ID
}

// Credentials is token authentication: username use-token-auth, the token
// as password; none on quickstart.
func (d *Dialect) Credentials() (uplink.Credentials, error) {
	if d.o.Org == Quickstart {
		return uplink.Credentials{}, nil
	}
	return uplink.Credentials{Username: "use-token-auth", Password: []byte(d.o.Token)}, nil
}

// Subscriptions are the command and DM topics: the device form, or as a
// gateway the typed forms, which cover the gateway and its children, and
// the gateway's notification topic. Quickstart has neither commands nor
// DM.
func (d *Dialect) Subscriptions() []uplink.Subscription {
	if d.o.Org == Quickstart {
		return nil
	}
	if !d.o.Gateway {
		subs := []uplink.Subscription{{Filter: "iot-2/cmd/+/fmt/+", QoS: 1}}
		if d.o.Manage {
			subs = append(subs, uplink.Subscription{Filter: "iotdm-1/#", QoS: 1})
		}
		return subs
	}
	subs := []uplink.Subscription{{Filter: "iot-2/type/+/id/+/cmd/+/fmt/+", QoS: 1},
		{Filter: "iot-2/type/" + d.o.Type + "/id/" + d.o.ID + "/notify", QoS: 0}}
	if d.o.Manage {
		for _, mg := range d.all() {
			subs = append(subs, uplink.Subscription{Filter: "iotdm-1/type/" + mg.dev.Type + "/id/" + mg.dev.ID + "/#", QoS: 1})
		}
	}
	return subs
}

// TelemetryTopic maps a local topic to an event topic. A local topic that
// is already an event topic keeps its event and format: the device form
// as the device (or gateway) itself, the gateway form for a child device
// (gateway only). Any other topic becomes the event named after its route,
// in the format its content type says.
func (d *Dialect) TelemetryTopic(m *storage.Message) string {
	dev, event, format, ok := ParseEventTopic(m.Topic)
	self := Identity{}
	if d.o.Gateway {
		self = Identity{d.o.Type, d.o.ID}
	}
	switch {
	case ok && dev == (Identity{}):
		return EventTopic(self, event, format)
	case ok && d.o.Gateway:
		return EventTopic(dev, event, format)
	}
	return EventTopic(self, topicLevel(m.Route), d.format(m))
}

// format names a message's format from its content type.
func (d *Dialect) format(m *storage.Message) string {
	ct := strings.ToLower(m.ContentType)
	switch {
	case strings.Contains(ct, "json"):
		return "json"
	case strings.HasPrefix(ct, "text/csv"):
		return "csv"
	case strings.Contains(ct, "xml"):
		return "xml"
	case strings.HasPrefix(ct, "text/"):
		return "txt"
	case ct != "":
		return "bin"
	}
	return d.o.EventFormat
}

// topicLevel makes s one topic level.
func topicLevel(s string) string {
	s = strings.NewReplacer("/", "_", "+", "_", "#", "_").Replace(s)
	if s == "" {
		return "event"
	}
	return s
}

// OnConnect manages the device and its children (when Manage is set).
func (d *Dialect) OnConnect() {
	d.mu.Lock()
	d.up = true
	d.mu.Unlock()
	if !d.o.Manage {
		return
	}
	for _, mg := range d.all() {
		mg.mu.Lock()
		mg.unmanaged = false
		mg.mu.Unlock()
		d.spawn(func() { d.manage(mg) })
	}
}

// OnConnectionDown notes that requests cannot go out.
func (d *Dialect) OnConnectionDown() {
	d.mu.Lock()
	d.up = false
	d.mu.Unlock()
}

// OnMessage serves a PUBLISH from the platform.
func (d *Dialect) OnMessage(m *uplink.Inbound) {
	switch {
	case strings.HasPrefix(m.Topic, dmRequestPrefix):
		_ = m.Ack(0)
		d.serveDM(m.Topic, m.Payload)
	case d.o.Gateway && m.Topic == "iot-2/type/"+d.o.Type+"/id/"+d.o.ID+"/notify":
		_ = m.Ack(0)
		d.log.Warn("platform notification for the gateway", "payload", string(m.Payload))
	default:
		d.command(m)
	}
}

// command serves a command: the device's own go to the handler that
// claims the command's name; a child's are relayed to the local broker on
// their own topic, where the child subscribes.
func (d *Dialect) command(m *uplink.Inbound) {
	c, err := ParseCommandTopic(m.Topic)
	if err != nil {
		d.log.Warn("message from the platform on a topic the dialect does not serve: dropped", "topic", m.Topic)
		_ = m.Ack(0)
		return
	}
	if c.Device != (Identity{}) && c.Device != (Identity{d.o.Type, d.o.ID}) {
		if d.o.Local == nil {
			d.log.Warn("command for a child device, and no local broker to relay it to", "device", c.Device.String())
		} else if err := d.o.Local(m.Topic, m.Payload); err != nil {
			d.log.Warn("command for a child device not relayed", "device", c.Device.String(), "error", err)
		}
		_ = m.Ack(0)
		return
	}
	ct := map[string]string{"json": "application/json", "txt": "text/plain", "text": "text/plain", "xml": "application/xml", "csv": "text/csv"}[c.Format]
	meta := abi.Meta{Kind: abi.KindCommand, Name: c.Command, ContentType: ct, Deadline: d.o.ActionTimeout,
		Props: []abi.Property{{Key: "format", Value: c.Format}}}
	if m.Dup {
		meta.Flags |= abi.FlagRedelivery
	}
	if !d.hold() {
		return // not acknowledged: the platform sends it again
	}
	d.o.Server.Serve(dispatch.Call{Meta: meta, Payload: m.Payload}, func(r *sandbox.Response) {
		defer d.wg.Done()
		if r.Status >= 300 {
			d.log.Warn("command failed", "command", c.Command, "status", int(r.Status), "error", r.Err, "response", string(r.Payload))
		} else {
			d.log.Info("command served", "command", c.Command, "status", int(r.Status))
		}
		// Acknowledged once served: a command that arrives again after a
		// lost connection runs again (the platform has no message id).
		_ = m.Ack(0)
	})
}

// send publishes on the platform (QoS 0; the DM exchange answers and
// retries).
func (d *Dialect) send(topic string, v any) error {
	d.mu.Lock()
	l := d.link
	d.mu.Unlock()
	if l == nil {
		return uplink.ErrLost
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > MaxPayload {
		return fmt.Errorf("watson: a DM message of %d bytes is over the platform's %d", len(b), MaxPayload)
	}
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	return l.Send(ctx, uplink.Outbound{Topic: topic, Payload: b})
}
