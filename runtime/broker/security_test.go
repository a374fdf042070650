package broker

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/testpki"
	"github.com/outpost-edge/outpost/storage"
)

// testHash is a cheap bcrypt hash of password for tests.
func testHash(t testing.TB, password string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// fakeClock is the broker's clock in tests: it moves only when told.
type fakeClock struct {
	ns     atomic.Int64
	mu     sync.Mutex
	sleeps []time.Duration
}

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }
func (c *fakeClock) sleep(d time.Duration, _ <-chan struct{}) {
	c.mu.Lock()
	c.sleeps = append(c.sleeps, d)
	c.mu.Unlock()
}
func (c *fakeClock) slept() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.sleeps...)
}

// secureBroker starts a broker with two device users and the ACL every
// device gets: its own topics (%u) and its client's (%c).
func secureBroker(t *testing.T, configure func(*Options)) *Broker {
	t.Helper()
	opts := Options{
		Listeners: []Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "r", true },
		Store:     func(_ *storage.Message, done func(uint64, error)) error { done(1, nil); return nil },
		Users: []User{
			{Username: "device-a", PasswordHash: testHash(t, "secret-a")},
			{Username: "device-b", PasswordHash: testHash(t, "secret-b")},
			{Username: "app", PasswordHash: testHash(t, "secret-app"),
				ACL: ACL{Publish: []string{"outpost/methods/+"}, Subscribe: []string{"outpost/responses/%c/#"}}},
		},
		UserACL: ACL{
			Publish:   []string{"devices/%u/#", "clients/%c/#"},
			Subscribe: []string{"devices/%u/#", "clients/%c/#"},
		},
	}
	if configure != nil {
		configure(&opts)
	}
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// login connects an MQTT 5 client with a username and password (none when
// username is ""), returning the CONNACK.
func login(addr, id, username, password string, configure func(*paho.ClientConfig)) (*paho.Client, *paho.Connack, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	return loginConn(conn, id, username, password, configure)
}

func loginConn(conn net.Conn, id, username, password string, configure func(*paho.ClientConfig)) (*paho.Client, *paho.Connack, error) {
	return connectConn(conn, newConnect(id, username, password), configure)
}

// newConnect is an MQTT 5 CONNECT with a clean start and, unless username
// is "", credentials.
func newConnect(id, username, password string) *paho.Connect {
	cp := &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}
	if username != "" {
		cp.Username, cp.UsernameFlag = username, true
		cp.Password, cp.PasswordFlag = []byte(password), true
	}
	return cp
}

// connect dials addr and sends cp.
func connect(addr string, cp *paho.Connect, configure func(*paho.ClientConfig)) (*paho.Client, *paho.Connack, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	return connectConn(conn, cp, configure)
}

func connectConn(conn net.Conn, cp *paho.Connect, configure func(*paho.ClientConfig)) (*paho.Client, *paho.Connack, error) {
	cfg := paho.ClientConfig{ClientID: cp.ClientID, Conn: conn}
	if configure != nil {
		configure(&cfg)
	}
	c := paho.NewClient(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := c.Connect(ctx, cp)
	if err != nil {
		conn.Close()
		return nil, ack, err
	}
	return c, ack, nil
}

// mustLogin is login that fails the test on a refusal, and disconnects
// with the test.
func mustLogin(t *testing.T, addr, id, username, password string, configure func(*paho.ClientConfig)) *paho.Client {
	t.Helper()
	c, ack, err := login(addr, id, username, password, configure)
	if err != nil {
		t.Fatalf("login %s as %q: %v (connack %+v)", id, username, err, ack)
	}
	t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
	return c
}

// connackCode is the reason code of a refused login.
func connackCode(t *testing.T, addr, id, username, password string) byte {
	t.Helper()
	c, ack, err := login(addr, id, username, password, nil)
	if err == nil {
		_ = c.Disconnect(&paho.Disconnect{})
		t.Fatalf("login %s as %q was accepted", id, username)
	}
	if ack == nil {
		t.Fatalf("login %s as %q: no CONNACK: %v", id, username, err)
	}
	return ack.ReasonCode
}

// connackV311 sends an MQTT 3.1.1 CONNECT and returns the CONNACK's return
// code.
func connackV311(t *testing.T, addr, id, username, password string) byte {
	t.Helper()
	return connackV311With(t, addr, packets.ConnectParams{ClientIdentifier: id,
		UsernameFlag: username != "", Username: []byte(username), PasswordFlag: username != "", Password: []byte(password)})
}

// connackV311With sends an MQTT 3.1.1 CONNECT with c (a clean session) and
// returns the CONNACK's return code.
func connackV311With(t *testing.T, addr string, c packets.ConnectParams) byte {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c.ProtocolName, c.Clean, c.Keepalive = []byte("MQTT"), true, 30
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4, Connect: c}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(conn, ack); err != nil {
		t.Fatalf("reading CONNACK: %v", err)
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		t.Fatalf("not a CONNACK: % x", ack)
	}
	return ack[3]
}

func publish(c *paho.Client, topic string, qos byte, props *paho.PublishProperties) (*paho.PublishResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Payload: []byte(topic), Properties: props})
}

func subscribe(t *testing.T, c *paho.Client, filter string) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if ack == nil || len(ack.Reasons) != 1 {
		t.Fatalf("subscribe %q: %+v, %v", filter, ack, err)
	}
	return ack.Reasons[0]
}

// received collects the topics a client receives.
func received() (func(*paho.ClientConfig), <-chan string) {
	ch := make(chan string, 100)
	return func(cfg *paho.ClientConfig) {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){func(p paho.PublishReceived) (bool, error) {
			ch <- p.Packet.Topic
			return true, nil
		}}
	}, ch
}

func next(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("no message received")
		return ""
	}
}

const notAuthorized = 0x87

