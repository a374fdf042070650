package sandbox

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/sys"

	"github.com/outpost-edge/outpost/abi"
)

// Request is one request to a plugin.
type Request struct {
	abi.Meta
	Payload []byte
}

// Response is a plugin's answer, or the host's when the call failed: then
// Status is one of the host statuses of the ABI and Err says why.
type Response struct {
	Status      abi.Status
	Payload     []byte
	ContentType string
	Props       []abi.Property
	Err         error // set when the host ended or refused the call
}

// Kinds of failure, for Stats.
const (
	FailTrap      = "trap"     // the guest trapped
	FailTimeout   = "timeout"  // the deadline passed
	FailABI       = "abi"      // the guest broke the ABI
	FailLimit     = "limit"    // response or memory limit
	FailRejected  = "rejected" // refused before the guest ran: too large, queue full, breaker open
	FailInstance  = "instance" // a new instance failed to start
	failKindCount = 6
)

var failKinds = [failKindCount]string{FailTrap, FailTimeout, FailABI, FailLimit, FailRejected, FailInstance}

// instance is one instantiation of the module.
type instance struct {
	mod    api.Module
	mem    *limitedMemory
	handle api.Function
	idle   api.Function
	stack  []uint64
	cur    call     // the call in progress
	ctx    *callCtx // what the calls run under
	meta   []byte   // the envelope of the call in progress, reused
	// For outpost_idle: calls since the last one, and the memory size then.
	sinceIdle int
	memAtIdle int
}

func (p *Plugin) newInstance(ctx context.Context) (*instance, error) {
	ctx, cancel := context.WithTimeout(ctx, p.lim.InitTimeout)
	defer cancel()
	c := &call{}
	ctx = context.WithValue(ctx, callKey{}, c)
	mem := &limitedMemory{limit: p.lim.Memory}
	ctx = experimental.WithMemoryAllocator(ctx, experimental.MemoryAllocatorFunc(func(_, _ uint64) experimental.LinearMemory { return mem }))
	mod, err := p.rt.InstantiateModule(ctx, p.compiled, p.modCfg)
	if err != nil {
		if c.violation != "" {
			return nil, fmt.Errorf("starting an instance: %s", c.violation)
		}
		return nil, fmt.Errorf("starting an instance: %w", err)
	}
	inst := &instance{mod: mod, mem: mem, handle: mod.ExportedFunction(abi.ExportHandle), stack: make([]uint64, 2)}
	inst.ctx = newCallCtx(&inst.cur)
	if p.hasIdle {
		inst.idle = mod.ExportedFunction(abi.ExportIdle)
	}
	if p.hasInit {
		s := []uint64{api.EncodeU32(uint32(len(p.cfg.Config)))}
		if err := mod.ExportedFunction(abi.ExportInit).CallWithStack(ctx, s); err != nil {
			_ = mod.Close(context.Background())
			if c.violation != "" {
				return nil, fmt.Errorf("%s: %s", abi.ExportInit, c.violation)
			}
			return nil, fmt.Errorf("%s: %w", abi.ExportInit, err)
		}
		if rc := api.DecodeI32(s[0]); rc != 0 {
			_ = mod.Close(context.Background())
			return nil, fmt.Errorf("%s returned %d: the instance refused to start", abi.ExportInit, rc)
		}
	}
	p.liveMu.Lock()
	p.live[inst] = struct{}{}
	p.liveMu.Unlock()
	return inst, nil
}

// Call serves one request. It never fails: a refused or failed call is a
// response with a host status and Err set. The deadline is the earliest of
// ctx's, the request's and the plugin's timeout.
func (p *Plugin) Call(ctx context.Context, req *Request) *Response {
	start := time.Now()
	resp := p.call(ctx, start, req)
	p.stats.observe(time.Since(start), resp)
	return resp
}

