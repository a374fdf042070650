// Package rollout serves remote plugin rollout: requests from the cloud,
// through the hub dialect, that install, upgrade, roll back, remove and
// list the wasm plugins of the agent. The host serves them itself, never a
// plugin: on Azure they are the direct methods pluginInstall,
// pluginRollback, pluginRemove and pluginList; on Watson the custom DM
// actions of the bundle outpost-plugins (install, rollback, remove, list).
//
// An install downloads the module (and the manifest, when given by URI)
// from the allowed hosts within a size, checks the module's sha256 against
// the request's before anything else, and hands manifest, module and
// signature to the plugin registry, which verifies the signature when
// trust keys are configured, loads the new version (its first instance
// must start) and only then makes it serve. Until that moment the old
// version serves; if any step fails, it keeps serving and the answer says
// why.
package rollout

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
)

// Azure direct methods of the rollout.
const (
	MethodInstall  = "pluginInstall"
	MethodRollback = "pluginRollback"
	MethodRemove   = "pluginRemove"
	MethodList     = "pluginList"
)

// Bundle is the Watson custom action bundle of the rollout; its actions
// are ActionInstall, ActionRollback, ActionRemove and ActionList.
const Bundle = "outpost-plugins"

// Watson custom actions of Bundle.
const (
	ActionInstall  = "install"
	ActionRollback = "rollback"
	ActionRemove   = "remove"
	ActionList     = "list"
)

// Defaults of Options.
const (
	DefaultMaxBytes = 32 << 20         // a module
	MaxManifest     = 64 << 10         // a manifest downloaded by URI
	DefaultTimeout  = 10 * time.Minute // an operation whose request has no deadline
)

// Registry is what the rollout needs of the plugin registry
// (*plugins.Registry).
type Registry interface {
	Install(ctx context.Context, manifest, wasm, sig []byte) (plugins.Info, error)
	Rollback(ctx context.Context, name string) (plugins.Info, error)
	Remove(ctx context.Context, name string) error
	List() []plugins.Info
}

// Server serves requests: the dispatcher, which the rollout stands in
// front of.
type Server interface {
	Serve(c dispatch.Call, done func(*sandbox.Response))
}

// Options configure a Rollout.
type Options struct {
	Registry Registry
	// Next serves every request that is not the rollout's.
	Next Server
	// Hosts are the hosts modules and manifests may come from (redirects
	// included); empty = none.
	Hosts plugins.HostList
	// MaxBytes bounds a module's download. Default DefaultMaxBytes.
	MaxBytes int64
	// Timeout bounds an operation whose request carries no deadline.
	// Default DefaultTimeout.
	Timeout time.Duration
	// DeviceType and DeviceID are the Watson identity whose custom actions
	// the rollout serves; a gateway's children have no plugins of their
	// own, and their rollout actions are answered 404. Empty = any.
	DeviceType, DeviceID string
	// Client is the HTTP client of the downloads; nil = the plugins
	// downloader's default.
	Client *http.Client
	Log    *slog.Logger // nil = discard
}

// Rollout serves the rollout's requests and passes the others on. Its
// methods are safe for concurrent use; one operation that changes the
// plugins runs at a time (another is answered 409). Close it after the
// dialects stop, before the registry closes.
type Rollout struct {
	o   Options
	log *slog.Logger
	dl  *plugins.Downloader

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex // orders wg.Add before Close's Wait
	closed bool
	busy   chan struct{} // buffered 1: an operation that changes the plugins runs
}

