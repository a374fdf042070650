package plugins

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/router"
)

// Files of an installed plugin, in Dir/<name>/.
const (
	fileManifest = "manifest.yaml"
	fileModule   = "module.wasm"
	fileSig      = "manifest.sig"
	dirPrevious  = "previous" // the version before, kept for rollback
)

// Options configure a Registry.
type Options struct {
	Dir    string          // where installed plugins live; loaded at Open
	Engine *sandbox.Engine // shared compilation cache
	Trust  TrustKeys       // if set, only plugins signed by one of these load
	Log    *slog.Logger
	// KV opens a plugin's key/value namespace (capability kv); nil = the
	// capability is not available.
	KV func(plugin string, quota int64) (sandbox.KVStore, error)
	// Publish publishes for a plugin (capability publish) once the topic
	// passed the plugin's publish_topics; nil = not available.
	Publish sandbox.Publisher
	// Blobs are the staged blobs (capabilities blob and http); nil = not
	// available.
	Blobs BlobStore
	// Download fetches for the http capability, into Blobs; nil = not
	// available.
	Download *Downloader
	// MaxHTTPBytes is the operator's cap on one download, whatever a
	// manifest's limits.http_bytes; 0 = the manifest's.
	MaxHTTPBytes int64
	// Progress receives the progress reports of plugins granted dm; nil =
	// not available.
	Progress sandbox.Progress
	// Twin is the device state for plugins granted twin; nil = not
	// available.
	Twin sandbox.TwinAccess
	// Reserved are names the agent serves itself (firmwareUpdate, the
	// plugin rollout methods): no plugin may claim them.
	Reserved []HandlerSpec
}

// Registry holds the installed plugins and which serves each name. Its
// methods are safe for concurrent use.
type Registry struct {
	opts Options
	log  *slog.Logger

	installMu sync.Mutex // serializes install and remove
	closed    bool       // by Close; under installMu

	mu      sync.RWMutex
	plugins map[string]*version
	claims  map[claim]string // (kind, name) -> plugin
}

type claim struct {
	kind abi.Kind
	name string
}

// version is one loaded version of a plugin. calls counts the calls that
// hold it, so that an upgrade closes it only after they finish.
type version struct {
	m      *Manifest
	p      *sandbox.Plugin
	calls  sync.WaitGroup
	signed bool // its signature was verified against the trust keys
}

// Info describes an installed plugin.
type Info struct {
	Name         string        `json:"name"`
	Version      string        `json:"version"`
	SHA256       string        `json:"sha256"`
	Handlers     []HandlerSpec `json:"handlers"`
	Capabilities []string      `json:"capabilities"`
	Signed       bool          `json:"signed"`
	Stats        sandbox.Stats `json:"stats"`
}

// Open loads every plugin installed in opts.Dir. A plugin that fails to
// load is logged and skipped: the others still serve.
func Open(ctx context.Context, opts Options) (*Registry, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if err := os.MkdirAll(opts.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("plugins: %w", err)
	}
	r := &Registry{opts: opts, log: opts.Log.With("component", "plugins"), plugins: map[string]*version{}, claims: map[claim]string{}}
	if err := recoverDirs(opts.Dir); err != nil {
		return nil, fmt.Errorf("plugins: %w", err)
	}
	entries, err := os.ReadDir(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("plugins: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() || e.Name()[0] == '.' {
			continue
		}
		dir := filepath.Join(opts.Dir, e.Name())
		v, err := r.loadDir(ctx, dir)
		if err == nil {
			err = r.swap(v)
		}
		if err != nil {
			r.log.Error("plugin not loaded", "dir", dir, "error", err)
			continue
		}
		r.log.Info("plugin loaded", "plugin", v.m.Name, "version", v.m.Version)
	}
	return r, nil
}