// TestACLDeviceCannotReachAnotherDevice: device A may publish and subscribe
// under devices/device-a/ (%u) and clients/a-1/ (%c), and neither publish
// into nor subscribe to device B's topics; B receives only what is its own.
func TestACLDeviceCannotReachAnotherDevice(t *testing.T) {
	b := secureBroker(t, nil)
	addr := b.Addrs()[0]
	onB, gotB := received()
	devB := mustLogin(t, addr, "b-1", "device-b", "secret-b", onB)
	if code := subscribe(t, devB, "devices/device-b/#"); code != 1 {
		t.Fatalf("B subscribing to its own topics: reason 0x%02x, want granted QoS 1", code)
	}
	if code := subscribe(t, devB, "clients/b-1/#"); code != 1 {
		t.Fatalf("B subscribing to its client's topics: reason 0x%02x, want granted QoS 1", code)
	}
	devA := mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)

	t.Run("publish", func(t *testing.T) {
		for _, topic := range []string{"devices/device-b/telemetry", "clients/b-1/cmd", "devices/other"} {
			resp, err := publish(devA, topic, 1, nil)
			if resp == nil || resp.ReasonCode != notAuthorized {
				t.Errorf("A publishing QoS 1 to %s: %+v, %v; want PUBACK 0x87", topic, resp, err)
			}
			// QoS 0 has no answer: the broker drops it (the marker below
			// shows B never got it).
			if _, err := publish(devA, topic, 0, nil); err != nil {
				t.Fatal(err)
			}
		}
		for _, topic := range []string{"devices/device-a/telemetry", "clients/a-1/x"} {
			if resp, err := publish(devA, topic, 1, nil); err != nil || resp.ReasonCode >= 0x80 {
				t.Errorf("A publishing to its own %s: %+v, %v", topic, resp, err)
			}
		}
		// B's own publish comes back to it; had A's gone through, they
		// would have arrived first.
		if _, err := publish(devB, "devices/device-b/marker", 1, nil); err != nil {
			t.Fatal(err)
		}
		if got := next(t, gotB); got != "devices/device-b/marker" {
			t.Fatalf("B received %q, want only its own marker", got)
		}
	})

	t.Run("subscribe", func(t *testing.T) {
		for _, f := range []string{"devices/device-b/#", "devices/+/telemetry", "devices/#", "#", "clients/b-1/#",
			"$share/g/devices/device-b/#", "+/device-b/telemetry"} {
			if code := subscribe(t, devA, f); code != notAuthorized {
				t.Errorf("A subscribing to %q: reason 0x%02x, want 0x87", f, code)
			}
		}
		for _, f := range []string{"devices/device-a/#", "devices/device-a/+/x", "clients/a-1/#", "$share/g/devices/device-a/x"} {
			if code := subscribe(t, devA, f); code >= 0x80 {
				t.Errorf("A subscribing to its own %q: reason 0x%02x", f, code)
			}
		}
	})

	t.Run("session takeover", func(t *testing.T) {
		// A connecting with B's client id would inherit B's session.
		if code := connackCode(t, addr, "b-1", "device-a", "secret-a"); code != 0x85 {
			t.Fatalf("A connecting as client b-1: CONNACK 0x%02x, want 0x85 Client identifier not valid", code)
		}
	})
	if st := b.Stats(); st.ACLDenied < 13 {
		t.Fatalf("stats %+v: want at least 13 ACL refusals", st)
	}
}

// TestACLRequestTopics: the agent's request topics work for a user the ACL
// allows, and the agent answers only on a response topic the requester
// could publish to itself.
func TestACLRequestTopics(t *testing.T) {
	served := make(chan string, 10)
	b := secureBroker(t, nil)
	if err := b.HandleRequests("outpost/methods/+", 1, func(r Request) {
		served <- r.Topic + " -> " + r.ResponseTopic
		_ = b.Respond(Response{Topic: r.ResponseTopic, Payload: []byte("ok"), QoS: 1, CorrelationData: r.CorrelationData})
	}); err != nil {
		t.Fatal(err)
	}
	addr := b.Addrs()[0]
	onApp, gotApp := received()
	app := mustLogin(t, addr, "app-1", "app", "secret-app", onApp)
	for _, f := range []string{"outpost/responses/app-1/#", "clients/app-1/#"} {
		if code := subscribe(t, app, f); code >= 0x80 {
			t.Fatalf("app subscribing to %s: 0x%02x", f, code)
		}
	}
	// The app may not publish to outpost/responses/... itself, so the
	// agent does not answer there on its behalf.
	resp, err := publish(app, "outpost/methods/echo", 1, &paho.PublishProperties{ResponseTopic: "outpost/responses/app-1/1"})
	if resp == nil || resp.ReasonCode != notAuthorized {
		t.Fatalf("request with a response topic the app may not publish to: %+v, %v; want PUBACK 0x87", resp, err)
	}
	devA := mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)
	if resp, err := publish(devA, "outpost/methods/echo", 1, nil); resp == nil || resp.ReasonCode != notAuthorized {
		t.Fatalf("device A calling a method it has no ACL for: %+v, %v; want PUBACK 0x87", resp, err)
	}
	resp, err = publish(app, "outpost/methods/echo", 1, &paho.PublishProperties{ResponseTopic: "clients/app-1/r"})
	if err != nil || resp.ReasonCode >= 0x80 {
		t.Fatalf("request: %+v, %v", resp, err)
	}
	// The handler sees requests in order: the refused ones would come
	// first.
	if got := next(t, served); got != "outpost/methods/echo -> clients/app-1/r" {
		t.Fatalf("request served: %q, want only the allowed one", got)
	}
	if got := next(t, gotApp); got != "clients/app-1/r" {
		t.Fatalf("app received %q, want the response on clients/app-1/r", got)
	}
}

