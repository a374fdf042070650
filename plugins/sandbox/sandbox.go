// Package sandbox runs wasm handler modules (ABI v1, abi/ABI.md) with
// wazero: it checks a module before it runs anything, keeps a bounded pool
// of instances per plugin, and turns every way a module can fail (a trap, a
// loop, a memory bomb, a broken ABI) into an error response, discarding the
// instance. No wazero type appears in its API.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/outpost-edge/outpost/abi"
)

// Engine holds what plugins share: the compilation cache. It is safe for
// concurrent use. Close it after every plugin loaded with it.
type Engine struct {
	cache wazero.CompilationCache
}

// NewEngine returns an engine whose compiled code is cached in dir, so a
// restart does not compile again; "" keeps the cache in memory.
func NewEngine(dir string) (*Engine, error) {
	if dir == "" {
		return &Engine{cache: wazero.NewCompilationCache()}, nil
	}
	c, err := wazero.NewCompilationCacheWithDir(dir)
	if err != nil {
		return nil, fmt.Errorf("sandbox: compilation cache %s: %w", dir, err)
	}
	return &Engine{cache: c}, nil
}

// Close releases the cache.
func (e *Engine) Close(ctx context.Context) error { return e.cache.Close(ctx) }

// Limits bound one plugin. Zero values take the defaults.
type Limits struct {
	Memory        uint64        // linear memory per instance, bytes [16 MiB]
	Timeout       time.Duration // per call, when the request gives none or a longer one [5 s]
	InitTimeout   time.Duration // instantiation and outpost_init [10 s]
	MaxRequest    int           // request payload bytes [256 KiB]
	MaxResponse   int           // response payload bytes [256 KiB]
	MaxProps      int           // response properties [64]
	Instances     int           // instances at once [GOMAXPROCS]
	Queue         int           // calls waiting for an instance beyond those [64]
	LogPerSec     int           // log lines per second, the excess dropped [20]
	PublishPerSec int           // publishes per second [100]
	MaxPublish    int           // bytes of a published payload [256 KiB]
	// Breaker opens after this many consecutive failures (traps, timeouts,
	// ABI violations) [5] and stays open for BreakerOpen [10 s], then lets
	// one call through.
	BreakerAfter int
	BreakerOpen  time.Duration
	// SleepSlice caps one WASI sleep, so that the deadline check runs [50 ms].
	SleepSlice time.Duration
}

func (l Limits) withDefaults() Limits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	if l.Memory == 0 {
		l.Memory = 16 << 20
	}
	defd(&l.Timeout, 5*time.Second)
	defd(&l.InitTimeout, 10*time.Second)
	defd(&l.BreakerOpen, 10*time.Second)
	defd(&l.SleepSlice, 50*time.Millisecond)
	def(&l.MaxRequest, 256<<10)
	def(&l.MaxResponse, 256<<10)
	def(&l.MaxProps, 64)
	def(&l.Instances, runtime.GOMAXPROCS(0))
	def(&l.Queue, 64)
	def(&l.LogPerSec, 20)
	def(&l.PublishPerSec, 100)
	def(&l.MaxPublish, 256<<10)
	def(&l.BreakerAfter, 5)
	return l
}

// Config describes one plugin to load.
type Config struct {
	Name   string // for errors and logs
	Config []byte // given to outpost_init through cfg_read
	Limits Limits
	Log    *slog.Logger
	// Capabilities: nil is not granted, and a module that imports one is
	// refused at load.
	KV       KVStore    // outpost_kv_v1
	Publish  Publisher  // outpost_mqtt_v1; it checks the topic
	Blobs    BlobStore  // outpost_blob_v1
	HTTPGet  HTTPGet    // outpost_http_v1; it checks the host and the size
	Progress Progress   // outpost_dm_v1
	Twin     TwinAccess // outpost_twin_v1

	// noTermination compiles the module without wazero's termination
	// checks, so that nothing ends a call that does not return. Only the
	// benchmarks set it, to measure what the checks cost.
	noTermination bool
}

// reportsPerSec bounds the progress reports and twin patches of a plugin.
const reportsPerSec = 10

// LoadError is why a module was refused at load. Nothing of it ran.
type LoadError struct {
	Plugin string
	Reason string
}

func (e *LoadError) Error() string { return fmt.Sprintf("sandbox: plugin %s: %s", e.Plugin, e.Reason) }