func (p *Plugin) call(ctx context.Context, now time.Time, req *Request) *Response {
	if p.closing.Load() {
		return hostResp(abi.StatusUnavailable, FailRejected, errors.New("plugin is closed"))
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return hostResp(abi.StatusUnavailable, FailRejected, errors.New("plugin is closed"))
	}
	if len(req.Payload) > p.lim.MaxRequest {
		return hostResp(abi.StatusRequestTooLarge, FailRejected, fmt.Errorf("request payload of %d bytes is over the %d-byte limit", len(req.Payload), p.lim.MaxRequest))
	}
	if err := ctx.Err(); err != nil {
		return hostResp(abi.StatusTimeout, FailTimeout, fmt.Errorf("the caller gave up before the call: %w", err))
	}
	timeout := p.lim.Timeout
	if req.Deadline > 0 {
		timeout = min(timeout, req.Deadline)
	}
	deadline := now.Add(timeout)
	// ownDeadline: the deadline is the plugin's own timeout, not a shorter
	// one the caller chose (nor the caller's context).
	ownDeadline := timeout == p.lim.Timeout
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline, ownDeadline = dl, false
	}
	ok, probe := p.breaker.allow()
	if !ok {
		return hostResp(abi.StatusUnavailable, FailRejected, errors.New("breaker open after repeated failures"))
	}
	inst, waited, refused := p.acquire(ctx, deadline)
	if refused != nil {
		if ce, _ := refused.Err.(*CallError); ce != nil && ce.Kind == FailInstance {
			p.breaker.failure(probe) // the module does not start
		} else {
			p.breaker.release(probe)
		}
		return refused
	}
	left := deadline.Sub(now)
	if waited {
		if left = time.Until(deadline); left <= 0 {
			// The deadline passed while the call waited for an instance or
			// started one: the instance is healthy.
			p.pool.put(inst)
			p.breaker.release(probe)
			return hostResp(abi.StatusTimeout, FailTimeout, errors.New("deadline passed while waiting for an instance"))
		}
	}
	// The envelope carries the time actually left (at most what it can hold).
	m := req.Meta
	m.Deadline = min(max(left.Truncate(time.Millisecond), time.Millisecond), maxEnvelopeDeadline)
	meta, merr := abi.AppendMeta(inst.meta[:0], &m)
	if merr != nil {
		p.pool.put(inst)
		p.breaker.release(probe)
		return hostResp(abi.StatusBadRequest, FailRejected, merr)
	}
	inst.meta = meta
	c := &inst.cur
	*c = call{meta: meta, payload: req.Payload, lastCT: c.lastCT}
	inst.mem.refused = false
	inst.stack[0], inst.stack[1] = api.EncodeU32(uint32(len(meta))), api.EncodeU32(uint32(len(req.Payload)))
	// The call ends at the deadline or when the caller gives up, whichever
	// is first: either makes inst.ctx done, and wazero ends the call.
	inst.ctx.arm(deadline, left)
	stopCancel := func() bool { return true }
	if ctx.Done() != nil {
		stopCancel = context.AfterFunc(ctx, func() { inst.ctx.end(ctx.Err()) })
	}
	p.stats.running.Add(1)
	err := inst.handle.CallWithStack(inst.ctx, inst.stack)
	p.stats.running.Add(-1)
	reusable := stopCancel()
	reusable = inst.ctx.disarm() && reusable
	if ctx.Err() != nil {
		ownDeadline = false // the caller gave up
	}
	resp := p.outcome(inst, c, err)
	// The idle instance must not keep the request alive.
	c.meta, c.payload = nil, nil
	ce, _ := resp.Err.(*CallError)
	switch {
	case resp.Err == nil:
		p.breaker.success(probe)
	case ce != nil && (ce.Kind == FailLimit || ce.Kind == FailTimeout && !ownDeadline):
		// A request that needs more memory or a larger response than the
		// limits allow, or a deadline the caller chose (or its
		// cancellation), says nothing either way about the plugin's health.
		p.breaker.release(probe)
	default:
		p.breaker.failure(probe)
	}
	if resp.Err != nil || !reusable {
		p.discard(inst)
	} else {
		p.reuse(inst)
	}
	return resp
}

// maxEnvelopeDeadline is the longest deadline the envelope can carry.
const maxEnvelopeDeadline = (1<<32 - 1) * time.Millisecond

// outcome turns the end of a call into a response.
func (p *Plugin) outcome(inst *instance, c *call, err error) *Response {
	switch {
	case err == nil:
		st := abi.Status(api.DecodeI32(inst.stack[0]))
		if !st.Valid() {
			return hostResp(abi.StatusInternal, FailABI, fmt.Errorf("%s returned %d, not a status", abi.ExportHandle, int32(st)))
		}
		if c.overLimit != "" {
			return hostResp(abi.StatusInsufficientStorage, FailLimit, errors.New(c.overLimit))
		}
		return &Response{Status: st, Payload: c.resp, ContentType: c.contentType, Props: c.props}
	case c.violation != "":
		return hostResp(abi.StatusInternal, FailABI, errors.New(c.violation))
	case isDeadline(inst.ctx, err):
		why := "deadline passed"
		if errors.Is(inst.ctx.Err(), context.Canceled) {
			why = "the caller gave up"
		}
		return hostResp(abi.StatusTimeout, FailTimeout, fmt.Errorf("%s: %s", why, firstLine(err)))
	case inst.mem.refused:
		// Out of memory shows as a trap (a Go guest throws); the refused
		// grow says why.
		return hostResp(abi.StatusInsufficientStorage, FailLimit, fmt.Errorf("memory limit of %d bytes reached: %s", p.lim.Memory, firstLine(err)))
	}
	return hostResp(abi.StatusInternal, FailTrap, errors.New(firstLine(err)))
}