// New returns a Rollout in front of o.Next.
func New(o Options) (*Rollout, error) {
	if o.Registry == nil || o.Next == nil {
		return nil, errors.New("rollout: Registry and Next are required")
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Rollout{o: o, log: log.With("component", "rollout"), dl: &plugins.Downloader{Client: o.Client},
		busy: make(chan struct{}, 1)}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r, nil
}

// Close ends the operations in progress (their answer is 503) and waits,
// bounded by ctx, until they have answered. Requests after Close are
// answered 503.
func (r *Rollout) Close(ctx context.Context) {
	r.mu.Lock()
	r.closed = true
	r.cancel()
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// op is a rollout operation: install, rollback, remove or list.
type op string

// opOf tells whether a call is the rollout's, and which operation.
func opOf(m abi.Meta) (op, bool) {
	switch m.Kind {
	case abi.KindMethod:
		switch m.Name {
		case MethodInstall:
			return ActionInstall, true
		case MethodRollback:
			return ActionRollback, true
		case MethodRemove:
			return ActionRemove, true
		case MethodList:
			return ActionList, true
		}
	case abi.KindDMAction:
		if a, ok := strings.CutPrefix(m.Name, "custom:"+Bundle+":"); ok {
			return op(a), true
		}
	}
	return "", false
}

// Serve serves a rollout request itself, in the background, and passes any
// other to Next. done is called once.
func (r *Rollout) Serve(c dispatch.Call, done func(*sandbox.Response)) {
	o, ok := opOf(c.Meta)
	if !ok {
		r.o.Next.Serve(c, done)
		return
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		done(answer(c.Meta.Kind, result{status: abi.StatusUnavailable, err: errors.New("rollout: the agent is stopping")}))
		return
	}
	r.wg.Add(1)
	r.mu.Unlock()
	go func() {
		defer r.wg.Done()
		res := r.serve(c, o)
		log := r.log.With("op", string(o), "kind", c.Meta.Kind.String(), "status", int(res.status))
		if res.err != nil {
			log.Warn("plugin rollout refused", "error", res.err)
		} else {
			log.Info("plugin rollout done", "message", res.msg)
		}
		done(answer(c.Meta.Kind, res))
	}()
}

// result is an operation's outcome: a status, and either an error or a
// message and the JSON body of a method's answer.
type result struct {
	status abi.Status
	err    error
	msg    string // Watson's message
	body   any    // Azure's answer
}

// answer encodes a result for the dialect: a method's payload is JSON,
// {"error": ...} on failure; a DM action's is its message, plain text.
func answer(kind abi.Kind, res result) *sandbox.Response {
	if kind == abi.KindDMAction {
		msg := res.msg
		if res.err != nil {
			msg = res.err.Error()
		}
		return &sandbox.Response{Status: res.status, Payload: []byte(msg), ContentType: "text/plain; charset=utf-8"}
	}
	body := res.body
	if res.err != nil {
		body = map[string]string{"error": res.err.Error()}
	}
	b, _ := json.Marshal(body)
	return &sandbox.Response{Status: res.status, Payload: b, ContentType: "application/json"}
}

func fail(st abi.Status, format string, a ...any) result {
	return result{status: st, err: fmt.Errorf("rollout: "+format, a...)}
}

// serve runs one operation within the request's deadline.
func (r *Rollout) serve(c dispatch.Call, o op) result {
	if c.Meta.Kind == abi.KindDMAction && !r.self(c.Meta.Props) {
		return fail(abi.StatusNotFound, "plugins belong to the gateway %s:%s: send %s/%s to it", r.o.DeviceType, r.o.DeviceID, Bundle, o)
	}
	p, err := ParseParams(c.Meta.Kind, c.Payload)
	if err != nil {
		return fail(abi.StatusBadRequest, "%v", err)
	}
	if o == ActionList {
		return r.list()
	}
	if o != ActionInstall && o != ActionRollback && o != ActionRemove {
		return fail(abi.StatusNotImplemented, "action %q: want %s, %s, %s or %s", o, ActionInstall, ActionRollback, ActionRemove, ActionList)
	}
	if p.Name == "" {
		return fail(abi.StatusBadRequest, "the plugin's name is required")
	}
	select {
	case r.busy <- struct{}{}:
		defer func() { <-r.busy }()
	default:
		return fail(abi.StatusConflict, "another plugin rollout is in progress: try again when it has answered")
	}
	timeout := c.Meta.Deadline
	if timeout <= 0 {
		timeout = r.o.Timeout
	} else {
		// Leave time for the answer to reach the hub before it gives up.
		timeout -= min(5*time.Second, timeout/10)
	}
	ctx, cancel := context.WithTimeout(r.ctx, timeout)
	defer cancel()
	switch o {
	case ActionInstall:
		return r.install(ctx, p)
	case ActionRollback:
		if p.Version != "" {
			// A retried rollback must not roll forward again.
			for _, in := range r.o.Registry.List() {
				if in.Name == p.Name && in.Version == p.Version {
					return done(fmt.Sprintf("%s is already at version %s", in.Name, in.Version), in)
				}
			}
		}
		info, err := r.o.Registry.Rollback(ctx, p.Name)
		if err != nil {
			return registryFail(r.ctx, ctx, "rollback of "+p.Name, err, true)
		}
		return done(fmt.Sprintf("rolled %s back to version %s", info.Name, info.Version), info)
	default:
		if err := r.o.Registry.Remove(ctx, p.Name); err != nil {
			return registryFail(r.ctx, ctx, "remove "+p.Name, err, false)
		}
		return done("removed "+p.Name, map[string]string{"name": p.Name, "removed": "true"})
	}
}

// self tells whether a DM action's device is the one the rollout serves.
func (r *Rollout) self(props []abi.Property) bool {
	for _, p := range props {
		switch {
		case p.Key == "device-type" && r.o.DeviceType != "" && p.Value != r.o.DeviceType,
			p.Key == "device-id" && r.o.DeviceID != "" && p.Value != r.o.DeviceID:
			return false
		}
	}
	return true
}

// Answer is the JSON answer of a successful install or rollback (Azure).
type Answer struct {
	Name     string `json:"name"`
	Version  string `json:"version"`
	SHA256   string `json:"sha256"`
	Previous string `json:"previous,omitempty"` // the version it replaced
	Signed   bool   `json:"signed"`
}

func done(msg string, body any) result {
	if info, ok := body.(plugins.Info); ok {
		body = Answer{Name: info.Name, Version: info.Version, SHA256: info.SHA256, Signed: info.Signed}
	}
	return result{status: abi.StatusOK, msg: msg, body: body}
}

// list answers the installed plugins: Azure a JSON list of {name,
// version, sha256, signed}, Watson "name version, ..." (the DM message).
func (r *Rollout) list() result {
	infos := r.o.Registry.List()
	out := make([]Answer, len(infos))
	names := make([]string, len(infos))
	for i, in := range infos {
		out[i] = Answer{Name: in.Name, Version: in.Version, SHA256: in.SHA256, Signed: in.Signed}
		names[i] = in.Name + " " + in.Version
	}
	msg := strings.Join(names, ", ")
	if msg == "" {
		msg = "no plugins installed"
	}
	return result{status: abi.StatusOK, msg: msg, body: out}
}

// install fetches, verifies and installs a plugin.
func (r *Rollout) install(ctx context.Context, p Params) result {
	if err := p.checkInstall(); err != nil {
		return fail(abi.StatusBadRequest, "%v", err)
	}
	var man []byte
	if p.ManifestURI != "" {
		b, res, ok := r.fetch(ctx, "manifest", p.ManifestURI, MaxManifest)
		if !ok {
			return res
		}
		sum := sha256.Sum256(b)
		if got := hex.EncodeToString(sum[:]); !strings.EqualFold(got, p.ManifestSHA256) {
			return fail(abi.StatusUnprocessable, "%s: the manifest's sha256 is %s, the request says %s: refused, nothing changed", p.Name, got, strings.ToLower(p.ManifestSHA256))
		}
		man = b
	} else {
		man = []byte(p.Manifest)
	}
	wasm, res, ok := r.fetch(ctx, "module", p.URI, r.o.MaxBytes)
	if !ok {
		return res
	}
	sum := sha256.Sum256(wasm)
	if got := hex.EncodeToString(sum[:]); !strings.EqualFold(got, p.SHA256) {
		return fail(abi.StatusUnprocessable, "%s: the module's sha256 is %s, the request says %s: refused, nothing changed", p.Name, got, strings.ToLower(p.SHA256))
	}
	m, err := plugins.ParseManifest(man)
	if err != nil {
		return fail(abi.StatusBadRequest, "%s: %v", p.Name, err)
	}
	switch {
	case m.Name != p.Name:
		return fail(abi.StatusBadRequest, "the manifest is of plugin %q, the request names %q", m.Name, p.Name)
	case p.Version != "" && m.Version != p.Version:
		return fail(abi.StatusBadRequest, "%s: the manifest is of version %q, the request names %q", p.Name, m.Version, p.Version)
	case !strings.EqualFold(m.SHA256, p.SHA256):
		return fail(abi.StatusUnprocessable, "%s: the manifest names module sha256 %s, the request %s: refused, nothing changed", p.Name, m.SHA256, strings.ToLower(p.SHA256))
	}
	prev := ""
	for _, in := range r.o.Registry.List() {
		if in.Name == p.Name {
			prev = in.Version
			if strings.EqualFold(in.SHA256, m.SHA256) && in.Version == m.Version {
				// A retry (an answer lost to a timeout): nothing to do, and
				// the version kept for rollback stays the one before.
				res := done(fmt.Sprintf("%s %s is already installed", in.Name, in.Version), in)
				return res
			}
		}
	}
	info, err := r.o.Registry.Install(ctx, man, wasm, []byte(p.Signature))
	if err != nil {
		return registryFail(r.ctx, ctx, "install of "+p.Name+" "+m.Version, err, true)
	}
	res = done(fmt.Sprintf("installed %s %s", info.Name, info.Version), info)
	if prev != "" {
		res.msg += " (was " + prev + ")"
		a := res.body.(Answer)
		a.Previous = prev
		res.body = a
	}
	return res
}

// registryFail maps a registry's refusal to a status (base is the
// rollout's context, op the operation's). Whatever it is, the
// version that served before still serves, which the message says when
// keeps.
func registryFail(base, op context.Context, what string, err error, keeps bool) result {
	var le *sandbox.LoadError
	what += " refused"
	if keeps {
		what += ", the version before keeps serving"
	}
	st := abi.StatusUnprocessable // a manifest, signature or module the registry refused
	switch {
	case base.Err() != nil:
		st = abi.StatusUnavailable
	case op.Err() != nil || errors.Is(err, context.DeadlineExceeded):
		return result{status: abi.StatusTimeout, err: fmt.Errorf("rollout: %s: the request's time ran out: %w", what, err)}
	case errors.Is(err, plugins.ErrBadName):
		st = abi.StatusBadRequest
	case errors.Is(err, plugins.ErrNotInstalled):
		st = abi.StatusNotFound
	case errors.Is(err, plugins.ErrNoPrevious), errors.Is(err, plugins.ErrClaimed):
		st = abi.StatusConflict
	case errors.As(err, &le):
		reason, _, _ := strings.Cut(le.Reason, "\n") // not the wasm stack trace
		return result{status: st, err: fmt.Errorf("rollout: %s: the module does not load: %s", what, reason)}
	}
	return result{status: st, err: fmt.Errorf("rollout: %s: %w", what, err)}
}

// fetch downloads uri within max bytes from the allowed hosts. On failure
// it returns the result to answer.
func (r *Rollout) fetch(ctx context.Context, what, uri string, max int64) ([]byte, result, bool) {
	if u, err := url.Parse(uri); err == nil && !r.o.Hosts.Allows(u) {
		return nil, fail(403, "download of the %s %s: host %q is not in plugins.rollout.hosts: nothing changed", what, sandbox.RedactURL(uri), u.Host), false
	}
	var mem memBlobs
	_, err := r.dl.Get(ctx, uri, &mem, what, r.o.Hosts, max, nil)
	if err == nil {
		return mem.b, result{}, true
	}
	st := abi.Status(502) // the server did not give the file
	switch {
	case r.ctx.Err() != nil:
		st = abi.StatusUnavailable
	case errors.Is(err, sandbox.ErrDenied):
		st = 403 // a redirect elsewhere
		err = fmt.Errorf("%w (plugins.rollout.hosts)", err)
	case errors.Is(err, sandbox.ErrBadArg):
		st = abi.StatusBadRequest
	case errors.Is(err, sandbox.ErrLimit):
		st = abi.StatusRequestTooLarge
	case ctx.Err() != nil:
		st = abi.StatusTimeout
	}
	return nil, result{status: st, err: fmt.Errorf("rollout: download of the %s %s: %w: nothing changed", what, sandbox.RedactURL(uri), err)}, false
}

// memBlobs holds one download in memory: modules are bounded, and the
// registry takes them as bytes.
type memBlobs struct {
	b []byte
}

func (m *memBlobs) Size(string) (int64, error) { return int64(len(m.b)), nil }
func (m *memBlobs) ReadAt(_ string, p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, nil
	}
	return copy(p, m.b[off:]), nil
}
func (m *memBlobs) Remove(string) error { m.b = nil; return nil }
func (m *memBlobs) Create(string) (plugins.BlobWriter, error) {
	return &memWriter{m: m}, nil
}

type memWriter struct {
	m   *memBlobs
	buf []byte
}

func (w *memWriter) Write(p []byte) (int, error) { w.buf = append(w.buf, p...); return len(p), nil }
func (w *memWriter) Commit() error               { w.m.b = w.buf; return nil }
func (w *memWriter) Abort()                      { w.buf = nil }

// Params are a rollout request's parameters: on Azure the method's JSON
// payload, on Watson the custom action's fields (each value a string).
type Params struct {
	// Name is the plugin's name; required by every operation but list.
	Name string `json:"name"`
	// Version, when set, must be the manifest's.
	Version string `json:"version"`
	// URI is the module's http(s) URI.
	URI string `json:"uri"`
	// SHA256 is the module's, 64 hex digits: required.
	SHA256 string `json:"sha256"`
	// Manifest is the manifest, inline YAML; or ManifestURI, its http(s)
	// URI. One of the two is required.
	Manifest    string `json:"manifest"`
	ManifestURI string `json:"manifestUri"`
	// ManifestSHA256 is the sha256 of the manifest fetched from
	// ManifestURI (64 hex digits): required with it, so that the manifest,
	// which grants the capabilities, is bound to the request as the module
	// is.
	ManifestSHA256 string `json:"manifestSha256"`
	// Signature is the manifest's ed25519 signature, base64 (the .sig
	// file's content); required when the agent has trust keys.
	Signature string `json:"signature"`
}

// ParseParams reads a request's parameters: a JSON object (a method's
// payload), or a Watson custom action's {"fields": [{"field", "value"}]}.
// An empty payload is no parameters.
func ParseParams(kind abi.Kind, payload []byte) (Params, error) {
	var p Params
	if len(strings.TrimSpace(string(payload))) == 0 || string(payload) == "null" {
		return p, nil
	}
	obj := map[string]json.RawMessage{}
	if err := json.Unmarshal(payload, &obj); err != nil {
		return p, fmt.Errorf("the parameters are not a JSON object: %v", err)
	}
	if fields, ok := obj["fields"]; ok && kind == abi.KindDMAction {
		var list []struct {
			Field string          `json:"field"`
			Value json.RawMessage `json:"value"`
		}
		if err := json.Unmarshal(fields, &list); err != nil {
			return p, fmt.Errorf("fields: want [{\"field\": name, \"value\": string}]: %v", err)
		}
		obj = map[string]json.RawMessage{}
		for _, f := range list {
			obj[f.Field] = f.Value
		}
	}
	known := map[string]*string{"name": &p.Name, "version": &p.Version, "uri": &p.URI, "sha256": &p.SHA256,
		"manifest": &p.Manifest, "manifestUri": &p.ManifestURI, "manifestSha256": &p.ManifestSHA256, "signature": &p.Signature}
	for k, v := range obj {
		dst, ok := known[k]
		if !ok {
			return p, fmt.Errorf("unknown parameter %q: want name, version, uri, sha256, manifest, manifestUri, manifestSha256, signature", k)
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return p, fmt.Errorf("parameter %s: want a string", k)
		}
	}
	return p, nil
}

// checkInstall checks the parameters of an install.
func (p Params) checkInstall() error {
	var errs []error
	if err := httpURI("uri", p.URI); err != nil {
		errs = append(errs, err)
	}
	if b, err := hex.DecodeString(p.SHA256); err != nil || len(b) != sha256.Size {
		errs = append(errs, fmt.Errorf("sha256: %q: want the module's 64 hex digits", p.SHA256))
	}
	switch {
	case (p.Manifest == "") == (p.ManifestURI == ""):
		errs = append(errs, errors.New("manifest: want either manifest (inline YAML) or manifestUri"))
	case p.ManifestURI != "":
		if err := httpURI("manifestUri", p.ManifestURI); err != nil {
			errs = append(errs, err)
		}
		if b, err := hex.DecodeString(p.ManifestSHA256); err != nil || len(b) != sha256.Size {
			errs = append(errs, fmt.Errorf("manifestSha256: %q: want the manifest's 64 hex digits (required with manifestUri)", p.ManifestSHA256))
		}
	case p.ManifestSHA256 != "":
		errs = append(errs, errors.New("manifestSha256: only with manifestUri"))
	}
	if len(errs) == 0 {
		return nil
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return errors.New(strings.Join(msgs, "; "))
}

func httpURI(key, s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%s: %q: want an http or https URI", key, sandbox.RedactURL(s))
	}
	return nil
}
