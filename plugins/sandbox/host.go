package sandbox

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/outpost-edge/outpost/abi"
)

// call is the state of one call into an instance: what the host functions
// read from and write to. It travels in the context.
type call struct {
	meta    []byte
	payload []byte

	resp        []byte
	contentType string
	props       []abi.Property
	respBytes   int // payload, properties and content type, against MaxResponse

	// lastCT is the content type of the instance's previous response: a
	// handler sets the same one again and again, and this saves making it.
	lastCT string

	// What went wrong, if the guest broke the ABI or hit a limit. The first
	// reason is kept.
	violation string
	overLimit string
}

// internCT returns b as a string, the previous response's content type
// when it is the same.
func (c *call) internCT(b []byte) string {
	if string(b) != c.lastCT {
		c.lastCT = string(b)
	}
	return c.lastCT
}

type callKey struct{}

func callOf(ctx context.Context) *call {
	c, _ := ctx.Value(callKey{}).(*call)
	return c
}

// errViolation aborts the guest: a host function panics with it, wazero
// ends the call with an error, and the instance is discarded.
var errViolation = errors.New("sandbox: ABI violation")

func (c *call) violate(format string, a ...any) {
	if c.violation == "" {
		c.violation = fmt.Sprintf(format, a...)
	}
	panic(errViolation)
}

// read returns guest memory [ptr, ptr+n), or ends the call.
func read(c *call, m api.Module, fn string, ptr, n uint32) []byte {
	b, ok := m.Memory().Read(ptr, n)
	if !ok {
		c.violate("%s: [%d, %d+%d) is outside the guest's %d-byte memory", fn, ptr, ptr, n, m.Memory().Size())
	}
	return b
}

// copyOut copies as much of src as fits in limit bytes to guest memory at
// buf, and returns how much it copied.
func copyOut(c *call, m api.Module, fn string, buf, limit uint32, src []byte) uint32 {
	n := min(uint32(len(src)), limit)
	if n == 0 {
		return 0
	}
	if !m.Memory().Write(buf, src[:n]) {
		c.violate("%s: [%d, %d+%d) is outside the guest's %d-byte memory", fn, buf, buf, n, m.Memory().Size())
	}
	return n
}

type hostFn struct {
	name    string
	params  int // all i32, but for those in wide
	results int // 0 or 1, i32 unless wideResult
	fn      func(ctx context.Context, c *call, m api.Module, s []uint64)
	// wide lists the parameters that are i64; wideResult makes the result
	// i64.
	wide       []int
	wideResult bool
}

// instantiateHost instantiates, in the plugin's runtime, WASI and the host
// modules it was given.
func (p *Plugin) instantiateHost(ctx context.Context) error {
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, p.rt); err != nil {
		return err
	}
	if err := p.hostModule(ctx, abi.Module, p.coreFuncs()); err != nil {
		return err
	}
	if p.cfg.KV != nil {
		if err := p.hostModule(ctx, abi.ModuleKV, p.kvFuncs()); err != nil {
			return err
		}
	}
	if p.cfg.Publish != nil {
		if err := p.hostModule(ctx, abi.ModuleMQTT, p.mqttFuncs()); err != nil {
			return err
		}
	}
	if p.cfg.Blobs != nil {
		if err := p.hostModule(ctx, abi.ModuleBlob, p.blobFuncs()); err != nil {
			return err
		}
	}
	if p.cfg.HTTPGet != nil {
		if err := p.hostModule(ctx, abi.ModuleHTTP, p.httpFuncs()); err != nil {
			return err
		}
	}
	if p.cfg.Progress != nil {
		if err := p.hostModule(ctx, abi.ModuleDM, p.dmFuncs()); err != nil {
			return err
		}
	}
	if p.cfg.Twin != nil {
		if err := p.hostModule(ctx, abi.ModuleTwin, p.twinFuncs()); err != nil {
			return err
		}
	}
	return nil
}

func (p *Plugin) hostModule(ctx context.Context, name string, fns []hostFn) error {
	b := p.rt.NewHostModuleBuilder(name)
	for _, f := range fns {
		params := make([]api.ValueType, f.params)
		for i := range params {
			params[i] = api.ValueTypeI32
		}
		for _, i := range f.wide {
			params[i] = api.ValueTypeI64
		}
		var results []api.ValueType
		if f.results == 1 {
			results = []api.ValueType{api.ValueTypeI32}
			if f.wideResult {
				results[0] = api.ValueTypeI64
			}
		}
		fn := f.fn
		b.NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(func(ctx context.Context, m api.Module, s []uint64) {
			c := callOf(ctx)
			if c == nil { // every call into a guest carries one; never panic for lack of it
				c = &call{}
			}
			fn(ctx, c, m, s)
		}), params, results).Export(f.name)
	}
	_, err := b.Instantiate(ctx)
	return err
}

func i32(v uint64) uint32 { return api.DecodeU32(v) }

func ret(s []uint64, v int32) { s[0] = api.EncodeI32(v) }