// TestAnonymousLoopback: with users configured, an anonymous client on a
// loopback listener still connects and may do anything, unless
// AnonymousACL says otherwise; off loopback it is refused.
func TestAnonymousLoopback(t *testing.T) {
	b := secureBroker(t, nil)
	c := mustLogin(t, b.Addrs()[0], "anon", "", "", nil)
	if resp, err := publish(c, "devices/device-b/x", 1, nil); err != nil || resp.ReasonCode >= 0x80 {
		t.Fatalf("anonymous loopback publish: %+v, %v", resp, err)
	}
	if code := subscribe(t, c, "#"); code >= 0x80 {
		t.Fatalf("anonymous loopback subscribe: 0x%02x", code)
	}

	limited := secureBroker(t, func(o *Options) {
		o.AnonymousACL = &ACL{Publish: []string{"public/%c/#"}, Subscribe: []string{"public/#"}}
	})
	c = mustLogin(t, limited.Addrs()[0], "anon", "", "", nil)
	if resp, _ := publish(c, "devices/device-b/x", 1, nil); resp == nil || resp.ReasonCode != notAuthorized {
		t.Fatalf("anonymous publish outside anonymous_acl: %+v, want 0x87", resp)
	}
	if resp, err := publish(c, "public/anon/x", 1, nil); err != nil || resp.ReasonCode >= 0x80 {
		t.Fatalf("anonymous publish inside anonymous_acl: %+v, %v", resp, err)
	}
	if code := subscribe(t, c, "#"); code != notAuthorized {
		t.Fatalf("anonymous subscribe outside anonymous_acl: 0x%02x, want 0x87", code)
	}

	// A listener on every address is not loopback: anonymous clients are
	// refused there (0x86, MQTT 3.1.1 0x05 Not authorized) unless allow_anonymous is on,
	// while users still log in.
	for _, allow := range []bool{false, true} {
		wide := secureBroker(t, func(o *Options) { o.Listeners = []Listener{{Address: "0.0.0.0:0", AllowAnonymous: allow}} })
		_, port, _ := net.SplitHostPort(wide.Addrs()[0])
		addr := net.JoinHostPort("127.0.0.1", port)
		if allow {
			mustLogin(t, addr, "anon", "", "", nil)
			continue
		}
		if code := connackCode(t, addr, "anon", "", ""); code != 0x86 {
			t.Fatalf("anonymous client off loopback: CONNACK 0x%02x, want 0x86", code)
		}
		if code := connackV311(t, addr, "anon", "", ""); code != 0x05 {
			t.Fatalf("anonymous MQTT 3.1.1 client off loopback: CONNACK 0x%02x, want 0x05", code)
		}
		mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)
		if st := wide.Stats(); st.Anonymous != 2 {
			t.Fatalf("stats %+v, want 2 anonymous refusals", st)
		}
	}
}

// TestWrongPasswordRefused: a wrong password or an unknown user gets
// CONNACK 0x86 (MQTT 5) or 0x04 (MQTT 3.1.1), and is counted; the right
// one connects.
func TestWrongPasswordRefused(t *testing.T) {
	b := secureBroker(t, func(o *Options) { o.AuthBackoff = AuthBackoff{} })
	addr := b.Addrs()[0]
	tests := []struct{ name, user, pass string }{
		{"wrong password", "device-a", "secret-b"},
		{"unknown user", "device-z", "secret-a"},
		{"username in another case", "Device-A", "secret-a"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if code := connackCode(t, addr, "a-1", tc.user, tc.pass); code != 0x86 {
				t.Fatalf("MQTT 5 CONNACK 0x%02x, want 0x86 Bad username or password", code)
			}
			if code := connackV311(t, addr, "a-1", tc.user, tc.pass); code != 0x04 {
				t.Fatalf("MQTT 3.1.1 CONNACK 0x%02x, want 0x04 bad user name or password", code)
			}
		})
	}
	if code := connackV311(t, addr, "a-1", "device-a", "secret-a"); code != 0 {
		t.Fatalf("MQTT 3.1.1 with the right password: CONNACK 0x%02x", code)
	}
	mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)
	if st := b.Stats(); st.AuthFailures != 6 {
		t.Fatalf("stats %+v, want 6 auth failures", st)
	}
}

// TestMosquittoClientsWithACL: Mosquitto's command-line clients, MQTT 5,
// see the same: a wrong password is refused, device A cannot subscribe to
// device B's topics, and a publish of A's into B's topics never reaches B.
func TestMosquittoClientsWithACL(t *testing.T) {
	mosqtest.Require(t, "mosquitto_pub", "mosquitto_sub")
	b := secureBroker(t, nil)
	host, port, _ := net.SplitHostPort(b.Addrs()[0])
	run := func(tool string, args ...string) (string, error) {
		path, err := mosqtest.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, err := execCommand(ctx, path, append([]string{"-h", host, "-p", port, "-V", "mqttv5"}, args...)...)
		return out, err
	}
	out, err := run("mosquitto_pub", "-i", "a-1", "-u", "device-a", "-P", "wrong", "-t", "devices/device-a/x", "-m", "x")
	if err == nil {
		t.Fatalf("mosquitto_pub with a wrong password succeeded: %s", out)
	}
	t.Logf("wrong password: %s", out)
	out, err = run("mosquitto_sub", "-i", "a-1", "-u", "device-a", "-P", "secret-a", "-t", "devices/device-b/#", "-C", "1", "-W", "5")
	if !strings.Contains(out, "denied") {
		t.Fatalf("mosquitto_sub on B's topics as A: %v %q, want the subscription denied", err, out)
	}

	onB, gotB := received()
	devB := mustLogin(t, b.Addrs()[0], "b-1", "device-b", "secret-b", onB)
	if code := subscribe(t, devB, "devices/device-b/#"); code >= 0x80 {
		t.Fatalf("B subscribing: 0x%02x", code)
	}
	if out, err := run("mosquitto_pub", "-i", "a-1", "-u", "device-a", "-P", "secret-a", "-q", "1",
		"-t", "devices/device-b/intruder", "-m", "x"); err != nil {
		t.Logf("A publishing into B's topics: %v %s", err, out)
	}
	if out, err := run("mosquitto_pub", "-i", "b-2", "-u", "device-b", "-P", "secret-b", "-q", "1",
		"-t", "devices/device-b/marker", "-m", "x"); err != nil {
		t.Fatalf("B publishing: %v %s", err, out)
	}
	if got := next(t, gotB); got != "devices/device-b/marker" {
		t.Fatalf("B received %q first, want its own marker", got)
	}
}