func isDeadline(ctx context.Context, err error) bool {
	var ee *sys.ExitError
	if errors.As(err, &ee) && (ee.ExitCode() == sys.ExitCodeDeadlineExceeded || ee.ExitCode() == sys.ExitCodeContextCanceled) {
		return true
	}
	return ctx.Err() != nil
}

// firstLine is the first line of err: wazero appends the wasm stack.
func firstLine(err error) string {
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func hostResp(st abi.Status, kind string, err error) *Response {
	return &Response{
		Status:      st,
		Payload:     []byte(err.Error()),
		ContentType: "text/plain; charset=utf-8",
		Props:       []abi.Property{{Key: "outpost-error", Value: kind}},
		Err:         &CallError{Kind: kind, Err: err},
	}
}

// CallError is why the host ended or refused a call.
type CallError struct {
	Kind string // one of the Fail* kinds
	Err  error
}

func (e *CallError) Error() string { return "sandbox: " + e.Kind + ": " + e.Err.Error() }
func (e *CallError) Unwrap() error { return e.Err }

// acquire takes an idle instance, makes one if the pool has room, or waits
// for one until the deadline, within the queue bound. waited reports
// whether it had to wait or start an instance: the time left must then be
// measured again.
func (p *Plugin) acquire(ctx context.Context, deadline time.Time) (inst *instance, waited bool, refused *Response) {
	if inst := p.pool.tryGet(); inst != nil {
		return inst, false, nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	inst, fresh, err := p.pool.get(ctx)
	switch {
	case errors.Is(err, errQueueFull):
		return nil, true, hostResp(abi.StatusTooManyRequests, FailRejected, fmt.Errorf("%d calls already wait for an instance", p.lim.Queue))
	case err != nil:
		why := "deadline passed"
		if errors.Is(err, context.Canceled) {
			why = "the caller gave up"
		}
		return nil, true, hostResp(abi.StatusTimeout, FailTimeout, fmt.Errorf("%s waiting for an instance", why))
	case !fresh:
		return inst, true, nil
	}
	inst, err = p.newInstance(context.WithoutCancel(ctx))
	if err != nil {
		p.pool.free()
		p.log.Error("a new instance failed to start", "error", err)
		return nil, true, hostResp(abi.StatusUnavailable, FailInstance, err)
	}
	return inst, true, nil
}

// Abort ends every call in progress, as if each caller had given up: they
// answer 504. It is for shutdowns that cannot wait for the deadlines; the
// plugin serves no further call well after it, so Close it.
func (p *Plugin) Abort() {
	p.liveMu.Lock()
	defer p.liveMu.Unlock()
	for inst := range p.live {
		inst.ctx.end(context.Canceled)
	}
}

// discard closes an instance after a failure and frees its slot.
func (p *Plugin) discard(inst *instance) {
	p.liveMu.Lock()
	delete(p.live, inst)
	p.liveMu.Unlock()
	_ = inst.mod.Close(context.Background())
	p.pool.free()
}

// idleEvery is how many calls an instance serves between two
// outpost_idle calls, unless its memory grew: idling after every call cost
// a Go guest about 30 us per call (BenchmarkCall256, one instance).
const idleEvery = 64

// reuse returns an instance to the pool, after outpost_idle when it is due
// (its memory grew, or idleEvery calls), off the caller's path.
func (p *Plugin) reuse(inst *instance) {
	inst.sinceIdle++
	size := len(inst.mem.buf)
	if inst.idle == nil || (size <= inst.memAtIdle && inst.sinceIdle < idleEvery) {
		p.pool.put(inst)
		return
	}
	inst.sinceIdle, inst.memAtIdle = 0, size
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), p.lim.Timeout)
		defer cancel()
		if err := inst.idle.CallWithStack(context.WithValue(ctx, callKey{}, &call{}), nil); err != nil {
			p.discard(inst)
			return
		}
		p.pool.put(inst)
	}()
}

// pool bounds the instances of a plugin: slots holds a token per instance
// alive, idle the instances not serving.
type pool struct {
	slots   chan struct{}
	idle    chan *instance
	waiting atomic.Int32
	queue   int32
}

var errQueueFull = errors.New("queue full")

func (q *pool) init(instances, queue int) {
	q.slots = make(chan struct{}, instances)
	q.idle = make(chan *instance, instances)
	q.queue = int32(queue)
}

// tryGet returns an idle instance, or nil.
func (q *pool) tryGet() *instance {
	select {
	case inst := <-q.idle:
		return inst
	default:
		return nil
	}
}

