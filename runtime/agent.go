// Package runtime wires Outpost's parts into one agent: the local broker,
// the router, the outbox, the uplink, and the wasm handlers that serve
// requests. It owns configuration and
// lifecycle; the parts live in their own packages.
package runtime

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/admin"
	"github.com/outpost-edge/outpost/runtime/broker"
	"github.com/outpost-edge/outpost/runtime/dialect/azure"
	"github.com/outpost-edge/outpost/runtime/dialect/generic"
	"github.com/outpost-edge/outpost/runtime/dialect/watson"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/dm"
	"github.com/outpost-edge/outpost/runtime/rollout"
	"github.com/outpost-edge/outpost/runtime/router"
	"github.com/outpost-edge/outpost/runtime/twin"
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// Agent is one running Outpost: build it with New, then Start, then Close.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	outbox   *storage.Outbox
	router   atomic.Pointer[router.Router] // replaced by Reload
	reloadMu sync.Mutex                    // one Reload at a time; guards cfg's live keys
	users    []BrokerUser                  // the local broker's users as loaded at start (users_file included)
	broker   *broker.Broker
	uplink   *uplink.Uplink  // nil when no uplink is configured
	azure    *azure.Dialect  // the azure dialect, when configured
	watson   *watson.Dialect // the watson dialect, when configured
	twin     *twin.Twin
	blobs    *storage.Blobs
	engine   *sandbox.Engine
	plugins  *plugins.Registry
	dispatch *dispatch.Dispatcher
	admin    *admin.Server // nil when the admin API is off
	adminTCP *admin.Server // nil when admin.http is off
	obs      observer

	dmSlots  chan struct{}      // bounds the local DM requests waiting for the platform
	stopTwin context.CancelFunc // ends publishDesired
	twinDone chan struct{}

	rollout *rollout.Rollout // nil unless plugins.rollout.enabled

	closeOnce sync.Once
	closeErr  error
}

// Status is a snapshot of the agent's state.
type Status struct {
	Broker broker.Stats
	Outbox storage.Stats
	Uplink *uplink.Stats // nil when no uplink is configured
}

// New opens the store and binds the broker's listeners. cfg must be valid
// (see Config.Validate). log nil = discard.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("runtime: invalid config: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Agent{cfg: cfg, log: log, dmSlots: make(chan struct{}, maxLocalDM)}

	routes, rules := routesOf(cfg.Routes)
	rt, err := router.New(rules)
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	a.router.Store(rt)
	durability := storage.DurabilityProcess
	if cfg.Storage.Durability == "fsync" {
		durability = storage.DurabilityFsync
	}
	lim := limitsOf(cfg.Storage)
	a.outbox, err = storage.Open(storage.Options{
		Dir:           filepath.Join(cfg.DataDir, "outbox"),
		Durability:    durability,
		NoCompression: cfg.Storage.Compression == "none",
		Routes:        routes,
		MaxBytes:      lim.MaxBytes,
		MaxMessages:   lim.MaxMessages,
		WhenFull:      lim.WhenFull,
		TTL:           lim.TTL,
		Logger:        log.With("component", "storage"),
	})
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}

	a.users, err = cfg.BrokerUsers()
	if err != nil {
		_ = a.outbox.Close()
		return nil, fmt.Errorf("runtime: %w", err)
	}
	bopts := brokerOptions(&cfg, a.users)
	bopts.Route, bopts.Store, bopts.Logger = a.match, a.outbox.AppendAsync, log.With("component", "broker")
	a.broker, err = broker.New(bopts)
	if err != nil {
		_ = a.outbox.Close()
		return nil, fmt.Errorf("runtime: %w", err)
	}

	if cfg.Uplink.Dialect == "azure" && cfg.Uplink.URL != "" {
		// Before the plugins: a handler may read the twin in its
		// outpost_init.
		if err := a.openTwin(); err != nil {
			_ = a.broker.Close()
			_ = a.outbox.Close()
			return nil, fmt.Errorf("runtime: %w", err)
		}
	}
	if err := a.openPlugins(); err != nil {
		_ = a.broker.Close()
		_ = a.outbox.Close()
		return nil, fmt.Errorf("runtime: %w", err)
	}

	if cfg.Uplink.URL != "" {
		err = a.openUplink()
		if err != nil {
			a.closePlugins(context.Background())
			_ = a.broker.Close()
			_ = a.outbox.Close()
			return nil, fmt.Errorf("runtime: %w", err)
		}
	}
	return a, nil
}

