package sandbox

import (
	"context"
	"sync"
	"time"
)

// callCtx is the context the calls into one instance run under: it carries
// the call to the host functions, and it is done when the current call's
// deadline passes or its caller's context ends, which is when wazero ends
// the call. There is one per instance, armed again for each call, so that
// a call makes no timeout context, timer or channel of ours (wazero still
// starts a goroutine per call, and a cancellable caller's context costs a
// context.AfterFunc). Once done it stays done: the instance it belongs to is
// discarded.
type callCtx struct {
	c     *call
	timer *time.Timer   // fires at the deadline of the call in progress
	done  chan struct{} // closed by end

	mu       sync.Mutex
	err      error
	deadline time.Time
}

func newCallCtx(c *call) *callCtx {
	x := &callCtx{c: c, done: make(chan struct{})}
	x.timer = time.AfterFunc(time.Hour, func() { x.end(context.DeadlineExceeded) })
	x.timer.Stop()
	return x
}

// arm starts a call that must end by deadline, timeout from now.
func (x *callCtx) arm(deadline time.Time, timeout time.Duration) {
	x.mu.Lock()
	x.deadline = deadline
	x.mu.Unlock()
	x.timer.Reset(timeout)
}

// disarm ends the call in progress. It reports false when the context was
// done meanwhile: wazero has then closed the module, or may yet, and the
// instance must not serve again.
func (x *callCtx) disarm() bool {
	stopped := x.timer.Stop()
	x.mu.Lock()
	defer x.mu.Unlock()
	return stopped && x.err == nil
}

// end makes the context done with err; the first err stays.
func (x *callCtx) end(err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.err == nil {
		x.err = err
		close(x.done)
	}
}

func (x *callCtx) Deadline() (time.Time, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.deadline, true
}

func (x *callCtx) Done() <-chan struct{} { return x.done }

func (x *callCtx) Err() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.err
}

func (x *callCtx) Value(key any) any {
	if key == (callKey{}) {
		return x.c
	}
	return nil
}

var _ context.Context = (*callCtx)(nil)