func (p *Plugin) coreFuncs() []hostFn {
	return []hostFn{
		{name: abi.FuncReqMeta, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			buf, limit := i32(s[0]), i32(s[1])
			if int(limit) >= len(c.meta) {
				copyOut(c, m, abi.FuncReqMeta, buf, limit, c.meta)
			}
			ret(s, int32(len(c.meta)))
		}},
		{name: abi.FuncReqPayload, params: 3, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			buf, limit, off := i32(s[0]), i32(s[1]), i32(s[2])
			var src []byte
			if int(off) < len(c.payload) {
				src = c.payload[off:]
			}
			ret(s, int32(copyOut(c, m, abi.FuncReqPayload, buf, limit, src)))
		}},
		{name: abi.FuncRespWrite, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			b := read(c, m, abi.FuncRespWrite, i32(s[0]), i32(s[1]))
			if !p.spend(c, len(b)) {
				ret(s, int32(abi.ErrLimit))
				return
			}
			c.resp = append(c.resp, b...)
			ret(s, 0)
		}},
		{name: abi.FuncRespSetProp, params: 4, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			k := read(c, m, abi.FuncRespSetProp, i32(s[0]), i32(s[1]))
			v := read(c, m, abi.FuncRespSetProp, i32(s[2]), i32(s[3]))
			if len(k) > abi.MaxString || len(v) > abi.MaxString {
				// MQTT strings are at most 65,535 bytes.
				ret(s, int32(abi.ErrBadArg))
				return
			}
			if len(c.props) >= p.lim.MaxProps {
				if c.overLimit == "" {
					c.overLimit = fmt.Sprintf("more than %d response properties", p.lim.MaxProps)
				}
				ret(s, int32(abi.ErrLimit))
				return
			}
			if !p.spend(c, len(k)+len(v)) {
				ret(s, int32(abi.ErrLimit))
				return
			}
			c.props = append(c.props, abi.Property{Key: string(k), Value: string(v)})
			ret(s, 0)
		}},
		{name: abi.FuncRespSetCType, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			b := read(c, m, abi.FuncRespSetCType, i32(s[0]), i32(s[1]))
			if len(b) > abi.MaxString {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			if !p.spend(c, len(b)-len(c.contentType)) {
				ret(s, int32(abi.ErrLimit))
				return
			}
			c.contentType = c.internCT(b)
			ret(s, 0)
		}},
		{name: abi.FuncCfgRead, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			buf, limit := i32(s[0]), i32(s[1])
			if int(limit) >= len(p.cfg.Config) {
				copyOut(c, m, abi.FuncCfgRead, buf, limit, p.cfg.Config)
			}
			ret(s, int32(len(p.cfg.Config)))
		}},
		{name: abi.FuncLog, params: 3, results: 0, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			level, msg := i32(s[0]), read(c, m, abi.FuncLog, i32(s[1]), i32(s[2]))
			if level > abi.LogError {
				level = abi.LogError
			}
			p.guestLog(slogLevel(int(level)), msg)
		}},
		{name: abi.FuncLogEnabled, params: 1, results: 1, fn: func(ctx context.Context, c *call, m api.Module, s []uint64) {
			v := int32(0)
			if p.log.Enabled(ctx, slogLevel(int(i32(s[0])))) {
				v = 1
			}
			ret(s, v)
		}},
	}
}

// spend counts n more response bytes, or records that the response is over
// the limit and reports false.
func (p *Plugin) spend(c *call, n int) bool {
	if c.respBytes+n > p.lim.MaxResponse {
		if c.overLimit == "" {
			c.overLimit = fmt.Sprintf("response (payload, properties, content type) over the %d-byte limit", p.lim.MaxResponse)
		}
		return false
	}
	c.respBytes += n
	return true
}

func slogLevel(l int) slog.Level {
	switch {
	case l <= abi.LogDebug:
		return slog.LevelDebug
	case l == abi.LogInfo:
		return slog.LevelInfo
	case l == abi.LogWarn:
		return slog.LevelWarn
	}
	return slog.LevelError
}

// guestLog logs msg for the guest, within the plugin's rate, cut at
// maxLogLine bytes. msg may be guest memory: it is copied only after the
// checks, and only what is logged.
func (p *Plugin) guestLog(level slog.Level, msg []byte) {
	if !p.logs.allow() {
		p.stats.logsDropped.Add(1)
		return
	}
	s := string(msg[:min(len(msg), maxLogLine)])
	if len(msg) > maxLogLine {
		s += "…"
	}
	p.log.Log(context.Background(), level, s, "source", "guest")
}

// logWriter sends the guest's stdout or stderr to its log, a line at a
// time (a Go guest writes a panic in many small pieces).
type logWriter struct {
	p     *Plugin
	level slog.Level
	mu    *sync.Mutex
	line  *[]byte
}

func newLogWriter(p *Plugin, level slog.Level) logWriter {
	return logWriter{p: p, level: level, mu: new(sync.Mutex), line: new([]byte)}
}

func (w logWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		seg := b
		if i >= 0 {
			seg = b[:i]
		}
		// The line never holds more than maxLogLine bytes: a longer one
		// is logged in pieces.
		room := maxLogLine - len(*w.line)
		if len(seg) >= room {
			*w.line = append(*w.line, seg[:room]...)
			b = b[room:]
			w.flushLocked()
			continue
		}
		*w.line = append(*w.line, seg...)
		if i < 0 {
			break
		}
		b = b[i+1:]
		w.flushLocked()
	}
	return n, nil
}

func (w logWriter) flushLocked() {
	if len(*w.line) > 0 {
		w.p.guestLog(w.level, *w.line)
	}
	*w.line = (*w.line)[:0]
}

const maxLogLine = 1024

type cryptoRand struct{}

func (cryptoRand) Read(b []byte) (int, error) { return rand.Read(b) }

// rateLimiter allows n events per second.
type rateLimiter struct {
	mu     sync.Mutex
	n      int
	window time.Time
	used   int
}

func (r *rateLimiter) init(n int) { r.n = n }

func (r *rateLimiter) allow() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if now.Sub(r.window) >= time.Second {
		r.window, r.used = now, 0
	}
	if r.used >= r.n {
		return false
	}
	r.used++
	return true
}