// Plugin is a loaded module with its instances. Its methods are safe for
// concurrent use.
type Plugin struct {
	cfg      Config
	lim      Limits
	log      *slog.Logger
	rt       wazero.Runtime
	compiled wazero.CompiledModule
	modCfg   wazero.ModuleConfig
	hasInit  bool
	hasIdle  bool

	pool      pool
	breaker   breaker
	logs      rateLimiter
	publishes rateLimiter
	reports   rateLimiter // progress and twin_report: each ends in a log line or a store write
	stats     stats

	liveMu sync.Mutex
	live   map[*instance]struct{} // every instance not discarded, for Abort

	mu      sync.RWMutex // held for reading by calls in progress; Close takes it
	closed  bool
	closing atomic.Bool    // Close has begun: new calls are refused without waiting for mu
	wg      sync.WaitGroup // instances being idled in the background
}

// Load compiles and checks a module, then creates its first instance (which
// runs _initialize and outpost_init), so that a module that cannot serve is
// refused here, not on its first request. The caller closes the Plugin.
func (e *Engine) Load(ctx context.Context, wasm []byte, cfg Config) (*Plugin, error) {
	lim := cfg.Limits.withDefaults()
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("plugin", cfg.Name)
	refuse := func(format string, a ...any) error {
		return &LoadError{Plugin: cfg.Name, Reason: fmt.Sprintf(format, a...)}
	}
	if len(wasm) < 8 || string(wasm[:4]) != "\x00asm" {
		return nil, refuse("not a WebAssembly module (no \\0asm header)")
	}
	wasm, err := limitTables(wasm)
	if err != nil {
		return nil, refuse("%v", err)
	}
	if lim.Memory < 65536 || lim.Memory > 1<<32 {
		return nil, refuse("memory limit of %d bytes is not between one 64 KiB page and 4 GiB", lim.Memory)
	}
	// The limit is enforced by limitedMemory, which records a refused grow;
	// wazero's own limit stays at the wasm32 maximum so that it does not
	// refuse first.
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfig().
		WithCompilationCache(e.cache).
		WithCloseOnContextDone(!cfg.noTermination))
	p := &Plugin{cfg: cfg, lim: lim, log: log, rt: rt, live: map[*instance]struct{}{}}
	ok := false
	defer func() {
		if !ok {
			_ = rt.Close(context.Background())
		}
	}()
	compiled, err := compile(ctx, rt, wasm)
	if err != nil {
		return nil, refuse("invalid module: %v", err)
	}
	p.compiled = compiled
	if err := p.checkExports(); err != nil {
		return nil, refuse("%v", err)
	}
	if min := uint64(compiled.ExportedMemories()[abi.ExportMemory].Min()) * 65536; min > lim.Memory {
		return nil, refuse("its memory (at least %d bytes) does not fit the %d-byte limit", min, lim.Memory)
	}
	if err := p.instantiateHost(ctx); err != nil {
		return nil, fmt.Errorf("sandbox: plugin %s: host modules: %w", cfg.Name, err)
	}
	if err := p.checkImports(); err != nil {
		return nil, refuse("%v", err)
	}
	p.modCfg = wazero.NewModuleConfig().
		WithName("").
		WithStartFunctions("_initialize").
		WithSysWalltime().
		WithSysNanotime().
		WithRandSource(cryptoRand{}).
		WithNanosleep(p.sleep).
		WithStdout(newLogWriter(p, slog.LevelInfo)).
		WithStderr(newLogWriter(p, slog.LevelWarn))
	p.pool.init(lim.Instances, lim.Queue)
	p.breaker.init(lim.BreakerAfter, lim.BreakerOpen)
	p.logs.init(lim.LogPerSec)
	p.publishes.init(lim.PublishPerSec)
	p.reports.init(reportsPerSec)
	// The first instance proves the module starts; it stays in the pool.
	inst, err := p.newInstance(ctx)
	if err != nil {
		return nil, refuse("%v", err)
	}
	p.pool.slots <- struct{}{}
	p.pool.idle <- inst
	ok = true
	return p, nil
}

// compile compiles wasm, or takes its code from the cache, with a worker
// per CPU: a first install of a Go guest took 1.8-2.1 s on one, 1.1-1.3 s
// on two.
func compile(ctx context.Context, rt wazero.Runtime, wasm []byte) (wazero.CompiledModule, error) {
	return rt.CompileModule(experimental.WithCompilationWorkers(ctx, runtime.GOMAXPROCS(0)), wasm)
}