// brokerOptions translates the broker's configuration, with its users
// (broker.users and broker.users_file, loaded).
func brokerOptions(cfg *Config, users []BrokerUser) broker.Options {
	bc := &cfg.Broker
	o := broker.Options{
		MaxPacketSize: uint32(bc.MaxPacketSize),
		MaxClients:    bc.MaxClients,
		UserACL:       broker.ACL(bc.ACL),
		RateLimit:     broker.RateLimit{MessagesPerSecond: bc.RateLimit.MessagesPerSecond, Burst: bc.RateLimit.Burst},
		AuthBackoff:   broker.AuthBackoff{FreeFailures: bc.AuthBackoff.FreeFailures, Max: time.Duration(bc.AuthBackoff.Max)},
	}
	for _, l := range bc.Listeners {
		bl := broker.Listener{Address: l.Address, AllowAnonymous: l.AllowAnonymous}
		if l.CertFile != "" {
			bl.TLS = &broker.TLS{CertFile: l.CertFile, KeyFile: l.KeyFile, ClientCAFile: l.ClientCAFile,
				RequireClientCert: l.RequireClientCert}
		}
		o.Listeners = append(o.Listeners, bl)
	}
	if bc.AnonymousACL != nil {
		acl := broker.ACL(*bc.AnonymousACL)
		o.AnonymousACL = &acl
	}
	for _, u := range users {
		o.Users = append(o.Users, broker.User{Username: u.Username, PasswordHash: string(u.PasswordHash), ACL: broker.ACL(u.ACL)})
	}
	return o
}

// openPlugins loads the installed plugins and serves local requests with
// them.
func (a *Agent) openPlugins() error {
	dir := a.cfg.Plugins.Dir
	if dir == "" {
		dir = filepath.Join(a.cfg.DataDir, "plugins")
	}
	var trust plugins.TrustKeys
	if a.cfg.Plugins.TrustKeys != "" {
		var err error
		if trust, err = plugins.LoadTrustKeys(a.cfg.Plugins.TrustKeys); err != nil {
			return fmt.Errorf("plugins.trust_keys: %w", err)
		}
	}
	var err error
	a.engine, err = sandbox.NewEngine(filepath.Join(a.cfg.DataDir, "wasm-cache"))
	if err != nil {
		return err
	}
	if err := a.openBlobs(); err != nil {
		_ = a.engine.Close(context.Background())
		return err
	}
	bs := blobStore{a.blobs}
	a.plugins, err = plugins.Open(context.Background(), plugins.Options{Dir: dir, Engine: a.engine, Trust: trust, Log: a.log,
		KV: a.pluginKV, Publish: a.pluginPublish, Blobs: bs, Download: &plugins.Downloader{Blobs: bs}, Progress: a.progress,
		Twin: agentTwin{a}, Reserved: reservedHandlers})
	if err != nil {
		_ = a.engine.Close(context.Background())
		return err
	}
	a.dispatch = dispatch.New(a.plugins, a.reply, a.cfg.Plugins.MaxConcurrent, a.log.With("component", "dispatch"))
	for i, f := range []string{dispatch.MethodsFilter, dispatch.CommandsFilter} {
		if err := a.broker.HandleRequests(f, i+1, a.localRequest); err != nil {
			a.closePlugins(context.Background())
			return err
		}
	}
	for i, f := range []string{TwinGetTopic, TwinReportTopic} {
		if err := a.broker.HandleRequests(f, 3+i, a.localTwin); err != nil {
			a.closePlugins(context.Background())
			return err
		}
	}
	if err := a.broker.HandleRequests(DMFilter, 5, a.localDM); err != nil {
		a.closePlugins(context.Background())
		return err
	}
	return nil
}