func (r *Registry) loadDir(ctx context.Context, dir string) (*version, error) {
	man, err := os.ReadFile(filepath.Join(dir, fileManifest))
	if err != nil {
		return nil, err
	}
	wasm, err := os.ReadFile(filepath.Join(dir, fileModule))
	if err != nil {
		return nil, err
	}
	sig, err := os.ReadFile(filepath.Join(dir, fileSig))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	v, err := r.prepare(ctx, man, wasm, sig)
	if err != nil {
		return nil, err
	}
	if v.m.Name != filepath.Base(dir) {
		_ = v.p.Close(ctx)
		return nil, fmt.Errorf("plugins: %s holds plugin %q", dir, v.m.Name)
	}
	return v, nil
}

// prepare checks a plugin and loads it into the sandbox, not yet serving.
func (r *Registry) prepare(ctx context.Context, manifest, wasm, sig []byte) (*version, error) {
	m, err := ParseManifest(manifest)
	if err != nil {
		return nil, err
	}
	if err := m.CheckModule(wasm); err != nil {
		return nil, err
	}
	if len(r.opts.Trust) > 0 {
		if err := r.opts.Trust.Verify(m, sig); err != nil {
			return nil, err
		}
	}
	cfg, err := m.sandboxConfig()
	if err != nil {
		return nil, err
	}
	cfg.Log = r.opts.Log
	if err := r.grant(m, &cfg); err != nil {
		return nil, err
	}
	p, err := r.opts.Engine.Load(ctx, wasm, cfg)
	if err != nil {
		return nil, err
	}
	return &version{m: m, p: p, signed: len(r.opts.Trust) > 0}, nil
}

// grant gives the sandbox the capabilities the manifest asks for.
func (r *Registry) grant(m *Manifest, cfg *sandbox.Config) error {
	if m.Has(CapKV) {
		if r.opts.KV == nil {
			return fmt.Errorf("plugins: %s: capability kv is not available in this agent", m.Name)
		}
		quota := int64(m.Limits.KVQuota)
		if quota == 0 {
			quota = DefaultKVQuota
		}
		kv, err := r.opts.KV(m.Name, quota)
		if err != nil {
			return fmt.Errorf("plugins: %s: %w", m.Name, err)
		}
		cfg.KV = kv
	}
	if m.Has(CapPublish) {
		if r.opts.Publish == nil {
			return fmt.Errorf("plugins: %s: capability publish is not available in this agent", m.Name)
		}
		allowed, err := router.New([]router.Rule{{Route: "allowed", Match: m.PublishTopics}})
		if err != nil {
			return fmt.Errorf("plugins: %s: publish_topics: %w", m.Name, err)
		}
		publish := r.opts.Publish
		cfg.Publish = func(ctx context.Context, topic string, payload []byte, qos byte) error {
			if topic == "" || strings.ContainsAny(topic, "+#\x00") {
				return fmt.Errorf("%w: topic %q", sandbox.ErrBadArg, topic)
			}
			if _, ok := allowed.Match(topic); !ok {
				return fmt.Errorf("%w: %q is not in publish_topics", sandbox.ErrDenied, topic)
			}
			return publish(ctx, topic, payload, qos)
		}
	}
	if (m.Has(CapBlob) || m.Has(CapHTTP)) && r.opts.Blobs == nil {
		return fmt.Errorf("plugins: %s: capabilities blob and http are not available in this agent", m.Name)
	}
	// A plugin's blobs are its own: their names are prefixed with the
	// plugin's, so that no other plugin can read, replace or delete an
	// image it verified.
	own := PluginBlobs(r.opts.Blobs, m.Name)
	if m.Has(CapBlob) {
		cfg.Blobs = own
	}
	if m.Has(CapHTTP) {
		if r.opts.Download == nil {
			return fmt.Errorf("plugins: %s: capability http is not available in this agent", m.Name)
		}
		max := int64(m.Limits.HTTPBytes)
		if max == 0 {
			max = DefaultHTTPBytes
		}
		if r.opts.MaxHTTPBytes > 0 {
			max = min(max, r.opts.MaxHTTPBytes)
		}
		hosts, dl := m.HTTPHosts, r.opts.Download
		cfg.HTTPGet = func(ctx context.Context, url, blob string, progress func(int, string)) (int64, error) {
			return dl.Get(ctx, url, own, blob, hosts, max, progress)
		}
	}
	if m.Has(CapDM) {
		if r.opts.Progress == nil {
			return fmt.Errorf("plugins: %s: capability dm is not available in this agent", m.Name)
		}
		cfg.Progress = r.opts.Progress
	}
	if m.Has(CapTwin) {
		if r.opts.Twin == nil {
			return fmt.Errorf("plugins: %s: capability twin is not available in this agent", m.Name)
		}
		cfg.Twin = r.opts.Twin
	}
	return nil
}