// checkExports checks the exports of section 3 of the ABI.
func (p *Plugin) checkExports() error {
	fns := p.compiled.ExportedFunctions()
	if _, ok := p.compiled.ExportedMemories()[abi.ExportMemory]; !ok {
		return errors.New(`exports no memory named "memory"`)
	}
	if len(p.compiled.ImportedMemories()) > 0 {
		return errors.New("imports a memory; a handler must define and export its own")
	}
	want := func(name string, required bool, params, results []api.ValueType) (bool, error) {
		def, ok := fns[name]
		if !ok {
			if required {
				return false, fmt.Errorf("does not export %s%s: is it built for Outpost ABI v%d?", name, signature(params, results), abi.Version)
			}
			return false, nil
		}
		if !slices.Equal(def.ParamTypes(), params) || !slices.Equal(def.ResultTypes(), results) {
			return false, fmt.Errorf("exports %s%s, want %s%s", name, signature(def.ParamTypes(), def.ResultTypes()), name, signature(params, results))
		}
		return true, nil
	}
	i32 := api.ValueTypeI32
	if _, err := want(abi.ExportMarker, true, nil, nil); err != nil {
		return err
	}
	if _, err := want(abi.ExportHandle, true, []api.ValueType{i32, i32}, []api.ValueType{i32}); err != nil {
		return err
	}
	var err error
	if p.hasInit, err = want(abi.ExportInit, false, []api.ValueType{i32}, []api.ValueType{i32}); err != nil {
		return err
	}
	if p.hasIdle, err = want(abi.ExportIdle, false, nil, nil); err != nil {
		return err
	}
	if _, err := want(abi.ExportReactor, false, nil, nil); err != nil {
		return err
	}
	if _, start := fns["_start"]; start {
		if _, reactor := fns[abi.ExportReactor]; !reactor {
			return errors.New("is a WASI command (exports _start, not _initialize): build it as a reactor (Go: -buildmode=c-shared)")
		}
	}
	return nil
}

// checkImports checks that every import is a function of a host module this
// plugin was given, with the same signature.
func (p *Plugin) checkImports() error {
	for _, def := range p.compiled.ImportedFunctions() {
		mod, name, _ := def.Import()
		host := p.rt.Module(mod)
		if host == nil {
			if slices.Contains(capabilityModules, mod) {
				return fmt.Errorf("imports %s.%s: capability %s is not granted to this plugin", mod, name, mod)
			}
			return fmt.Errorf("imports %s.%s: no such module (this host provides %s and %s)", mod, name, abi.Module, wasi_snapshot_preview1.ModuleName)
		}
		hd, ok := host.ExportedFunctionDefinitions()[name]
		if !ok {
			return fmt.Errorf("imports %s.%s, which this host (ABI v%d) does not provide", mod, name, abi.Version)
		}
		if !slices.Equal(hd.ParamTypes(), def.ParamTypes()) || !slices.Equal(hd.ResultTypes(), def.ResultTypes()) {
			return fmt.Errorf("imports %s.%s as %s, want %s", mod, name, signature(def.ParamTypes(), def.ResultTypes()), signature(hd.ParamTypes(), hd.ResultTypes()))
		}
	}
	return nil
}

// capabilityModules are the import modules a plugin has only when granted.
var capabilityModules = []string{abi.ModuleKV, abi.ModuleMQTT, abi.ModuleBlob, abi.ModuleHTTP, abi.ModuleDM, abi.ModuleTwin}

func signature(params, results []api.ValueType) string {
	names := func(ts []api.ValueType) string {
		s := make([]string, len(ts))
		for i, t := range ts {
			s[i] = api.ValueTypeName(t)
		}
		return strings.Join(s, ", ")
	}
	out := "(" + names(params) + ")"
	if len(results) > 0 {
		out += " -> (" + names(results) + ")"
	}
	return out
}

// sleep is the WASI sleep: at most one slice at a time, so that a sleeping
// guest returns to wasm code, where the deadline is checked.
func (p *Plugin) sleep(ns int64) {
	time.Sleep(min(time.Duration(ns), p.lim.SleepSlice))
}

// Close refuses new calls at once (503), waits for the calls in progress
// and frees the plugin. When ctx ends first it returns ctx's error; the
// plugin is then freed as soon as the last call in progress ends.
func (p *Plugin) Close(ctx context.Context) error {
	p.closing.Store(true)
	done := make(chan error, 1)
	go func() {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			done <- nil
			return
		}
		p.closed = true
		p.mu.Unlock()
		p.wg.Wait()
		done <- p.rt.Close(context.Background())
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("sandbox: plugin %s: calls still in progress: %w", p.cfg.Name, ctx.Err())
	}
}
