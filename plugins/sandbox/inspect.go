package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	"github.com/tetratelabs/wazero"

	"github.com/outpost-edge/outpost/abi"
)

// ModuleInfo is what a module holds and asks for, read without running it.
type ModuleInfo struct {
	Size         int      `json:"size"`
	SHA256       string   `json:"sha256"`
	Exports      []string `json:"exports"`      // functions
	Imports      []string `json:"imports"`      // functions, as module.name
	Capabilities []string `json:"capabilities"` // capability modules it imports
	MemoryPages  uint32   `json:"memory_min_pages"`
	HasInit      bool     `json:"has_init"`
	HasIdle      bool     `json:"has_idle"`
	// Problem is why Load would refuse it even with every capability
	// granted; "" when it would not.
	Problem string `json:"problem,omitempty"`
}

// Inspect compiles wasm, without running any of it, and says what it
// exports and imports and whether it follows the ABI. It fails only when
// wasm is not a valid module.
func (e *Engine) Inspect(ctx context.Context, wasm []byte) (*ModuleInfo, error) {
	sum := sha256.Sum256(wasm)
	info := &ModuleInfo{Size: len(wasm), SHA256: hex.EncodeToString(sum[:])}
	if len(wasm) < 8 || string(wasm[:4]) != "\x00asm" {
		return nil, errors.New("sandbox: inspect: not a WebAssembly module (no \\0asm header)")
	}
	// The same runtime configuration as Load, so that the compiled code is
	// in the cache for it.
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfig().
		WithCompilationCache(e.cache).
		WithCloseOnContextDone(true))
	defer rt.Close(context.Background())
	compiled, err := compile(ctx, rt, wasm)
	if err != nil {
		return nil, fmt.Errorf("sandbox: inspect: invalid module: %w", err)
	}
	for name := range compiled.ExportedFunctions() {
		info.Exports = append(info.Exports, name)
	}
	slices.Sort(info.Exports)
	for _, def := range compiled.ImportedFunctions() {
		mod, name, _ := def.Import()
		info.Imports = append(info.Imports, mod+"."+name)
		if slices.Contains(capabilityModules, mod) && !slices.Contains(info.Capabilities, mod) {
			info.Capabilities = append(info.Capabilities, mod)
		}
	}
	if m, ok := compiled.ExportedMemories()[abi.ExportMemory]; ok {
		info.MemoryPages = m.Min()
	}
	// The checks of Load, against a host that grants every capability.
	if _, err := limitTables(wasm); err != nil {
		info.Problem = err.Error()
		return info, nil
	}
	p := &Plugin{rt: rt, compiled: compiled, cfg: Config{KV: noKV{}, Publish: func(context.Context, string, []byte, byte) error { return nil },
		Blobs: noKV{}, HTTPGet: func(context.Context, string, string, func(int, string)) (int64, error) { return 0, ErrUnavailable },
		Progress: func(abi.Meta, int, string) {}, Twin: noTwin{}}}
	if err := p.checkExports(); err != nil {
		info.Problem = err.Error()
		return info, nil
	}
	info.HasInit, info.HasIdle = p.hasInit, p.hasIdle
	if err := p.instantiateHost(ctx); err != nil {
		return nil, fmt.Errorf("sandbox: inspect: host modules: %w", err)
	}
	if err := p.checkImports(); err != nil {
		info.Problem = err.Error()
	}
	return info, nil
}

// noKV stands for a granted key/value or blob capability where nothing is
// stored.
type noKV struct{}

func (noKV) Size(string) (int64, error)                { return 0, ErrNotFound }
func (noKV) ReadAt(string, []byte, int64) (int, error) { return 0, ErrNotFound }
func (noKV) Remove(string) error                       { return nil }

func (noKV) Get([]byte) ([]byte, error) { return nil, ErrNotFound }
func (noKV) Set(_, _ []byte) error      { return ErrNotFound }
func (noKV) Delete([]byte) error        { return ErrNotFound }

// noTwin stands for a granted twin capability with no state.
type noTwin struct{}

func (noTwin) Get() ([]byte, error) { return nil, ErrUnavailable }
func (noTwin) Report([]byte) error  { return ErrUnavailable }