// Errors of the registry, for callers to tell apart (the admin API's
// statuses).
var (
	ErrBadName      = errors.New("not a plugin name")
	ErrNotInstalled = errors.New("not installed")
	ErrNoPrevious   = errors.New("no previous version to roll back to")
	ErrClaimed      = errors.New("a name already served")
)

// DefaultKVQuota is a plugin's key/value quota when its manifest sets none.
const DefaultKVQuota = 1 << 20

// conflict is the error when another plugin serves a name m claims. r.mu
// must be held.
func (r *Registry) conflict(m *Manifest) error {
	for _, h := range m.Handlers {
		for _, res := range r.opts.Reserved {
			if res.claim() == h.claim() {
				return fmt.Errorf("plugins: %s: %w: %s %q is served by the agent itself", m.Name, ErrClaimed, h.Kind, h.Name)
			}
		}
		if owner, ok := r.claims[h.claim()]; ok && owner != m.Name {
			return fmt.Errorf("plugins: %s: %w: %s %q is already served by plugin %s", m.Name, ErrClaimed, h.Kind, h.Name, owner)
		}
	}
	return nil
}

// swap makes v the serving version of its plugin, if its claims conflict
// with no other plugin, and closes the version it replaces once the calls
// holding it finish.
func (r *Registry) swap(v *version) error {
	r.mu.Lock()
	if err := r.conflict(v.m); err != nil {
		r.mu.Unlock()
		_ = v.p.Close(context.Background())
		return err
	}
	old := r.plugins[v.m.Name]
	if old != nil {
		for _, h := range old.m.Handlers {
			delete(r.claims, h.claim())
		}
	}
	for _, h := range v.m.Handlers {
		r.claims[h.claim()] = v.m.Name
	}
	r.plugins[v.m.Name] = v
	r.mu.Unlock()
	if old != nil {
		go old.retire(context.Background())
	}
	return nil
}

// retire closes a version after the calls holding it, or, when ctx ends
// first, ends those calls (they answer 504) and then closes it.
func (v *version) retire(ctx context.Context) {
	done := make(chan struct{})
	go func() { v.calls.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		v.p.Abort()
		<-done
	}
	_ = v.p.Close(context.Background())
}

// Install checks a plugin (manifest, module, signature when trust keys are
// set), loads it (its first instance must start), and then, atomically,
// makes it serve in place of the version installed before, which is kept
// for Rollback. Calls already running finish on the old version. Nothing
// changes if any step fails.
func (r *Registry) Install(ctx context.Context, manifest, wasm, sig []byte) (Info, error) {
	r.installMu.Lock()
	defer r.installMu.Unlock()
	return r.install(ctx, manifest, wasm, sig)
}

// install is Install with installMu held.
func (r *Registry) install(ctx context.Context, manifest, wasm, sig []byte) (Info, error) {
	if r.closed {
		return Info{}, errors.New("plugins: the registry is closed")
	}
	v, err := r.prepare(ctx, manifest, wasm, sig)
	if err != nil {
		return Info{}, err
	}
	// Claims are checked before anything is written, and again in swap.
	r.mu.RLock()
	err = r.conflict(v.m)
	r.mu.RUnlock()
	if err != nil {
		_ = v.p.Close(ctx)
		return Info{}, err
	}
	if err := r.persist(v.m.Name, manifest, wasm, sig); err != nil {
		_ = v.p.Close(ctx)
		return Info{}, err
	}
	if err := r.swap(v); err != nil {
		return Info{}, err
	}
	r.log.Info("plugin installed", "plugin", v.m.Name, "version", v.m.Version, "signed", v.signed)
	return v.info(), nil
}