// TestLoginBackoff: after the free failures, each failure locks the
// address out for a doubling backoff; while locked out even the right
// password is refused (0x9F, MQTT 3.1.1 0x03); once the backoff has passed
// on the broker's clock, it connects and the failures are forgotten.
func TestLoginBackoff(t *testing.T) {
	clock := newFakeClock()
	b := secureBroker(t, func(o *Options) {
		o.AuthBackoff = AuthBackoff{FreeFailures: 2, Max: 3 * time.Second}
		o.now, o.sleep = clock.now, clock.sleep
	})
	addr := b.Addrs()[0]
	for i := range 2 {
		if code := connackCode(t, addr, "a-1", "device-a", "guess"); code != 0x86 {
			t.Fatalf("free failure %d: CONNACK 0x%02x, want 0x86", i, code)
		}
	}
	if got := clock.slept(); len(got) != 2 || got[0] != 0 || got[1] != 0 {
		t.Fatalf("free failures delayed %v, want no delay", got)
	}
	if code := connackCode(t, addr, "a-1", "device-a", "guess"); code != 0x86 {
		t.Fatalf("third failure: CONNACK 0x%02x, want 0x86", code)
	}
	// Locked out for 1s: the right password is refused without a check.
	if code := connackCode(t, addr, "a-1", "device-a", "secret-a"); code != 0x9F {
		t.Fatalf("right password while locked out: CONNACK 0x%02x, want 0x9F Connection rate exceeded", code)
	}
	if code := connackV311(t, addr, "a-1", "device-a", "secret-a"); code != 0x03 {
		t.Fatalf("MQTT 3.1.1 while locked out: CONNACK 0x%02x, want 0x03", code)
	}
	clock.advance(time.Second)
	if code := connackCode(t, addr, "a-1", "device-a", "guess"); code != 0x86 {
		t.Fatalf("fourth failure: CONNACK 0x%02x, want 0x86", code)
	}
	clock.advance(time.Second) // the lockout is now 2s
	if code := connackCode(t, addr, "a-1", "device-a", "secret-a"); code != 0x9F {
		t.Fatalf("1s into a 2s lockout: CONNACK 0x%02x, want 0x9F", code)
	}
	clock.advance(time.Second)
	if code := connackCode(t, addr, "a-1", "device-a", "guess"); code != 0x86 {
		t.Fatalf("fifth failure: CONNACK 0x%02x, want 0x86", code)
	}
	if got, want := clock.slept(), []time.Duration{0, 0, time.Second, 2 * time.Second, 2 * time.Second}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("refusals delayed %v, want %v (doubling, lockout capped at 3s, delay at 2s)", got, want)
	}
	clock.advance(3 * time.Second)
	mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)
	// The success cleared the failures: the next failure is free again
	// (not delayed, and the right password then connects).
	if code := connackCode(t, addr, "a-2", "device-a", "guess"); code != 0x86 {
		t.Fatalf("failure after a success: CONNACK 0x%02x", code)
	}
	if got := clock.slept(); got[len(got)-1] != 0 {
		t.Fatalf("the failure after a success was delayed %v", got[len(got)-1])
	}
	mustLogin(t, addr, "a-2", "device-a", "secret-a", nil)
	if st := b.Stats(); st.AuthFailures != 6 || st.AuthLocked != 3 {
		t.Fatalf("stats %+v, want 6 failures and 3 lockout refusals", st)
	}
}

