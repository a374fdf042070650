package broker

import (
	"net"
	"sync"
	"time"
)

// AuthBackoff slows password guessing from one remote address.
//
// After FreeFailures failed logins from an IP address, each further failure
// locks the address out for a backoff that doubles from one second up to
// Max: while it is locked out, every login from it is refused at once
// (MQTT 5 CONNACK 0x9F Connection rate exceeded, MQTT 3.1.1 0x03 Server
// unavailable) without checking the password, even a right one. The CONNACK
// of a failed login is also delayed by the backoff, at most two seconds. A
// successful login clears the address's failures; so do 15 minutes without
// a failure.
type AuthBackoff struct {
	// FreeFailures are the failures allowed before the backoff begins.
	FreeFailures int
	// Max caps the lockout. 0 turns the backoff off.
	Max time.Duration
}

const (
	// maxAttemptsPerRemote are the logins from one address whose password
	// may be checked at once; more are refused at once, so that parallel
	// guesses cannot all pass the lockout check before the first fails.
	maxAttemptsPerRemote = 2
	// verifyWait bounds the wait for a password check to start when the
	// broker is checking as many as it may.
	verifyWait       = 2 * time.Second
	backoffBase      = time.Second
	maxConnackDelay  = 2 * time.Second
	forgetFailures   = 15 * time.Minute
	maxTrackedRemote = 16384
)

// authGuard counts failed logins by remote IP address. It is safe for
// concurrent use.
type authGuard struct {
	cfg AuthBackoff
	now func() time.Time

	mu     sync.Mutex
	peers  map[string]*failures
	active map[string]int // logins in progress by address
}

type failures struct {
	n     int
	last  time.Time // of the last failure
	until time.Time // locked out until
}

func newAuthGuard(cfg AuthBackoff, now func() time.Time) *authGuard {
	return &authGuard{cfg: cfg, now: now, peers: map[string]*failures{}, active: map[string]int{}}
}

// remoteIP is the key of a remote host:port for the guard: the IPv4
// address, or the /64 prefix of an IPv6 address (a host is routinely given a
// whole /64 and can use any address in it).
func remoteIP(remote string) string {
	host := remote
	if h, _, err := net.SplitHostPort(remote); err == nil {
		host = h
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return host
	}
	if ip4 := ip.To4(); ip4 != nil {
		return ip4.String()
	}
	return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
}

// locked reports whether ip is locked out now.
func (g *authGuard) locked(ip string) bool {
	if g.cfg.Max <= 0 {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.peers[ip]
	return f != nil && g.now().Before(f.until)
}

// begin records a login from ip in progress, or returns false when
// maxAttemptsPerRemote already are. A true return must be followed by end.
func (g *authGuard) begin(ip string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.active[ip] >= maxAttemptsPerRemote {
		return false
	}
	g.active[ip]++
	return true
}

// end records the end of a login begun with begin.
func (g *authGuard) end(ip string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.active[ip] <= 1 {
		delete(g.active, ip)
		return
	}
	g.active[ip]--
}

// fail records a failed login from ip and returns how long to delay its
// refusal.
func (g *authGuard) fail(ip string) time.Duration {
	if g.cfg.Max <= 0 {
		return 0
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	f := g.peers[ip]
	if f == nil || now.Sub(f.last) > forgetFailures {
		if len(g.peers) >= maxTrackedRemote {
			g.sweepLocked(now)
		}
		f = &failures{}
		g.peers[ip] = f
	}
	f.n++
	f.last = now
	over := f.n - g.cfg.FreeFailures
	if over <= 0 {
		return 0
	}
	d := g.cfg.Max
	if over <= 30 && backoffBase<<(over-1) < d {
		d = backoffBase << (over - 1)
	}
	f.until = now.Add(d)
	return min(d, maxConnackDelay)
}

// succeed clears ip's failures.
func (g *authGuard) succeed(ip string) {
	if g.cfg.Max <= 0 {
		return
	}
	g.mu.Lock()
	delete(g.peers, ip)
	g.mu.Unlock()
}

// sweepLocked forgets addresses without a recent failure; when all are
// recent (many addresses guessing at once), it forgets the one whose last
// failure is the oldest, so that the table stays bounded and an address
// that keeps failing stays locked out.
func (g *authGuard) sweepLocked(now time.Time) {
	var oldest string
	var oldestLast time.Time
	for ip, f := range g.peers {
		if now.Sub(f.last) > forgetFailures && !now.Before(f.until) {
			delete(g.peers, ip)
			continue
		}
		if oldest == "" || f.last.Before(oldestLast) {
			oldest, oldestLast = ip, f.last
		}
	}
	if len(g.peers) >= maxTrackedRemote {
		delete(g.peers, oldest)
	}
}

// RateLimit bounds the publishes of each client.
type RateLimit struct {
	// MessagesPerSecond is the sustained rate; 0 = no limit.
	MessagesPerSecond float64
	// Burst is how many publishes may come at once above the rate; 0 =
	// MessagesPerSecond rounded up (at least 1).
	Burst int
}

// bucket is a token bucket. It is not safe for concurrent use: mochi reads
// one client's packets on one goroutine.
type bucket struct {
	rate, burst, tokens float64
	last                time.Time
}

func newBucket(r RateLimit, now time.Time) *bucket {
	burst := float64(r.Burst)
	if burst <= 0 {
		burst = max(1, float64(int(r.MessagesPerSecond+0.999999)))
	}
	return &bucket{rate: r.MessagesPerSecond, burst: burst, tokens: burst, last: now}
}

// take takes a token, or returns false when none is left.
func (b *bucket) take(now time.Time) bool {
	if el := now.Sub(b.last); el > 0 {
		b.tokens = min(b.burst, b.tokens+el.Seconds()*b.rate)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