// persist writes a plugin's files: the new version, with a copy of the
// current one in previous/, in a temporary directory, synced and renamed
// into place. A crash leaves the current version in place, or in
// .{name}-old, which Open restores.
func (r *Registry) persist(name string, manifest, wasm, sig []byte) error {
	dir := filepath.Join(r.opts.Dir, name)
	tmp, err := os.MkdirTemp(r.opts.Dir, "."+name+"-new-")
	if err != nil {
		return fmt.Errorf("plugins: %w", err)
	}
	defer os.RemoveAll(tmp)
	files := map[string][]byte{fileManifest: manifest, fileModule: wasm}
	if len(sig) > 0 {
		files[fileSig] = sig
	}
	for f, b := range files {
		if err := writeSync(filepath.Join(tmp, f), b); err != nil {
			return fmt.Errorf("plugins: %w", err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, fileManifest)); err == nil {
		// Keep a copy of the current version as previous/.
		prev := filepath.Join(tmp, dirPrevious)
		if err := os.Mkdir(prev, 0o750); err != nil {
			return fmt.Errorf("plugins: %w", err)
		}
		for _, f := range []string{fileManifest, fileModule, fileSig} {
			b, err := os.ReadFile(filepath.Join(dir, f))
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err == nil {
				err = writeSync(filepath.Join(prev, f), b)
			}
			if err != nil {
				return fmt.Errorf("plugins: %w", err)
			}
		}
		if err := syncDir(prev); err != nil {
			return err
		}
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	old := oldDir(r.opts.Dir, name)
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("plugins: %w", err)
	}
	if err := os.Rename(dir, old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("plugins: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		_ = os.Rename(old, dir)
		return fmt.Errorf("plugins: %w", err)
	}
	// The new version is in place: from here the install has happened,
	// whatever fails, and Open tidies what is left.
	if err := syncDir(r.opts.Dir); err != nil {
		r.log.Warn("plugin installed, but syncing the plugin directory failed", "plugin", name, "error", err)
	}
	if err := os.RemoveAll(old); err != nil {
		r.log.Warn("plugin installed, but removing the replaced version failed", "plugin", name, "error", err)
	}
	return nil
}

// oldDir is where a plugin's version being replaced waits.
func oldDir(root, name string) string { return filepath.Join(root, "."+name+"-old") }

// delDir is where a removed plugin's files wait to be deleted.
func delDir(root, name string) string { return filepath.Join(root, "."+name+"-del") }

// recoverDirs finishes or undoes what a crash interrupted: a version being
// replaced comes back if the new one did not land; unfinished new versions
// and removed plugins are deleted.
func recoverDirs(root string) error {
	entries, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	for _, e := range entries {
		n := e.Name()
		switch {
		case !e.IsDir() || n[0] != '.':
		case strings.HasSuffix(n, "-old"):
			name := strings.TrimSuffix(n[1:], "-old")
			if _, err := os.Stat(filepath.Join(root, name)); errors.Is(err, os.ErrNotExist) {
				if err := os.Rename(filepath.Join(root, n), filepath.Join(root, name)); err != nil {
					return err
				}
				continue
			}
			if err := os.RemoveAll(filepath.Join(root, n)); err != nil {
				return err
			}
		case strings.HasSuffix(n, "-del"), strings.Contains(n, "-new-"):
			if err := os.RemoveAll(filepath.Join(root, n)); err != nil {
				return err
			}
		}
	}
	return syncDir(root)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("plugins: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("plugins: sync %s: %w", dir, err)
	}
	return nil
}

func writeSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Rollback reinstalls the version kept from before the last install.
func (r *Registry) Rollback(ctx context.Context, name string) (Info, error) {
	if !nameRe.MatchString(name) {
		return Info{}, fmt.Errorf("plugins: %q is %w", name, ErrBadName)
	}
	// Read under the install lock, so that what is restored is the version
	// before the last install, not one an install is writing.
	r.installMu.Lock()
	defer r.installMu.Unlock()
	prev := filepath.Join(r.opts.Dir, name, dirPrevious)
	man, err := os.ReadFile(filepath.Join(prev, fileManifest))
	if err != nil {
		return Info{}, fmt.Errorf("plugins: %s: %w", name, ErrNoPrevious)
	}
	wasm, err := os.ReadFile(filepath.Join(prev, fileModule))
	if err != nil {
		return Info{}, fmt.Errorf("plugins: %s: previous version: %w", name, err)
	}
	sig, err := os.ReadFile(filepath.Join(prev, fileSig))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return Info{}, fmt.Errorf("plugins: %s: previous version: %w", name, err)
	}
	return r.install(ctx, man, wasm, sig)
}

// Remove stops serving a plugin and deletes its files. Calls already
// running finish first.
func (r *Registry) Remove(ctx context.Context, name string) error {
	if !nameRe.MatchString(name) {
		return fmt.Errorf("plugins: %q is %w", name, ErrBadName)
	}
	r.installMu.Lock()
	defer r.installMu.Unlock()
	r.mu.Lock()
	v := r.plugins[name]
	if v == nil {
		r.mu.Unlock()
		return fmt.Errorf("plugins: %s is %w", name, ErrNotInstalled)
	}
	for _, h := range v.m.Handlers {
		delete(r.claims, h.claim())
	}
	delete(r.plugins, name)
	r.mu.Unlock()
	v.retire(ctx)
	// Renamed away first, so that a crash never leaves half a plugin
	// where Open would load it.
	del := delDir(r.opts.Dir, name)
	if err := os.RemoveAll(del); err != nil {
		return fmt.Errorf("plugins: %s: %w", name, err)
	}
	if err := os.Rename(filepath.Join(r.opts.Dir, name), del); err != nil {
		return fmt.Errorf("plugins: %s: %w", name, err)
	}
	if err := syncDir(r.opts.Dir); err != nil {
		return fmt.Errorf("plugins: %s: %w", name, err)
	}
	if err := os.RemoveAll(del); err != nil {
		r.log.Warn("plugin removed, but deleting its files failed", "plugin", name, "error", err)
	}
	r.log.Info("plugin removed", "plugin", name)
	return nil
}

// Call serves a request with the plugin that claims its kind and name:
// 501 if none does.
func (r *Registry) Call(ctx context.Context, req *sandbox.Request) *sandbox.Response {
	r.mu.RLock()
	name, ok := r.claims[claim{req.Kind, req.Name}]
	var v *version
	if ok {
		v = r.plugins[name]
		v.calls.Add(1)
	}
	r.mu.RUnlock()
	if v == nil {
		return &sandbox.Response{
			Status:      abi.StatusNotImplemented,
			Payload:     []byte(fmt.Sprintf("no plugin serves %s %q", req.Kind, req.Name)),
			ContentType: "text/plain; charset=utf-8",
			Props:       []abi.Property{{Key: "outpost-error", Value: "not_implemented"}},
			Err:         &sandbox.CallError{Kind: "not_implemented", Err: errors.New("no plugin claims the name")},
		}
	}
	defer v.calls.Done()
	return v.p.Call(ctx, req)
}

// Owner is the plugin that serves kind and name, or "".
func (r *Registry) Owner(kind abi.Kind, name string) string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.claims[claim{kind, name}]
}

// List describes the installed plugins, by name.
func (r *Registry) List() []Info {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Info, 0, len(r.plugins))
	for _, v := range r.plugins {
		out = append(out, v.info())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (v *version) info() Info {
	return Info{Name: v.m.Name, Version: v.m.Version, SHA256: v.m.SHA256, Handlers: v.m.Handlers,
		Capabilities: v.m.Capabilities, Signed: v.signed, Stats: v.p.Stats()}
}

// Close closes every plugin after the calls in progress; when ctx ends
// first, it ends those calls (they answer 504). Installs after Close are
// refused.
func (r *Registry) Close(ctx context.Context) {
	r.installMu.Lock()
	r.closed = true
	r.installMu.Unlock()
	r.mu.Lock()
	vs := r.plugins
	r.plugins, r.claims = map[string]*version{}, map[claim]string{}
	r.mu.Unlock()
	for _, v := range vs {
		v.retire(ctx)
	}
}