// get returns an idle instance, or fresh = true when the caller may make a
// new one (it holds a slot).
func (q *pool) get(ctx context.Context) (inst *instance, fresh bool, err error) {
	if inst := q.tryGet(); inst != nil {
		return inst, false, nil
	}
	if q.waiting.Add(1) > q.queue {
		q.waiting.Add(-1)
		return nil, false, errQueueFull
	}
	defer q.waiting.Add(-1)
	select {
	case inst := <-q.idle:
		return inst, false, nil
	case q.slots <- struct{}{}:
		return nil, true, nil
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

func (q *pool) put(inst *instance) { q.idle <- inst }

func (q *pool) free() { <-q.slots }

// breaker opens after a run of failures, answers 503 while open, and lets
// one call through after the open period (half-open). While nothing fails
// it takes no lock.
type breaker struct {
	failing  atomic.Bool // failures > 0 or a probe: take the lock
	mu       sync.Mutex
	after    int
	open     time.Duration
	failures int
	openTill time.Time
	probing  bool
}

func (b *breaker) init(after int, open time.Duration) { b.after, b.open = after, open }

// allow reports whether a call may go on, and whether it is the one probe
// of a half-open breaker: only the probe's outcome closes or reopens it.
func (b *breaker) allow() (ok, probe bool) {
	if !b.failing.Load() {
		return true, false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failures < b.after {
		return true, false
	}
	if time.Now().Before(b.openTill) || b.probing {
		return false, false
	}
	b.probing = true
	return true, true
}

// success ends the run of failures.
func (b *breaker) success(probe bool) {
	if !b.failing.Load() {
		return
	}
	b.mu.Lock()
	b.failures = 0
	if probe {
		b.probing = false
	}
	b.failing.Store(false)
	b.mu.Unlock()
}

// failure counts one; the breaker opens, or opens again, at the bound.
func (b *breaker) failure(probe bool) {
	b.mu.Lock()
	b.failures++
	b.failing.Store(true)
	if probe {
		b.probing = false
	}
	if b.failures >= b.after {
		b.openTill = time.Now().Add(b.open)
	}
	b.mu.Unlock()
}

// release ends a call that says nothing about the plugin's health: a probe
// that ends so leaves the breaker open for the next call to probe.
func (b *breaker) release(probe bool) {
	if !probe {
		return
	}
	b.mu.Lock()
	b.probing = false
	b.mu.Unlock()
}

func (b *breaker) isOpen() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failures >= b.after
}

// Stats are a plugin's counters since it was loaded.
type Stats struct {
	Running     int              `json:"running"` // calls in the guest now
	Calls       int64            `json:"calls"`
	Failures    map[string]int64 `json:"failures"` // by kind
	LogsDropped int64            `json:"logs_dropped"`
	BreakerOpen bool             `json:"breaker_open"`
	Latency     time.Duration    `json:"latency_ns"` // total time in Call
	// LatencyBuckets counts the calls by time in Call: LatencyBuckets[i]
	// those that took at most LatencyBounds[i] (not cumulative); the last
	// element, those that took longer than every bound.
	LatencyBuckets []int64 `json:"latency_buckets"`
}

// LatencyBounds are the upper bounds of Stats.LatencyBuckets.
var LatencyBounds = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second, 30 * time.Second,
}

type stats struct {
	running     atomic.Int32 // calls in the guest now
	calls       atomic.Int64
	failures    [failKindCount]atomic.Int64
	logsDropped atomic.Int64
	latency     atomic.Int64
	buckets     [len(LatencyBounds) + 1]atomic.Int64
}

func (s *stats) observe(d time.Duration, r *Response) {
	s.calls.Add(1)
	s.latency.Add(int64(d))
	i := sort.Search(len(LatencyBounds), func(i int) bool { return d <= LatencyBounds[i] })
	s.buckets[i].Add(1)
	// Err is only ever set by hostResp.
	if ce, ok := r.Err.(*CallError); ok {
		for i, k := range failKinds {
			if k == ce.Kind {
				s.failures[i].Add(1)
			}
		}
	}
}

// Stats returns the plugin's counters.
func (p *Plugin) Stats() Stats {
	st := Stats{
		Running:     int(p.stats.running.Load()),
		Calls:       p.stats.calls.Load(),
		Failures:    map[string]int64{},
		LogsDropped: p.stats.logsDropped.Load(),
		BreakerOpen: p.breaker.isOpen(),
		Latency:     time.Duration(p.stats.latency.Load()),
	}
	st.LatencyBuckets = make([]int64, len(p.stats.buckets))
	for i := range p.stats.buckets {
		st.LatencyBuckets[i] = p.stats.buckets[i].Load()
	}
	for i, k := range failKinds {
		st.Failures[k] = p.stats.failures[i].Load()
	}
	return st
}