// maxLocalDM bounds the local device-management requests in progress;
// more are answered 429.
const maxLocalDM = 8

// DMFilter is the local request topic of device-initiated device
// management (Watson): outpost/dm/location, error-code, clear-error-codes,
// log, clear-logs, manage, unmanage.
const DMFilter = "outpost/dm/+"

// localDM serves a local device-management request; it runs in the
// background, since it waits for the platform.
func (a *Agent) localDM(r broker.Request) {
	select {
	case a.dmSlots <- struct{}{}:
	default:
		a.respond(r, abi.StatusTooManyRequests, []byte("too many device-management requests in progress"), "text/plain")
		return
	}
	go func() {
		defer func() { <-a.dmSlots }()
		status, msg := 501, "device management needs uplink.dialect watson"
		if a.watson != nil {
			status, msg = a.watson.Local(strings.TrimPrefix(r.Topic, "outpost/dm/"), r.Payload)
		}
		if status >= 300 {
			a.log.Warn("local device-management request failed", "topic", r.Topic, "status", status, "message", msg)
		}
		a.respond(r, abi.Status(status), []byte(msg), "text/plain")
	}()
}

// respond answers a local request the agent serves itself.
func (a *Agent) respond(r broker.Request, status abi.Status, body []byte, ct string) {
	if r.ResponseTopic == "" {
		return
	}
	err := a.broker.Respond(broker.Response{Topic: r.ResponseTopic, Payload: body, QoS: r.QoS, ContentType: ct,
		CorrelationData: r.CorrelationData, UserProps: [][2]string{{dispatch.StatusProperty, strconv.Itoa(int(status))}}})
	if err != nil {
		a.log.Warn("could not publish a response", "topic", r.ResponseTopic, "error", err)
	}
}

// Local topics of the device state: MQTT 5 request/response on
// outpost/twin/get (the state as JSON) and outpost/twin/report (a reported
// patch for the hub, answered 202 once queued); desired changes are
// published on outpost/twin/desired.
const (
	TwinGetTopic     = "outpost/twin/get"
	TwinReportTopic  = "outpost/twin/report"
	TwinDesiredTopic = "outpost/twin/desired"
)

// localTwin serves a local request on the device state.
func (a *Agent) localTwin(r broker.Request) {
	status, body, ct := abi.StatusOK, []byte(nil), "application/json"
	var err error
	if r.Topic == TwinGetTopic {
		body, err = agentTwin{a}.Get()
	} else if err = (agentTwin{a}).Report(r.Payload); err == nil {
		status = abi.StatusAccepted
	}
	if err != nil {
		status, body, ct = abi.StatusUnavailable, []byte(err.Error()), "text/plain"
		switch {
		case errors.Is(err, sandbox.ErrBadArg):
			status = abi.StatusBadRequest
		case errors.Is(err, sandbox.ErrLimit):
			status = abi.StatusRequestTooLarge
		}
	}
	if err != nil {
		a.log.Warn("local twin request failed", "topic", r.Topic, "error", err)
	}
	a.respond(r, status, body, ct)
}