// TestRateLimit: over its rate, an MQTT 5 QoS 1 publish gets PUBACK 0x96
// Message rate too high, a QoS 0 one is dropped, and both are counted; an
// MQTT 3.1.1 client is disconnected. The clock does not move, so no token
// comes back.
func TestRateLimit(t *testing.T) {
	clock := newFakeClock()
	b := secureBroker(t, func(o *Options) {
		o.RateLimit = RateLimit{MessagesPerSecond: 1, Burst: 2}
		o.now, o.sleep = clock.now, clock.sleep
	})
	c := mustLogin(t, b.Addrs()[0], "a-1", "device-a", "secret-a", nil)
	for i := range 2 {
		if resp, err := publish(c, "devices/device-a/x", 1, nil); err != nil || resp.ReasonCode >= 0x80 {
			t.Fatalf("publish %d within the burst: %+v, %v", i, resp, err)
		}
	}
	resp, err := publish(c, "devices/device-a/x", 1, nil)
	if resp == nil || resp.ReasonCode != 0x96 {
		t.Fatalf("publish over the rate: %+v, %v; want PUBACK 0x96", resp, err)
	}
	if _, err := publish(c, "devices/device-a/x", 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := mosqtest.Eventually(10*time.Second, 10*time.Millisecond, func() error {
		if st := b.Stats(); st.RateLimited != 2 || st.Stored != 2 {
			return fmt.Errorf("stats %+v, want 2 rate limited, 2 stored", st)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	clock.advance(time.Second)
	if resp, err := publish(c, "devices/device-a/x", 1, nil); err != nil || resp.ReasonCode >= 0x80 {
		t.Fatalf("publish a second later: %+v, %v", resp, err)
	}
	if resp, _ := publish(c, "devices/device-a/x", 1, nil); resp == nil || resp.ReasonCode != 0x96 {
		t.Fatalf("the next publish: %+v, want PUBACK 0x96", resp)
	}

	// MQTT 3.1.1 has no reason code in PUBACK: the client is disconnected.
	conn, err := net.DialTimeout("tcp", b.Addrs()[0], 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	writeV311 := func(pk packets.Packet, encode func(*packets.Packet, *bytes.Buffer) error) {
		t.Helper()
		var buf bytes.Buffer
		if err := encode(&pk, &buf); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	writeV311(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "v3",
			UsernameFlag: true, Username: []byte("device-a"), PasswordFlag: true, Password: []byte("secret-a")}},
		(*packets.Packet).ConnectEncode)
	for i := range 3 {
		writeV311(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
			TopicName: "devices/device-a/v3", PacketID: uint16(i + 1), Payload: []byte("x")}, (*packets.Packet).PublishEncode)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	all, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading until the broker closes: %v", err)
	}
	// CONNACK accepted, two PUBACKs, then the connection closes.
	want := []byte{0x20, 2, 0, 0, 0x40, 2, 0, 1, 0x40, 2, 0, 2}
	if !bytes.Equal(all, want) {
		t.Fatalf("MQTT 3.1.1 client read % x, want % x then EOF", all, want)
	}
}

// TestMaxClients: beyond max_clients a client gets CONNACK 0x89 Server
// busy.
func TestMaxClients(t *testing.T) {
	b := secureBroker(t, func(o *Options) { o.MaxClients = 1 })
	mustLogin(t, b.Addrs()[0], "a-1", "device-a", "secret-a", nil)
	if code := connackCode(t, b.Addrs()[0], "b-1", "device-b", "secret-b"); code != 0x89 {
		t.Fatalf("second client: CONNACK 0x%02x, want 0x89", code)
	}
	if err := mosqtest.Eventually(10*time.Second, 10*time.Millisecond, func() error {
		if st := b.Stats(); st.Busy != 1 {
			return fmt.Errorf("stats %+v, want 1 busy", st)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestTLSClientCertRequired: on a TLS listener that requires a client
// certificate, a client without one is refused by the handshake (and
// counted), one with a certificate from another CA too, and one with a
// certificate from the configured CA connects and logs in.
func TestTLSClientCertRequired(t *testing.T) {
	pki := testpki.New(t, "device-a")
	b := secureBroker(t, func(o *Options) {
		o.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: &TLS{CertFile: pki.ServerCert, KeyFile: pki.ServerKey,
			ClientCAFile: pki.CAFile, RequireClientCert: true}}}
	})
	addr := b.Addrs()[0]
	dial := func(certs []tls.Certificate) (*paho.Client, error) {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.Roots, Certificates: certs, ServerName: "127.0.0.1"})
		if err != nil {
			return nil, err
		}
		c, _, err := loginConn(conn, "a-1", "device-a", "secret-a", nil)
		return c, err
	}
	if c, err := dial(nil); err == nil {
		_ = c.Disconnect(&paho.Disconnect{})
		t.Fatal("a client without a certificate connected")
	}
	if c, err := dial([]tls.Certificate{pki.OtherClient}); err == nil {
		_ = c.Disconnect(&paho.Disconnect{})
		t.Fatal("a client with a certificate from another CA connected")
	}
	c, err := dial([]tls.Certificate{pki.Client})
	if err != nil {
		t.Fatalf("a client with a certificate: %v", err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	if resp, err := publish(c, "devices/device-a/x", 1, nil); err != nil || resp.ReasonCode >= 0x80 {
		t.Fatalf("publish over TLS: %+v, %v", resp, err)
	}
	// Plain TCP to the TLS listener is not MQTT.
	if _, _, err := login(addr, "plain", "device-a", "secret-a", nil); err == nil {
		t.Fatal("a plain TCP client connected to the TLS listener")
	}
	if err := mosqtest.Eventually(10*time.Second, 10*time.Millisecond, func() error {
		if st := b.Stats(); st.TLSFailures != 3 {
			return fmt.Errorf("stats %+v, want 3 TLS failures", st)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestNewRefusesBadUsers: New reports every bad user and ACL at once.
func TestNewRefusesBadUsers(t *testing.T) {
	_, err := New(Options{
		Listeners: []Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "r", true },
		Store:     func(*storage.Message, func(uint64, error)) error { return nil },
		Users: []User{
			{Username: "a/b", PasswordHash: testHash(t, "x")},
			{Username: "dup", PasswordHash: "plain"},
			{Username: "dup", PasswordHash: testHash(t, "x")},
			{Username: "c", PasswordHash: testHash(t, "x"), ACL: ACL{Publish: []string{"a/#/b"}, Subscribe: []string{"x/%d"}}},
		},
	})
	if err == nil {
		t.Fatal("New accepted bad users")
	}
	for _, want := range []string{`user "a/b"`, `user "dup": defined twice`, `user "dup": broker: password hash is neither`,
		`"a/#/b" is not a valid`, `"x/%d": % must be followed`} {
		if !bytes.Contains([]byte(err.Error()), []byte(want)) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// TestHashes: HashPassword and HashPasswordArgon2id make hashes that
// CheckHash accepts and that verify only the right password.
func TestHashes(t *testing.T) {
	bc, err := HashPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	ar, err := HashPasswordArgon2id([]byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{bc, ar} {
		if err := CheckHash(h); err != nil {
			t.Fatalf("CheckHash(%q): %v", h, err)
		}
		if !verifyPassword(h, []byte("pw")) || verifyPassword(h, []byte("pw2")) || verifyPassword(h, nil) {
			t.Fatalf("%q verifies the wrong passwords", h)
		}
	}
	for _, bad := range []string{"", "pw", "$2a$10$short", "$argon2id$v=19$m=1048576,t=3,p=2$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",
		"$argon2i$v=19$m=65536,t=3,p=2$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5"} {
		if CheckHash(bad) == nil {
			t.Errorf("CheckHash(%q) accepted it", bad)
		}
	}
	// A valid bcrypt hash with its cost raised: the cost is capped.
	for _, cost := range []string{"15", "31"} {
		h := strings.Replace(bc, fmt.Sprintf("$%02d$", bcrypt.MinCost), "$"+cost+"$", 1)
		err := CheckHash(h)
		if err == nil || !strings.Contains(err.Error(), "cost "+cost) || !strings.Contains(err.Error(), "maximum 14") {
			t.Errorf("CheckHash of a cost %s hash: %v, want an error naming the cost and the maximum 14", cost, err)
		}
	}
	if err := CheckHash(strings.Replace(bc, fmt.Sprintf("$%02d$", bcrypt.MinCost), "$14$", 1)); err != nil {
		t.Errorf("CheckHash of a cost 14 hash: %v", err)
	}
}

// execCommand runs a program and returns its combined output.
func execCommand(ctx context.Context, path string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	return string(out), err
}

// TestWillChecked: a will is published by the broker without the ACL
// check of a publish (mochi delivers and retains it directly), so a CONNECT
// whose will the client could not publish itself is refused: CONNACK 0x87
// Not authorized (MQTT 3.1.1: 0x05). A will on one of the agent's request
// topics or a '$' topic is refused even when the ACL allows it. An allowed
// will is delivered.
func TestWillChecked(t *testing.T) {
	b := secureBroker(t, nil)
	if err := b.HandleRequests("outpost/methods/+", 1, func(Request) { t.Error("a will was served as a request") }); err != nil {
		t.Fatal(err)
	}
	addr := b.Addrs()[0]
	tests := []struct{ name, id, user, pass, topic string }{
		{"another device's topic", "a-1", "device-a", "secret-a", "devices/device-b/cmd"},
		{"a request topic the user may publish to", "app-1", "app", "secret-app", "outpost/methods/reboot"},
		{"a request topic, anonymous", "anon", "", "", "outpost/methods/reboot"},
		{"a $ topic, anonymous", "anon", "", "", "$SYS/x"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cp := newConnect(tc.id, tc.user, tc.pass)
			cp.WillMessage = &paho.WillMessage{Topic: tc.topic, Payload: []byte("gone"), QoS: 1, Retain: true}
			c, ack, err := connect(addr, cp, nil)
			if err == nil {
				_ = c.Disconnect(&paho.Disconnect{})
				t.Fatalf("CONNECT with a will on %s accepted", tc.topic)
			}
			if ack == nil || ack.ReasonCode != notAuthorized {
				t.Fatalf("CONNECT with a will on %s: %+v, %v; want CONNACK 0x87", tc.topic, ack, err)
			}
			code := connackV311With(t, addr, packets.ConnectParams{ClientIdentifier: tc.id,
				UsernameFlag: tc.user != "", Username: []byte(tc.user), PasswordFlag: tc.user != "", Password: []byte(tc.pass),
				WillFlag: true, WillTopic: tc.topic, WillPayload: []byte("gone"), WillQos: 1, WillRetain: true})
			if code != 0x05 {
				t.Fatalf("MQTT 3.1.1 CONNECT with a will on %s: CONNACK 0x%02x, want 0x05", tc.topic, code)
			}
		})
	}

	// A will on the device's own topics is left and, when the connection
	// drops, delivered.
	onB, gotB := received()
	devB := mustLogin(t, addr, "b-1", "device-b", "secret-b", onB)
	if code := subscribe(t, devB, "devices/device-b/#"); code >= 0x80 {
		t.Fatalf("B subscribing: 0x%02x", code)
	}
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cp := newConnect("b-2", "device-b", "secret-b")
	cp.WillMessage = &paho.WillMessage{Topic: "devices/device-b/status", Payload: []byte("gone"), QoS: 1}
	if _, ack, err := connectConn(conn, cp, nil); err != nil {
		t.Fatalf("CONNECT with a will on its own topic: %+v, %v", ack, err)
	}
	conn.Close()
	if got := next(t, gotB); got != "devices/device-b/status" {
		t.Fatalf("B received %q, want its will", got)
	}
}

// TestParallelGuessesLockOut: wrong logins sent in parallel from one
// address cost no more password checks than sequential ones (the free
// failures, plus the checks already in progress when the lockout begins)
// and end in a lockout; a device at another address still logs in.
func TestParallelGuessesLockOut(t *testing.T) {
	clock := newFakeClock()
	// A slower hash than the other tests', so that without the limits the
	// parallel guesses would all be checked before the first one fails.
	slow, err := bcrypt.GenerateFromPassword([]byte("secret-a"), 8)
	if err != nil {
		t.Fatal(err)
	}
	b := secureBroker(t, func(o *Options) {
		o.Users[0].PasswordHash = string(slow)
		o.AuthBackoff = AuthBackoff{FreeFailures: 3, Max: 30 * time.Second}
		o.now, o.sleep = clock.now, clock.sleep
	})
	addr := b.Addrs()[0]
	const parallel = 30
	for wave := 0; !b.hook.guard.locked("127.0.0.1"); wave++ {
		if wave == 20 {
			t.Fatalf("not locked out after %d waves of %d parallel guesses; stats %+v", wave, parallel, b.Stats())
		}
		var wg sync.WaitGroup
		codes := make(chan byte, parallel)
		for i := range parallel {
			wg.Go(func() {
				c, ack, err := login(addr, fmt.Sprintf("g-%d", i), "device-a", "guess", nil)
				switch {
				case err == nil:
					_ = c.Disconnect(&paho.Disconnect{})
					codes <- 0
				case ack != nil:
					codes <- ack.ReasonCode
				}
			})
		}
		wg.Wait()
		close(codes)
		for code := range codes {
			if code != 0x86 && code != 0x9F {
				t.Fatalf("parallel guess: CONNACK 0x%02x, want 0x86 or 0x9F", code)
			}
		}
	}
	if n, most := b.hook.checks.Load(), int64(3+maxAttemptsPerRemote); n > most {
		t.Fatalf("%d password checks, want at most %d (free failures + attempts in progress)", n, most)
	}
	if code := connackCode(t, addr, "a-1", "device-a", "secret-a"); code != 0x9F {
		t.Fatalf("right password after the guesses: CONNACK 0x%02x, want 0x9F (locked out)", code)
	}
	// 127.0.0.2 is another address on the loopback interface.
	conn, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}).Dial("tcp", addr)
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	c, ack, err := loginConn(conn, "a-2", "device-a", "secret-a", nil)
	if err != nil {
		t.Fatalf("login from another address: %+v, %v", ack, err)
	}
	_ = c.Disconnect(&paho.Disconnect{})
}

// TestLoginBusy: when every password check slot stays taken, a login is
// refused after a bounded wait (CONNACK 0x89 Server busy, MQTT 3.1.1 0x03)
// instead of waiting for as long as the others take.
func TestLoginBusy(t *testing.T) {
	b := secureBroker(t, func(o *Options) { o.verifyWait = time.Millisecond })
	for range cap(b.hook.verifying) {
		b.hook.verifying <- struct{}{}
	}
	addr := b.Addrs()[0]
	if code := connackCode(t, addr, "a-1", "device-a", "secret-a"); code != 0x89 {
		t.Fatalf("login with every check slot taken: CONNACK 0x%02x, want 0x89", code)
	}
	if code := connackV311(t, addr, "a-1", "device-a", "secret-a"); code != 0x03 {
		t.Fatalf("MQTT 3.1.1 login with every check slot taken: CONNACK 0x%02x, want 0x03", code)
	}
	<-b.hook.verifying
	mustLogin(t, addr, "a-1", "device-a", "secret-a", nil)
	if st := b.Stats(); st.Busy != 2 || st.AuthFailures != 0 {
		t.Fatalf("stats %+v, want 2 busy, no auth failure", st)
	}
}

// TestRefusalWithoutV3Code: a CONNACK refusal whose reason has no MQTT
// 3.1.1 equivalent in v3Refusal is sent as 0x05 Not authorized, never as
// 0x00 (accepted).
func TestRefusalWithoutV3Code(t *testing.T) {
	h := &ingestHook{}
	cl := &mqtt.Client{}
	cl.Properties.ProtocolVersion = 4
	h.refuseConnect(cl, packets.ErrUnspecifiedError)
	pk := h.OnPacketEncode(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}})
	if pk.ReasonCode != 0x05 {
		t.Fatalf("MQTT 3.1.1 CONNACK for an unmapped refusal: 0x%02x, want 0x05", pk.ReasonCode)
	}
}

// TestUnknownUserVerified: a login as an unknown user costs a password
// check like a known user's, against one of the configured users' own
// hashes (so with their algorithms and costs), the same one for the same
// name, and is refused even with that user's password.
func TestUnknownUserVerified(t *testing.T) {
	b := secureBroker(t, func(o *Options) { o.AuthBackoff = AuthBackoff{} })
	h := b.hook
	configured := map[string]string{}
	for _, u := range h.creds.Load().users {
		configured[u.hash] = u.name
	}
	for _, name := range []string{"device-z", "x", "Device-A", ""} {
		d := h.decoyHash(name)
		if _, ok := configured[d]; !ok {
			t.Fatalf("decoy hash for %q is not a configured user's: %q", name, d)
		}
		if h.decoyHash(name) != d {
			t.Fatalf("decoy hash for %q changes", name)
		}
	}
	owner := configured[h.decoyHash("device-z")]
	password := map[string]string{"device-a": "secret-a", "device-b": "secret-b", "app": "secret-app"}[owner]
	if code := connackCode(t, b.Addrs()[0], "z-1", "device-z", password); code != 0x86 {
		t.Fatalf("unknown user with its decoy's password: CONNACK 0x%02x, want 0x86", code)
	}
	if n := h.checks.Load(); n != 1 {
		t.Fatalf("%d password checks for an unknown user, want 1", n)
	}
}

// TestClientIDSquatting: a session that another user left under a client
// id does not keep the id's own device out: once that client has
// disconnected, a client of another identity logging in with the id is
// admitted with a clean session (none of the other's subscriptions), while
// a connected client's id stays refused (0x85). The session expiry a
// client may ask for is capped at 7 days.
func TestClientIDSquatting(t *testing.T) {
	b := secureBroker(t, nil)
	addr := b.Addrs()[0]
	forever := uint32(0xFFFFFFFF)
	cp := newConnect("a-1", "device-b", "secret-b")
	cp.CleanStart = false
	cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: &forever}
	squatter, ack, err := connect(addr, cp, nil)
	if err != nil {
		t.Fatalf("B connecting as a-1: %+v, %v", ack, err)
	}
	if got := ack.Properties.SessionExpiryInterval; got == nil || *got != 7*24*3600 {
		t.Fatalf("session expiry granted: %v, want 604800 (7 days)", got)
	}
	if code := subscribe(t, squatter, "devices/device-b/#"); code >= 0x80 {
		t.Fatalf("B subscribing: 0x%02x", code)
	}
	if code := connackCode(t, addr, "a-1", "device-a", "secret-a"); code != 0x85 {
		t.Fatalf("A on its id while B is connected with it: CONNACK 0x%02x, want 0x85", code)
	}
	if err := squatter.Disconnect(&paho.Disconnect{}); err != nil {
		t.Fatal(err)
	}
	if err := mosqtest.Eventually(10*time.Second, 10*time.Millisecond, func() error {
		if cl, ok := b.srv.Clients.Get("a-1"); !ok || !cl.Closed() {
			return fmt.Errorf("B's session under a-1: present %v, want present and disconnected", ok)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	cp = newConnect("a-1", "device-a", "secret-a")
	cp.CleanStart = false
	c, ack, err := connect(addr, cp, nil)
	if err != nil {
		t.Fatalf("A on its own id after B left: %+v, %v; want admitted", ack, err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	if ack.SessionPresent {
		t.Fatal("A inherited B's session")
	}
	cl, ok := b.srv.Clients.Get("a-1")
	if !ok || cl.Properties.Username == nil || string(cl.Properties.Username) != "device-a" {
		t.Fatalf("client a-1 is not A's")
	}
	if n := cl.State.Subscriptions.Len(); n != 0 {
		t.Fatalf("A's session has %d subscriptions, want none of B's", n)
	}
	if subs := b.srv.Topics.Subscribers("devices/device-b/x"); len(subs.Subscriptions) != 0 {
		t.Fatalf("B's old subscription is still in the topic tree: %v", subs.Subscriptions)
	}
}

// rawV5 is an MQTT 5 connection that sends and reads mochi's packets, for
// what paho does not send (a publish that reuses a topic alias).
type rawV5 struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialRawV5(t *testing.T, addr string, connect packets.ConnectParams) (*rawV5, packets.Packet) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r := &rawV5{t: t, conn: conn, r: bufio.NewReader(conn)}
	connect.ProtocolName, connect.Keepalive = []byte("MQTT"), 30
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: connect}, (*packets.Packet).ConnectEncode)
	return r, r.read()
}

func (r *rawV5) send(pk packets.Packet, encode func(*packets.Packet, *bytes.Buffer) error) {
	r.t.Helper()
	pk.ProtocolVersion = 5
	var buf bytes.Buffer
	if err := encode(&pk, &buf); err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.conn.Write(buf.Bytes()); err != nil {
		r.t.Fatal(err)
	}
}

// read reads one CONNACK, PUBACK or PUBLISH.
func (r *rawV5) read() packets.Packet {
	r.t.Helper()
	_ = r.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var pk packets.Packet
	pk.ProtocolVersion = 5
	b, err := r.r.ReadByte()
	if err != nil {
		r.t.Fatalf("read: %v", err)
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		r.t.Fatal(err)
	}
	n, _, err := packets.DecodeLength(r.r)
	if err != nil {
		r.t.Fatal(err)
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r.r, body); err != nil {
		r.t.Fatal(err)
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	default:
		r.t.Fatalf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	if err != nil {
		r.t.Fatal(err)
	}
	return pk
}

// TestTopicAliases: an MQTT 5 publish that reuses a topic alias (an empty
// topic) is checked by the topic the alias stands for: allowed when the
// client may publish there; an alias cannot be set to a topic the client
// may not publish to.
func TestTopicAliases(t *testing.T) {
	b := secureBroker(t, nil)
	onA, gotA := received()
	devA := mustLogin(t, b.Addrs()[0], "a-2", "device-a", "secret-a", onA)
	if code := subscribe(t, devA, "devices/device-a/#"); code >= 0x80 {
		t.Fatalf("A subscribing: 0x%02x", code)
	}
	r, ack := dialRawV5(t, b.Addrs()[0], packets.ConnectParams{ClientIdentifier: "a-1", Clean: true,
		UsernameFlag: true, Username: []byte("device-a"), PasswordFlag: true, Password: []byte("secret-a")})
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %+v", ack)
	}
	pub := func(id uint16, topic string, alias uint16) byte {
		t.Helper()
		r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id, TopicName: topic,
			Payload: []byte("x"), Properties: packets.Properties{TopicAlias: alias, TopicAliasFlag: true}}, (*packets.Packet).PublishEncode)
		pk := r.read()
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != id {
			t.Fatalf("publish %d: got %+v, want its PUBACK", id, pk)
		}
		return pk.ReasonCode
	}
	if code := pub(1, "devices/device-a/x", 1); code != 0 {
		t.Fatalf("setting alias 1 to an allowed topic: PUBACK 0x%02x", code)
	}
	if code := pub(2, "", 1); code != 0 {
		t.Fatalf("reusing alias 1 (an allowed topic): PUBACK 0x%02x, want 0x00", code)
	}
	if code := pub(3, "devices/device-b/x", 1); code != notAuthorized {
		t.Fatalf("setting alias 1 to another device's topic: PUBACK 0x%02x, want 0x87", code)
	}
	if code := pub(4, "", 1); code != 0 {
		t.Fatalf("reusing alias 1 after the refused change: PUBACK 0x%02x, want 0x00", code)
	}
	for range 3 {
		if got := next(t, gotA); got != "devices/device-a/x" {
			t.Fatalf("A received %q, want devices/device-a/x (alias 1 unchanged)", got)
		}
	}
	// Were an alias ever to resolve to a topic the client may not
	// publish to, OnPublish, which sees the resolved topic, refuses it.
	cl, ok := b.srv.Clients.Get("a-1")
	if !ok {
		t.Fatal("client a-1 not found")
	}
	_, err := b.hook.OnPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 9,
		TopicName: "devices/device-b/x", Payload: []byte("x")})
	if !errors.Is(err, packets.ErrNotAuthorized) {
		t.Fatalf("OnPublish of a resolved topic the client may not publish to: %v, want 0x87", err)
	}
}

// TestDeliveryChecked: a message is checked again when it is delivered, so
// a subscription wider than the subscriber's ACL (as a session restored
// from storage or made under an older ACL would carry; here put in the
// topic tree directly) receives nothing outside it, retained or not.
func TestDeliveryChecked(t *testing.T) {
	b := secureBroker(t, nil)
	addr := b.Addrs()[0]
	onA, gotA := received()
	devA := mustLogin(t, addr, "a-1", "device-a", "secret-a", onA)
	cl, ok := b.srv.Clients.Get("a-1")
	if !ok {
		t.Fatal("client a-1 not found")
	}
	sub := packets.Subscription{Filter: "devices/#", Qos: 1}
	b.srv.Topics.Subscribe(cl.ID, sub)
	cl.State.Subscriptions.Add(sub.Filter, sub)

	devB := mustLogin(t, addr, "b-1", "device-b", "secret-b", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, retain := range []bool{true, false} {
		if _, err := devB.Publish(ctx, &paho.Publish{Topic: "devices/device-b/x", QoS: 1, Retain: retain, Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := devA.Publish(ctx, &paho.Publish{Topic: "devices/device-a/marker", QoS: 1, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if got := next(t, gotA); got != "devices/device-a/marker" {
		t.Fatalf("A received %q first, want only the marker on its own topic", got)
	}
}

// TestSetUsers: users and ACLs change while the broker runs. A client of a
// removed user or a changed password is disconnected, a client of an
// unchanged user keeps its connection, the new password logs in and the
// old one no longer does, and a changed ACL applies to the next publish.
func TestSetUsers(t *testing.T) {
	b := secureBroker(t, func(o *Options) { o.AuthBackoff = AuthBackoff{} })
	addr := b.Addrs()[0]
	dropped := func(id, user, pw string) (*paho.Client, chan struct{}) {
		t.Helper()
		gone := make(chan struct{})
		var once sync.Once
		c, ack, err := login(addr, id, user, pw, func(cfg *paho.ClientConfig) {
			cfg.OnServerDisconnect = func(*paho.Disconnect) { once.Do(func() { close(gone) }) }
			cfg.OnClientError = func(error) { once.Do(func() { close(gone) }) }
		})
		if err != nil || ack.ReasonCode != 0 {
			t.Fatalf("login %s: %v %+v", user, err, ack)
		}
		t.Cleanup(func() { _ = c.Disconnect(&paho.Disconnect{}) })
		return c, gone
	}
	a, aGone := dropped("a-1", "device-a", "secret-a")
	_, bGone := dropped("b-1", "device-b", "secret-b")
	pub := func(c *paho.Client, topic string) byte {
		t.Helper()
		r, err := c.Publish(context.Background(), &paho.Publish{Topic: topic, QoS: 1, Payload: []byte("x")})
		if r == nil {
			t.Fatalf("publish %s: %v", topic, err)
		}
		return r.ReasonCode
	}
	if rc := pub(a, "devices/device-a/t"); rc != 0 {
		t.Fatalf("before: 0x%02x", rc)
	}

	// device-a keeps its password; device-b's changes; the ACL narrows to
	// telemetry only.
	cut, err := b.SetUsers([]User{
		{Username: "device-a", PasswordHash: b.hook.creds.Load().users["device-a"].hash},
		{Username: "device-b", PasswordHash: testHash(t, "new-secret-b")},
	}, ACL{Publish: []string{"devices/%u/telemetry"}, Subscribe: []string{"devices/%u/#"}}, nil)
	if err != nil || cut != 1 {
		t.Fatalf("SetUsers: %d disconnected, %v; want 1", cut, err)
	}
	select {
	case <-bGone:
	case <-time.After(10 * time.Second):
		t.Fatal("device-b's client, whose password changed, is still connected")
	}
	select {
	case <-aGone:
		t.Fatal("device-a's client was disconnected although its user did not change")
	default:
	}
	if rc := pub(a, "devices/device-a/t"); rc != 0x87 {
		t.Errorf("a publish the new ACL forbids: 0x%02x, want 0x87", rc)
	}
	if rc := pub(a, "devices/device-a/telemetry"); rc != 0 {
		t.Errorf("a publish the new ACL allows: 0x%02x", rc)
	}
	if _, ack, err := login(addr, "b-2", "device-b", "secret-b", nil); err == nil || ack == nil || ack.ReasonCode != 0x86 {
		t.Errorf("device-b's old password: %v %+v, want 0x86", err, ack)
	}
	if c, ack, err := login(addr, "b-3", "device-b", "new-secret-b", nil); err != nil || ack.ReasonCode != 0 {
		t.Errorf("device-b's new password: %v %+v", err, ack)
	} else {
		_ = c.Disconnect(&paho.Disconnect{})
	}
	if _, err := b.SetUsers([]User{{Username: "x/y", PasswordHash: "nope"}}, ACL{}, nil); err == nil {
		t.Error("SetUsers accepted a bad user")
	}
	if _, ok := b.hook.creds.Load().users["device-a"]; !ok {
		t.Error("a refused SetUsers changed the users")
	}
}
