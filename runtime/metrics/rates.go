package metrics

import (
	"sync"
	"time"
)

// RateWindow is the window over which Rates measures the drain rate.
const RateWindow = 10 * time.Second

// Rates derives what counters alone do not say: the time spent offline,
// the drain rate and the time to drain. Feed it Observe about once a
// second. Safe for concurrent use.
type Rates struct {
	mu      sync.Mutex
	last    time.Time
	up      bool
	offline time.Duration
	samples []sample // within RateWindow, oldest first
}

type sample struct {
	at        time.Time
	forwarded int64
	accepted  int64
}

// Observe records the uplink's state at now: whether it is connected, and
// the running totals of messages forwarded upstream and accepted into the
// outbox.
func (r *Rates) Observe(now time.Time, connected bool, forwarded, accepted int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.last.IsZero() && !r.up && now.After(r.last) {
		r.offline += now.Sub(r.last)
	}
	r.last, r.up = now, connected
	r.samples = append(r.samples, sample{now, forwarded, accepted})
	cut := 0
	for cut < len(r.samples)-2 && now.Sub(r.samples[cut+1].at) >= RateWindow {
		cut++
	}
	r.samples = r.samples[cut:]
}

// Offline is the time without a connection up to now.
func (r *Rates) Offline(now time.Time) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.offline
	if !r.up && !r.last.IsZero() && now.After(r.last) {
		d += now.Sub(r.last)
	}
	return d
}

// Drain returns the messages forwarded per second over the window, and
// the time to empty a backlog of n messages at the net rate (forwarded
// less accepted); -1 when the backlog does not shrink. With fewer than
// two samples both are 0 (and the time -1 unless n is 0).
func (r *Rates) Drain(n int64) (perSec float64, toDrain time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n == 0 {
		toDrain = 0
	} else {
		toDrain = -1
	}
	if len(r.samples) < 2 {
		return 0, toDrain
	}
	a, b := r.samples[0], r.samples[len(r.samples)-1]
	secs := b.at.Sub(a.at).Seconds()
	if secs <= 0 {
		return 0, toDrain
	}
	perSec = float64(b.forwarded-a.forwarded) / secs
	net := perSec - float64(b.accepted-a.accepted)/secs
	if n > 0 && net > 0 {
		toDrain = time.Duration(float64(n) / net * float64(time.Second))
	}
	return perSec, toDrain
}