// publishDesired publishes the desired properties locally each time their
// version changes, until ctx ends.
func (a *Agent) publishDesired(ctx context.Context) {
	var last int64 = -1
	for {
		changed := a.twin.Watch()
		if d := a.twin.Desired(); d.Version != last && d.Version > 0 {
			last = d.Version
			d.Props["$version"] = d.Version
			b, _ := json.Marshal(d.Props)
			if err := a.broker.PublishLocal(TwinDesiredTopic, b, 1); err != nil {
				a.log.Warn("desired properties not published locally", "error", err)
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// progress passes a plugin's progress report to the dialect serving the
// request, and logs it.
func (a *Agent) progress(req abi.Meta, percent int, msg string) {
	a.log.Info("progress", "kind", req.Kind, "name", req.Name, "request_id", req.RequestID, "percent", percent, "message", msg)
	if a.azure != nil {
		a.azure.OnProgress(req, percent, msg)
	}
}

// agentTwin is the device state plugins granted "twin" see: the cached
// twin (azure) or the DM attributes (watson).
type agentTwin struct{ a *Agent }

func (t agentTwin) Get() ([]byte, error) {
	switch {
	case t.a.twin != nil:
		return t.a.twin.JSON(), nil
	case t.a.watson != nil:
		return t.a.watson.State(), nil
	}
	return nil, fmt.Errorf("%w: no dialect keeps a device state (uplink.dialect)", sandbox.ErrUnavailable)
}

func (t agentTwin) Report(patch []byte) error {
	if t.a.twin == nil {
		return fmt.Errorf("%w: the dialect has no reported state", sandbox.ErrUnavailable)
	}
	_, err := t.a.twin.Report(patch)
	switch {
	case errors.Is(err, twin.ErrBadPatch):
		return fmt.Errorf("%w: %w", sandbox.ErrBadArg, err)
	case errors.Is(err, twin.ErrTooLarge), errors.Is(err, twin.ErrFull):
		return fmt.Errorf("%w: %w", sandbox.ErrLimit, err)
	}
	return err
}

// blobStore gives the plugins the staged blobs, with the sandbox's errors.
type blobStore struct{ b *storage.Blobs }

func blobErr(err error) error {
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("%w: %w", sandbox.ErrNotFound, err)
	case errors.Is(err, storage.ErrBadBlob):
		return fmt.Errorf("%w: %w", sandbox.ErrBadArg, err)
	}
	return err
}

func (s blobStore) Size(name string) (int64, error) { n, err := s.b.Size(name); return n, blobErr(err) }
func (s blobStore) ReadAt(name string, p []byte, off int64) (int, error) {
	n, err := s.b.ReadAt(name, p, off)
	return n, blobErr(err)
}
func (s blobStore) Remove(name string) error    { return blobErr(s.b.Remove(name)) }
func (s blobStore) List(prefix string) []string { return s.b.List(prefix) }
func (s blobStore) Create(name string) (plugins.BlobWriter, error) {
	w, err := s.b.Create(name)
	if err != nil {
		return nil, blobErr(err)
	}
	return w, nil
}

// pluginKV opens a plugin's key/value namespace in the store.
func (a *Agent) pluginKV(plugin string, quota int64) (sandbox.KVStore, error) {
	kv, err := a.outbox.KV(plugin, quota)
	if err != nil {
		return nil, err
	}
	return kvStore{kv}, nil
}

// kvStore gives the sandbox the store's errors as the ABI's.
type kvStore struct{ kv *storage.KV }

func kvErr(err error) error {
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("%w: %w", sandbox.ErrNotFound, err)
	case errors.Is(err, storage.ErrQuota), errors.Is(err, storage.ErrTooBig):
		return fmt.Errorf("%w: %w", sandbox.ErrLimit, err)
	case errors.Is(err, storage.ErrBadKV):
		return fmt.Errorf("%w: %w", sandbox.ErrBadArg, err)
	}
	return err
}

func (s kvStore) Get(k []byte) ([]byte, error) { v, err := s.kv.Get(k); return v, kvErr(err) }
func (s kvStore) Set(k, v []byte) error        { return kvErr(s.kv.Set(k, v)) }
func (s kvStore) Delete(k []byte) error        { return kvErr(s.kv.Delete(k)) }

// pluginPublish publishes for a plugin as a local client would: stored for
// upstream when a route takes the topic, and delivered to local
// subscribers.
func (a *Agent) pluginPublish(_ context.Context, topic string, payload []byte, qos byte) error {
	if a.broker.IsRequestTopic(topic) {
		return fmt.Errorf("%w: %q is a request topic", sandbox.ErrDenied, topic)
	}
	if route, ok := a.match(topic); ok {
		err := a.outbox.Append(&storage.Message{Route: route, Topic: topic, Payload: payload, QoS: qos})
		if errors.Is(err, storage.ErrFull) {
			return fmt.Errorf("%w: %w", sandbox.ErrLimit, err)
		}
		if err != nil {
			return err
		}
	}
	return a.broker.PublishLocal(topic, payload, qos)
}

// localRequest hands a request from the local broker to the dispatcher.
func (a *Agent) localRequest(r broker.Request) { a.dispatch.Local(toDispatch(r)) }

// reply publishes a dispatcher's response on the local broker.
func (a *Agent) reply(r dispatch.Reply) error { return a.broker.Respond(toBroker(r)) }

func toDispatch(r broker.Request) dispatch.Request {
	props := make([]abi.Property, len(r.UserProps))
	for i, p := range r.UserProps {
		props[i] = abi.Property{Key: p[0], Value: p[1]}
	}
	return dispatch.Request{Topic: r.Topic, Payload: r.Payload, ContentType: r.ContentType,
		ResponseTopic: r.ResponseTopic, Correlation: r.CorrelationData, Expiry: time.Duration(r.ExpirySeconds) * time.Second,
		Props: props, QoS: r.QoS}
}

func toBroker(r dispatch.Reply) broker.Response {
	props := make([][2]string, len(r.Props))
	for i, p := range r.Props {
		props[i] = [2]string{p.Key, p.Value}
	}
	return broker.Response{Topic: r.Topic, Payload: r.Payload, QoS: r.QoS, ContentType: r.ContentType,
		CorrelationData: r.Correlation, UserProps: props}
}

func (a *Agent) closePlugins(ctx context.Context) {
	if a.dispatch != nil {
		a.dispatch.Close(ctx)
	}
	if a.plugins != nil {
		a.plugins.Close(ctx)
	}
	if a.engine != nil {
		_ = a.engine.Close(context.Background())
	}
}

// Plugins returns the plugin registry, to install and list plugins.
func (a *Agent) Plugins() *plugins.Registry { return a.plugins }

// openUplink builds the uplink with its dialect.
func (a *Agent) openUplink() error {
	cfg := a.cfg
	u := cfg.Uplink
	target, err := ParseUplinkURL(u.URL)
	if err != nil {
		return fmt.Errorf("uplink.url: %w", err)
	}
	var tlsCfg *tls.Config
	if target.Scheme == "mqtts" {
		tlsCfg, err = loadTLS(u.TLS)
		if err != nil {
			return err
		}
	}
	clientID := u.ClientID
	if clientID == "" {
		clientID = "outpost-" + cfg.DeviceID
	}
	opts := uplink.Options{
		URL:            target,
		TLS:            tlsCfg,
		ClientID:       clientID,
		Username:       u.Username,
		Password:       []byte(u.Password),
		KeepAlive:      time.Duration(u.KeepAlive),
		ConnectTimeout: time.Duration(u.ConnectTimeout),
		BackoffMin:     time.Duration(u.BackoffMin),
		BackoffMax:     time.Duration(u.BackoffMax),
		StallTimeout:   time.Duration(u.StallTimeout),
		Source:         a.outbox,
		Logger:         a.log.With("component", "uplink"),
	}
	switch u.Dialect {
	case "azure":
		if err := a.openAzure(&opts, target.Hostname(), tlsCfg == nil); err != nil {
			return err
		}
	case "watson":
		if err := a.openWatson(&opts); err != nil {
			return err
		}
	default:
		d := generic.New(u.TopicPrefix, cfg.DeviceID)
		opts.Topic = func(m *storage.Message) string { return d.TelemetryTopic(m.Topic) }
	}
	a.uplink, err = uplink.New(opts)
	if err != nil {
		return err
	}
	if a.azure != nil {
		a.azure.Attach(a.uplink)
	}
	if a.watson != nil {
		a.watson.Attach(a.uplink)
	}
	return nil
}

// openWatson sets up the watson dialect and gives its hooks to the uplink.
func (a *Agent) openWatson(opts *uplink.Options) error {
	c := a.cfg.Uplink.Watson
	st, err := a.outbox.State("dm")
	if err != nil {
		return err
	}
	id := c.DeviceID
	if id == "" {
		id = a.cfg.DeviceID
	}
	children := make([]watson.Identity, len(c.Children))
	for i, ch := range c.Children {
		children[i] = watson.Identity{Type: ch.Type, ID: ch.ID}
	}
	manage := c.Org != watson.Quickstart
	if c.Manage != nil {
		manage = *c.Manage
	}
	actions, err := a.dmActions()
	if err != nil {
		return err
	}
	server, err := a.requestServer(c.Type, id)
	if err != nil {
		return err
	}
	d, err := watson.New(watson.Options{
		Org: c.Org, Type: c.Type, ID: id, Token: c.Token, Gateway: c.Gateway, Children: children,
		Manage: manage, Lifetime: time.Duration(c.Lifetime), DeviceInfo: c.Info, Metadata: c.Metadata,
		DeviceActions: orTrue(a.cfg.DM.DeviceActions), FirmwareActions: orTrue(a.cfg.DM.FirmwareActions),
		Bundles: c.Bundles, SelfBundles: a.rolloutBundles(), Installed: a.firmwareVersion(), EventFormat: c.Format,
		State: st, Server: server, Actions: actions,
		Local: func(topic string, payload []byte) error { return a.broker.PublishLocal(topic, payload, 1) },
		Log:   a.log.With("component", "watson"),
	})
	if err != nil {
		return err
	}
	a.watson = d
	opts.ClientID = d.ClientID()
	opts.Username, opts.Password = "", nil
	opts.Credentials = d.Credentials
	opts.Topic = d.TelemetryTopic
	opts.NoRetain = true
	opts.MaxPayload = watson.MaxPayload
	// Quickstart takes QoS 0 only, and no more than a message a second
	// (PROTOCOLS.md 1.4); the rate is the publishers' to keep.
	opts.QoS0 = c.Org == watson.Quickstart
	opts.Subscriptions = d.Subscriptions()
	opts.OnMessage = d.OnMessage
	opts.OnConnect = d.OnConnect
	opts.OnConnectionDown = d.OnConnectionDown
	return nil
}

func orTrue(b *bool) bool { return b == nil || *b }

// firmwareVersion is the firmware version running: dm.version_command's
// output, else dm.firmware_version.
func (a *Agent) firmwareVersion() string {
	argv := a.cfg.DM.VersionCommand
	if len(argv) == 0 {
		return a.cfg.DM.FirmwareVersion
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).Output()
	v := strings.TrimSpace(string(out))
	if err != nil || v == "" {
		a.log.Warn("dm.version_command gave no version: using dm.firmware_version", "error", err, "output", v)
		return a.cfg.DM.FirmwareVersion
	}
	return v
}

// dmActions are the operator's commands, with a blob name turned into the
// file's path for the install command.
func (a *Agent) dmActions() (watson.Actions, error) {
	if err := a.openBlobs(); err != nil {
		return nil, err
	}
	return blobActions{cmds: dm.Commands{"reboot": a.cfg.DM.RebootCommand, "factory_reset": a.cfg.DM.FactoryResetCommand,
		"install": a.cfg.DM.InstallCommand}, blobs: a.blobs, plugins: a.plugins}, nil
}

// openBlobs opens the staged files (firmware images) under the data
// directory.
func (a *Agent) openBlobs() error {
	if a.blobs != nil {
		return nil
	}
	var err error
	a.blobs, err = storage.OpenBlobs(filepath.Join(a.cfg.DataDir, "blobs"))
	return err
}

// blobActions runs the operator's commands, giving the install command the
// image's path: the blob of the plugin that serves firmware.update, which
// checked it.
type blobActions struct {
	cmds    dm.Commands
	blobs   *storage.Blobs
	plugins *plugins.Registry
}

func (b blobActions) Has(action string) bool { return b.cmds.Has(action) }

// Drop deletes a staged image once its update is over.
func (b blobActions) Drop(blob string) {
	if owner := b.plugins.Owner(abi.KindDMAction, dm.ActionUpdate); owner != "" {
		_ = b.blobs.Remove(plugins.BlobName(owner, blob))
	}
}

func (b blobActions) Run(ctx context.Context, action string, env map[string]string) error {
	if name, ok := env["OUTPOST_FIRMWARE_BLOB"]; ok {
		owner := b.plugins.Owner(abi.KindDMAction, dm.ActionUpdate)
		if owner == "" {
			return fmt.Errorf("dm: no plugin serves %s, which stages the image", dm.ActionUpdate)
		}
		p, err := b.blobs.Path(plugins.BlobName(owner, name))
		if err != nil {
			return err
		}
		env["OUTPOST_FIRMWARE_FILE"] = p
		delete(env, "OUTPOST_FIRMWARE_BLOB")
	}
	return b.cmds.Run(ctx, action, env)
}

// openAzure sets up the azure dialect and gives its hooks to the uplink.
func (a *Agent) openAzure(opts *uplink.Options, urlHost string, plain bool) error {
	c := a.cfg.Uplink.Azure
	var key []byte
	if c.SharedAccessKey != "" {
		var err error
		if key, err = base64.StdEncoding.DecodeString(c.SharedAccessKey); err != nil {
			return fmt.Errorf("uplink.azure.shared_access_key: %w", err)
		}
	}
	host := c.Host
	if host == "" {
		host = urlHost
	}
	dev := c.DeviceID
	if dev == "" {
		dev = a.cfg.DeviceID
	}
	journal, err := a.outbox.State("azure-journal")
	if err != nil {
		return err
	}
	if err := a.openTwin(); err != nil {
		return err
	}
	var dmState *storage.State
	var actions dm.Actions
	if orTrue(a.cfg.DM.FirmwareActions) {
		if dmState, err = a.outbox.State("dm"); err != nil {
			return err
		}
		if actions, err = a.dmActions(); err != nil {
			return err
		}
	}
	server, err := a.requestServer("", "")
	if err != nil {
		return err
	}
	d, err := azure.New(azure.Options{
		Host: host, DeviceID: dev, ModuleID: c.ModuleID, Key: key, Policy: c.SASPolicy,
		SendHost:    plain || net.ParseIP(urlHost) != nil || urlHost != host,
		SASLifetime: time.Duration(c.SASLifetime), DefaultCommand: c.DefaultCommand,
		MethodTimeout: time.Duration(c.MethodTimeout), CommandTimeout: time.Duration(c.CommandTimeout),
		Journal: journal, Twin: a.twin, Server: server, Agent: "outpost/" + Version,
		State: dmState, Actions: actions, Running: a.firmwareVersion(),
		Log: a.log.With("component", "azure"),
	})
	if err != nil {
		return err
	}
	a.azure = d
	opts.ClientID = d.ClientID()
	opts.Username, opts.Password = "", nil
	opts.Credentials = d.Credentials
	opts.Topic = d.TelemetryTopic
	opts.UserProps = d.TelemetryProps
	opts.NoRequestProps = true
	opts.NoRetain = true
	opts.QoS1 = true // a refused QoS 0 message is a DISCONNECT from the hub
	opts.Subscriptions = d.Subscriptions()
	opts.OnMessage = d.OnMessage
	opts.OnConnect = d.OnConnect
	opts.OnConnectionDown = d.OnConnectionDown
	opts.OnServerDisconnect = d.OnServerDisconnect
	opts.Refusal = d.Refusal
	return nil
}

// openTwin opens the cached twin, once.
func (a *Agent) openTwin() error {
	if a.twin != nil {
		return nil
	}
	st, err := a.outbox.State("twin")
	if err != nil {
		return err
	}
	a.twin, err = twin.Open(st)
	return err
}

func loadTLS(c TLSConfig) (*tls.Config, error) {
	t := &tls.Config{ServerName: c.ServerName, InsecureSkipVerify: c.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("uplink.tls.ca_file: %w", err)
		}
		t.RootCAs = x509.NewCertPool()
		if !t.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("uplink.tls.ca_file: %s holds no PEM certificate", c.CAFile)
		}
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("uplink.tls.cert_file: %w", err)
		}
		t.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

// Start serves the local broker and the admin API, and starts the uplink.
func (a *Agent) Start() error {
	if err := a.broker.Start(); err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	if sock := a.cfg.AdminSocket(); sock != "" {
		var err error
		if a.admin, err = admin.Listen(sock, a.plugins, a.observeHandler(), a.log.With("component", "admin")); err != nil {
			return fmt.Errorf("runtime: admin.socket: %w", err)
		}
	}
	if addr := a.cfg.Admin.HTTP; addr != "" {
		var err error
		if a.adminTCP, err = admin.ListenHTTP(addr, a.observeHandler(), a.log.With("component", "admin")); err != nil {
			return fmt.Errorf("runtime: admin.http: %w", err)
		}
	}
	a.startObserving()
	if a.twin != nil {
		ctx, cancel := context.WithCancel(context.Background())
		a.stopTwin, a.twinDone = cancel, make(chan struct{})
		go func() { defer close(a.twinDone); a.publishDesired(ctx) }()
	}
	if a.uplink != nil {
		if err := a.uplink.Start(); err != nil {
			return fmt.Errorf("runtime: %w", err)
		}
	} else {
		a.log.Warn("no uplink configured (uplink.url): messages are stored until one is")
	}
	for _, w := range a.cfg.Warnings() {
		if !strings.HasPrefix(w, "broker.") { // the broker logs its own
			a.log.Warn("configuration: " + w)
		}
	}
	st := a.outbox.Stats()
	a.obs.ready.Store(true)
	a.log.Info("outpost ready", "device_id", a.cfg.DeviceID, "data_dir", a.cfg.DataDir,
		"durability", a.cfg.Storage.Durability, "backlog", st.Messages)
	return nil
}

// BrokerAddrs returns the bound addresses of the local broker's listeners.
func (a *Agent) BrokerAddrs() []string { return a.broker.Addrs() }

// Status returns a snapshot of the agent's counters.
func (a *Agent) Status() Status {
	s := Status{Broker: a.broker.Stats(), Outbox: a.outbox.Stats()}
	if a.uplink != nil {
		us := a.uplink.Stats()
		s.Uplink = &us
	}
	return s
}

// Close shuts down in order: stop accepting local publishes, let the uplink
// collect the acknowledgements of what is in flight (bounded by ctx), close
// the store. Later calls return the first one's result.
func (a *Agent) Close(ctx context.Context) error {
	a.closeOnce.Do(func() { a.closeErr = a.close(ctx) })
	return a.closeErr
}

func (a *Agent) close(ctx context.Context) error {
	var errs []error
	a.obs.ready.Store(false)
	a.stopObserving()
	// The dialects first stop taking work, so that a firmware step the
	// shutdown cuts is resumed at the next start, not recorded as failed.
	if a.azure != nil {
		a.azure.Stop()
	}
	if a.watson != nil {
		a.watson.Stop()
	}
	for _, srv := range []*admin.Server{a.admin, a.adminTCP} {
		if srv != nil {
			if err := srv.Close(ctx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if a.stopTwin != nil {
		a.stopTwin()
		<-a.twinDone
	}
	if err := a.broker.Close(); err != nil {
		errs = append(errs, err)
	}
	a.closeRollout(ctx)
	a.closePlugins(ctx)
	if a.uplink != nil {
		if err := a.uplink.Close(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if a.azure != nil {
		a.azure.Close(ctx)
	}
	if a.watson != nil {
		a.watson.Close(ctx)
	}
	st := a.outbox.Stats()
	if err := a.outbox.Close(); err != nil {
		errs = append(errs, err)
	}
	a.log.Info("outpost stopped", "backlog", st.Messages)
	return errors.Join(errs...)
}
