package broker

import (
	"fmt"
	"testing"
	"time"
)

// TestRemoteIP: IPv4 addresses are keys by themselves; IPv6 addresses by
// their /64, which one host can use all of.
func TestRemoteIP(t *testing.T) {
	for _, tc := range []struct{ remote, want string }{
		{"192.0.2.7:1883", "192.0.2.7"},
		{"[2001:db8:1:2:3:4:5:6]:1883", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2::ffff]:1", "2001:db8:1:2::/64"},
		{"[::ffff:192.0.2.7]:1883", "192.0.2.7"},
		{"pipe", "pipe"},
	} {
		if got := remoteIP(tc.remote); got != tc.want {
			t.Errorf("remoteIP(%q) = %q, want %q", tc.remote, got, tc.want)
		}
	}
}

// TestGuardIPv6Prefix: failures from different addresses of one IPv6 /64
// add up to one lockout; another /64 is not locked out.
func TestGuardIPv6Prefix(t *testing.T) {
	clock := newFakeClock()
	g := newAuthGuard(AuthBackoff{FreeFailures: 3, Max: 30 * time.Second}, clock.now)
	for i := 1; i <= 4; i++ {
		g.fail(remoteIP(fmt.Sprintf("[2001:db8::%x]:1883", i)))
	}
	if !g.locked(remoteIP("[2001:db8::ffff:1]:1883")) {
		t.Fatal("a fifth address of the same /64 is not locked out after 4 failures from the /64")
	}
	if g.locked(remoteIP("[2001:db8:0:1::1]:1883")) {
		t.Fatal("another /64 is locked out")
	}
}

// TestGuardFullKeepsLockout: when the guard tracks as many addresses as it
// may, a new address evicts the one whose last failure is the oldest, not
// every lockout: an attacker that keeps failing stays locked out.
func TestGuardFullKeepsLockout(t *testing.T) {
	clock := newFakeClock()
	g := newAuthGuard(AuthBackoff{FreeFailures: 3, Max: 30 * time.Second}, clock.now)
	for i := range maxTrackedRemote - 1 {
		g.fail(fmt.Sprintf("10.%d.%d.%d", i>>16, (i>>8)&0xff, i&0xff))
		clock.advance(time.Nanosecond) // 10.0.0.0 failed first
	}
	clock.advance(time.Second)
	const attacker = "192.0.2.66"
	for range 4 {
		g.fail(attacker)
	}
	if !g.locked(attacker) {
		t.Fatal("the attacker is not locked out")
	}
	clock.advance(time.Millisecond) // within the attacker's 1s lockout
	for i := range 100 {
		g.fail(fmt.Sprintf("172.16.0.%d", i))
	}
	if !g.locked(attacker) {
		t.Fatal("new addresses in a full table lifted the attacker's lockout")
	}
	g.mu.Lock()
	n := len(g.peers)
	_, first := g.peers["10.0.0.0"]
	g.mu.Unlock()
	if n != maxTrackedRemote || first {
		t.Fatalf("%d addresses tracked (want %d), oldest still tracked: %v", n, maxTrackedRemote, first)
	}
}
