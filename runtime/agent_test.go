package runtime

// Integration tests: the real agent in-process, a real Mosquitto upstream
// (internal/mosqtest), real clients (Mosquitto's own, and paho for what they
// cannot observe, such as a PUBACK reason code).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/storage"
)

const deviceID = "test-gw"

// testAgent starts an agent on a free loopback port with fast reconnects.
func testAgent(t *testing.T, upstream string, mutate func(*Config)) *Agent {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DeviceID = deviceID
	cfg.DataDir = t.TempDir()
	cfg.Broker.Listeners = []ListenerConfig{{Address: "127.0.0.1:0"}}
	cfg.Uplink.URL = upstream
	cfg.Uplink.BackoffMin = Duration(50 * time.Millisecond)
	cfg.Uplink.BackoffMax = Duration(500 * time.Millisecond)
	if mutate != nil {
		mutate(&cfg)
	}
	a, err := New(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := a.Close(ctx); err != nil {
			t.Errorf("close agent: %v", err)
		}
	})
	return a
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// testLogger logs warnings and errors into the test log; OUTPOST_TEST_DEBUG=1
// logs everything.
func testLogger(t *testing.T) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("OUTPOST_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
}

func hostPort(t *testing.T, addr string) (string, string) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return h, p
}

// run runs a Mosquitto client and returns its stdout.
func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

// upstreamSub is a persistent subscription on the upstream broker, made
// with mosquitto_sub: registered first (-E), then collected (-C) with the
// same client id, so nothing forwarded in between is missed.
type upstreamSub struct {
	t      *testing.T
	up     *mosqtest.Broker
	id     string
	filter string
}

func subscribeUpstream(t *testing.T, up *mosqtest.Broker, filter string) *upstreamSub {
	t.Helper()
	s := &upstreamSub{t: t, up: up, id: fmt.Sprintf("sub-%d", time.Now().UnixNano()), filter: filter}
	if _, err := run(t, 10*time.Second, "mosquitto_sub", s.args("-E")...); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *upstreamSub) args(extra ...string) []string {
	a := []string{"-h", "127.0.0.1", "-p", strconv.Itoa(s.up.Port()), "-V", "mqttv5", "-q", "1",
		"-c", "-i", s.id, "-t", s.filter}
	return append(a, extra...)
}

// collect waits for n messages and returns them printed with format.
func (s *upstreamSub) collect(n int, format string) []string {
	s.t.Helper()
	out, err := run(s.t, 60*time.Second, "mosquitto_sub", s.args("-C", strconv.Itoa(n), "-W", "50", "-F", format)...)
	if err != nil {
		s.t.Fatalf("collecting %d messages: %v (got %d lines)", n, err, strings.Count(out, "\n"))
	}
	return strings.Split(strings.TrimSuffix(out, "\n"), "\n")
}

func requireClients(t *testing.T) {
	mosqtest.Require(t, "mosquitto", "mosquitto_pub", "mosquitto_sub")
}

func TestRoundTrip(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{})
	a := testAgent(t, up.URL(), nil)
	host, port := hostPort(t, a.BrokerAddrs()[0])

	payload := make([]byte, 256)
	for i := range payload {
		payload[i] = byte(i)
	}
	payloadFile := filepath.Join(t.TempDir(), "payload.bin")
	if err := os.WriteFile(payloadFile, payload, 0o600); err != nil {
		t.Fatal(err)
	}
	hexPayload := fmt.Sprintf("%x", payload)

	tests := []struct {
		name    string
		version string
		qos     string
		props   []string // mosquitto_pub -D arguments
		want    string   // upstream line (format below), before the message-id
	}{
		{"v311 qos0", "mqttv311", "0", nil, "0|||"},
		{"v311 qos1", "mqttv311", "1", nil, "1|||"},
		{"v5 qos0", "mqttv5", "0", nil, "0|||"},
		{"v5 qos1 properties", "mqttv5", "1", []string{
			"-D", "publish", "content-type", "application/octet-stream",
			"-D", "publish", "response-topic", "plant/replies",
			"-D", "publish", "correlation-data", "corr-42",
			"-D", "publish", "user-property", "unit", "celsius",
		}, "1|application/octet-stream|plant/replies|corr-42"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			topic := fmt.Sprintf("plant/line%d/raw", i)
			sub := subscribeUpstream(t, up, "outpost/"+deviceID+"/"+topic)
			args := []string{"-h", host, "-p", port, "-V", tc.version, "-q", tc.qos, "-t", topic, "-f", payloadFile}
			if _, err := run(t, 10*time.Second, "mosquitto_pub", append(args, tc.props...)...); err != nil {
				t.Fatal(err)
			}
			// %q is the upstream QoS (the agent forwards QoS 0 as QoS 0).
			got := sub.collect(1, "%t|%q|%C|%R|%D|%P|%x")[0]
			fields := strings.SplitN(got, "|", 7)
			if len(fields) != 7 {
				t.Fatalf("unexpected line %q", got)
			}
			if fields[0] != "outpost/"+deviceID+"/"+topic {
				t.Errorf("topic %q", fields[0])
			}
			if head := strings.Join(fields[1:5], "|"); head != tc.want {
				t.Errorf("qos|content-type|response-topic|correlation = %q, want %q", head, tc.want)
			}
			if fields[6] != hexPayload {
				t.Errorf("payload bytes changed: %s", fields[6])
			}
			if !strings.Contains(fields[5], "message-id:") {
				t.Errorf("no message-id user property in %q", fields[5])
			}
			if tc.props != nil && !strings.Contains(fields[5], "unit:celsius") {
				t.Errorf("user property lost: %q", fields[5])
			}
		})
	}
}

// publishLines publishes n numbered QoS 1 messages with mosquitto_pub -l and
// returns once all are acknowledged.
func publishLines(t *testing.T, addr, topic string, from, n int) {
	t.Helper()
	host, port := hostPort(t, addr)
	var in bytes.Buffer
	for i := from; i < from+n; i++ {
		fmt.Fprintf(&in, "%08d\n", i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-t", topic, "-l")
	cmd.Stdin = &in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub -l: %v: %s", err, out)
	}
}

func TestOfflineThenOnline(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{Persistence: true})
	sub := subscribeUpstream(t, up, "outpost/"+deviceID+"/meter/#")
	if err := up.Stop(); err != nil {
		t.Fatal(err)
	}
	a := testAgent(t, up.URL(), nil)

	const n = 3000
	publishLines(t, a.BrokerAddrs()[0], "meter/1", 0, n)
	if got := a.Status().Outbox.Messages; got != n {
		t.Fatalf("backlog %d, want %d", got, n)
	}
	if err := up.Restart(); err != nil {
		t.Fatal(err)
	}
	lines := sub.collect(n, "%p")
	for i, l := range lines {
		if want := fmt.Sprintf("%08d", i); l != want {
			t.Fatalf("message %d is %q, want %q: order or content lost", i, l, want)
		}
	}
	waitFor(t, 10*time.Second, func() error {
		if m := a.Status().Outbox.Messages; m != 0 {
			return fmt.Errorf("backlog still %d after delivery", m)
		}
		return nil
	})
}

func waitFor(t *testing.T, timeout time.Duration, fn func() error) {
	t.Helper()
	if err := mosqtest.Eventually(timeout, 20*time.Millisecond, fn); err != nil {
		t.Fatal(err)
	}
}

// missing returns up to max of the payloads "0".."n-1" that col has not seen.
func missing(col *mqtttest.Collector, n, max int) []string {
	var m []string
	for i := 0; i < n && len(m) < max; i++ {
		if p := strconv.Itoa(i); !col.Has(p) {
			m = append(m, p)
		}
	}
	return m
}

func TestUpstreamRestartsDuringStream(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{Persistence: true})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/stream/#")
	a := testAgent(t, up.URL(), nil)
	pub := mqtttest.Client(t, a.BrokerAddrs()[0], "streamer")

	const n = 20000
	done := make(chan error, 1)
	var published atomic.Int64
	go func() {
		for i := range n {
			_, err := pub.Publish(context.Background(), &paho.Publish{Topic: "stream/x", QoS: 1, Payload: []byte(strconv.Itoa(i))})
			if err != nil {
				done <- err
				return
			}
			published.Add(1)
		}
		done <- nil
	}()
	// Restart the upstream three times while the stream runs.
	for r := range 3 {
		waitFor(t, 30*time.Second, func() error {
			if published.Load() < int64((r+1)*n/5) {
				return errors.New("publisher not far enough")
			}
			return nil
		})
		if err := up.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := up.Restart(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, func() error {
			if st := a.Status().Uplink; st.Reconnects < int64(r+1) || !st.Connected {
				return fmt.Errorf("uplink not back after restart %d: %+v", r+1, st)
			}
			return nil
		})
	}
	if published.Load() == n {
		t.Log("warning: the stream ended before the last restart")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, func() error {
		if d, _ := col.Counts(); d < n {
			st := a.Status()
			return fmt.Errorf("%d of %d arrived; missing %v; outbox %+v; uplink %+v", d, n, missing(col, n, 10), st.Outbox, *st.Uplink)
		}
		return nil
	})
	if m := missing(col, n, 10); len(m) > 0 {
		t.Fatalf("messages lost: %v", m)
	}
	d, dups := col.Counts()
	st := a.Status().Uplink
	t.Logf("%d distinct, %d duplicates, %d reconnects, %d resent", d, dups, st.Reconnects, st.Resent)
	if st.Reconnects < 3 {
		t.Errorf("uplink reconnected %d times, want at least 3", st.Reconnects)
	}
}

func TestRejectNewWhenFull(t *testing.T) {
	a := testAgent(t, "", func(c *Config) {
		c.Storage.MaxBytes = 1 << 20
		c.Storage.WhenFull = "reject_new"
	})
	pub := mqtttest.Client(t, a.BrokerAddrs()[0], "filler")
	payload := bytes.Repeat([]byte("x"), 10_000)
	var refused *paho.PublishResponse
	for i := 0; i < 200 && refused == nil; i++ {
		resp, err := pub.Publish(context.Background(), &paho.Publish{Topic: "fill/a", QoS: 1, Payload: payload})
		if err != nil && resp != nil && resp.ReasonCode >= 0x80 {
			refused = resp
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if refused == nil {
		t.Fatal("a full store never refused a publish")
	}
	if refused.ReasonCode != 0x97 {
		t.Fatalf("reason code 0x%02x, want 0x97 (quota exceeded)", refused.ReasonCode)
	}
	before := a.Status()
	// Refused again, and nothing is stored half.
	resp, err := pub.Publish(context.Background(), &paho.Publish{Topic: "fill/a", QoS: 1, Payload: payload})
	if err == nil || resp.ReasonCode != 0x97 {
		t.Fatalf("second publish: %v, %+v", err, resp)
	}
	after := a.Status()
	if after.Outbox.Messages != before.Outbox.Messages || after.Outbox.Bytes != before.Outbox.Bytes {
		t.Fatalf("a refused publish changed the store: %+v -> %+v", before.Outbox, after.Outbox)
	}
	if after.Outbox.Dropped[storage.ReasonRejected] < 2 || after.Broker.Refused < 2 {
		t.Fatalf("refusals not counted: %+v %+v", after.Outbox.Dropped, after.Broker)
	}
	// The connection stays usable: a topic that matches no route is local only.
	if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "fill/a", QoS: 0, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
}

func TestRejectNewMQTT311Disconnects(t *testing.T) {
	requireClients(t)
	a := testAgent(t, "", func(c *Config) {
		c.Storage.MaxBytes = 1 << 20
		c.Storage.WhenFull = "reject_new"
	})
	host, port := hostPort(t, a.BrokerAddrs()[0])
	big := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(big, bytes.Repeat([]byte("y"), 300_000), 0o600); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		_, _ = run(t, 10*time.Second, "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv311", "-q", "1", "-t", "fill/b", "-f", big)
	}
	before := a.Status().Outbox
	// MQTT 3.1.1 has no negative PUBACK: the client is disconnected
	// without an acknowledgement, so mosquitto_pub fails.
	_, err := run(t, 10*time.Second, "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv311", "-q", "1", "-t", "fill/b", "-f", big)
	if err == nil {
		t.Fatal("mosquitto_pub succeeded on a full store")
	}
	if after := a.Status().Outbox; after.Messages != before.Messages {
		t.Fatalf("refused message stored: %d -> %d", before.Messages, after.Messages)
	}
}

func TestDropOldestWhenFull(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{Persistence: true})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/fill/#")
	if err := up.Stop(); err != nil {
		t.Fatal(err)
	}
	a := testAgent(t, up.URL(), func(c *Config) {
		c.Storage.MaxBytes = 1 << 20
	})
	pub := mqtttest.Client(t, a.BrokerAddrs()[0], "filler")
	const n = 300 // 300 x 10 kB = 3 MB into a 1 MiB store
	for i := range n {
		payload := fmt.Appendf(nil, "%04d%s", i, bytes.Repeat([]byte("z"), 10_000))
		if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "fill/c", QoS: 1, Payload: payload}); err != nil {
			t.Fatalf("publish %d: %v (drop_oldest must accept)", i, err)
		}
	}
	st := a.Status().Outbox
	evicted := st.Dropped[storage.ReasonEvicted]
	if evicted == 0 || st.Bytes > 1<<20+20_000 {
		t.Fatalf("evicted %d, %d bytes stored (cap 1 MiB)", evicted, st.Bytes)
	}
	if st.Messages+evicted != n {
		t.Fatalf("stored %d + evicted %d != published %d", st.Messages, evicted, n)
	}
	if err := up.Restart(); err != nil {
		t.Fatal(err)
	}
	last := fmt.Sprintf("%04d%s", n-1, strings.Repeat("z", 10_000))
	waitFor(t, 30*time.Second, func() error {
		if !col.Has(last) {
			d, _ := col.Counts()
			return fmt.Errorf("newest message not delivered yet (%d arrived); outbox %+v; uplink %+v", d, a.Status().Outbox, *a.Status().Uplink)
		}
		return nil
	})
	if first := fmt.Sprintf("%04d%s", 0, strings.Repeat("z", 10_000)); col.Has(first) {
		t.Fatal("the oldest message was delivered, yet it should have been evicted")
	}
	waitFor(t, 30*time.Second, func() error {
		if d, _ := col.Counts(); int64(d) != st.Messages {
			return fmt.Errorf("%d delivered, %d were stored; outbox %+v; uplink %+v", d, st.Messages, a.Status().Outbox, *a.Status().Uplink)
		}
		return nil
	})
}

func TestTTLExpiry(t *testing.T) {
	requireClients(t)
	// The link is down (the proxy refuses connections) while the messages
	// expire; the upstream and its subscriber stay up throughout.
	up := mosqtest.StartT(t, mosqtest.Options{})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/#")
	link := newFreezeProxy(t, up.Addr())
	link.refusing.Store(true)
	a := testAgent(t, "mqtt://"+link.l.Addr().String(), func(c *Config) {
		c.Routes = []RouteConfig{
			{Name: "short", Match: []string{"short/#"}, TTL: Duration(300 * time.Millisecond)},
			{Name: "telemetry", Match: []string{"#"}},
		}
	})
	pub := mqtttest.Client(t, a.BrokerAddrs()[0], "ttl")
	expiry := uint32(1)
	for i := range 5 {
		// MQTT 5 Message Expiry on the message itself.
		if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "msg/exp", QoS: 1, Payload: fmt.Appendf(nil, "exp%d", i),
			Properties: &paho.PublishProperties{MessageExpiry: &expiry}}); err != nil {
			t.Fatal(err)
		}
		// The route's TTL.
		if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "short/x", QoS: 1, Payload: fmt.Appendf(nil, "short%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pub.Publish(context.Background(), &paho.Publish{Topic: "keep/x", QoS: 1, Payload: []byte("keep")}); err != nil {
		t.Fatal(err)
	}
	// Let both TTLs pass, then bring the link back.
	time.Sleep(1200 * time.Millisecond)
	if a.Status().Uplink.Connected {
		t.Fatal("the uplink connected through a refusing link")
	}
	link.refusing.Store(false)
	waitFor(t, 30*time.Second, func() error {
		if !col.Has("keep") {
			st := a.Status()
			return fmt.Errorf("the message without expiry has not arrived; outbox %+v; uplink %+v; mosquitto log:\n%s", st.Outbox, *st.Uplink, up.LogTail(30))
		}
		return nil
	})
	st := a.Status().Outbox
	if got := st.Dropped[storage.ReasonTTL]; got != 10 {
		t.Fatalf("dropped for ttl: %d, want 10", got)
	}
	if d, _ := col.Counts(); d != 1 {
		t.Fatalf("%d messages arrived, want only the one without expiry", d)
	}
}

func TestBadInput(t *testing.T) {
	requireClients(t)
	a := testAgent(t, "", func(c *Config) { c.Broker.MaxPacketSize = 64 << 10 })
	host, port := hostPort(t, a.BrokerAddrs()[0])

	t.Run("payload over the maximum packet size", func(t *testing.T) {
		big := filepath.Join(t.TempDir(), "big")
		if err := os.WriteFile(big, bytes.Repeat([]byte("b"), 100<<10), 0o600); err != nil {
			t.Fatal(err)
		}
		before := a.Status().Outbox.Messages
		// mosquitto_pub honours the announced limit and sends nothing.
		if _, err := run(t, 10*time.Second, "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-t", "big/x", "-f", big); err != nil {
			t.Logf("mosquitto_pub: %v", err)
		}
		// CONNACK announces the limit to MQTT 5 clients.
		conn, err := net.Dial("tcp", a.BrokerAddrs()[0])
		if err != nil {
			t.Fatal(err)
		}
		c := paho.NewClient(paho.ClientConfig{ClientID: "big", Conn: conn})
		ca, err := c.Connect(context.Background(), &paho.Connect{ClientID: "big", CleanStart: true})
		if err != nil {
			t.Fatal(err)
		}
		if ca.Properties == nil || ca.Properties.MaximumPacketSize == nil || *ca.Properties.MaximumPacketSize != 64<<10 {
			t.Errorf("CONNACK does not announce the maximum packet size: %+v", ca.Properties)
		}
		// paho does not check it: the oversized packet closes the connection.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := c.Publish(ctx, &paho.Publish{Topic: "big/x", QoS: 1, Payload: bytes.Repeat([]byte("b"), 100<<10)}); err == nil {
			t.Fatal("an oversized publish was acknowledged")
		}
		if a.Status().Outbox.Messages != before {
			t.Fatal("oversized message stored")
		}
	})

	t.Run("wildcard in a publish topic", func(t *testing.T) {
		// Mosquitto's clients refuse this locally, so send it raw.
		c := mqtttest.Client(t, a.BrokerAddrs()[0], "wild")
		_, err := c.Publish(context.Background(), &paho.Publish{Topic: "plant/+/temp", QoS: 1, Payload: []byte("1")})
		if err == nil {
			t.Fatal("a publish to a wildcard topic was acknowledged")
		}
		if m := a.Status().Outbox.Messages; m != 0 {
			t.Fatalf("%d messages stored from a wildcard topic", m)
		}
	})

	t.Run("agent keeps serving", func(t *testing.T) {
		if _, err := run(t, 10*time.Second, "mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", "ok/x", "-m", "fine"); err != nil {
			t.Fatal(err)
		}
		if m := a.Status().Outbox.Messages; m != 1 {
			t.Fatalf("stored %d, want 1", m)
		}
	})
}

func TestUnreachableUpstream(t *testing.T) {
	requireClients(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close() // nothing listens there now
	// A password in the URL, which paho's errors quote.
	a := testAgent(t, "mqtt://gw:url-pass-1234@"+dead, nil)
	waitFor(t, 10*time.Second, func() error {
		if e := a.Status().Uplink.LastError; !strings.Contains(e, "connection refused") {
			return fmt.Errorf("last error %q does not say connection refused", e)
		}
		return nil
	})
	if e := a.Snapshot().Uplink.LastError; strings.Contains(e, "url-pass-1234") || !strings.Contains(e, "xxxxx") {
		t.Errorf("the status shows the URL's password: %q", e)
	}
	publishLines(t, a.BrokerAddrs()[0], "meter/2", 0, 10)
	if st := a.Status(); st.Outbox.Messages != 10 || st.Uplink.Connected {
		t.Fatalf("want 10 stored and uplink down: %+v", st)
	}
}

// freezeProxy forwards TCP to target until frozen: then it stops copying in
// both directions without closing, like a dead link that TCP has not noticed.
// While refusing, it closes every new connection at once, like a link that
// is down.
type freezeProxy struct {
	l        net.Listener
	target   string
	frozen   atomic.Bool
	refusing atomic.Bool
}

func newFreezeProxy(t *testing.T, target string) *freezeProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{l: l, target: target}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *freezeProxy) serve(c net.Conn) {
	defer c.Close()
	if p.refusing.Load() {
		return
	}
	u, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer u.Close()
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if err != nil {
				dst.Close()
				src.Close()
				return
			}
			for p.frozen.Load() {
				time.Sleep(10 * time.Millisecond) // hold the bytes: the link is "dead"
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
	go cp(u, c)
	cp(c, u)
}

func TestStallDetection(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/stall/#")
	proxy := newFreezeProxy(t, up.Addr())
	a := testAgent(t, "mqtt://"+proxy.l.Addr().String(), func(c *Config) {
		c.Uplink.StallTimeout = Duration(500 * time.Millisecond)
		c.Uplink.KeepAlive = Duration(60 * time.Second) // keep-alive must not be what notices
	})
	waitFor(t, 10*time.Second, func() error {
		if !a.Status().Uplink.Connected {
			return errors.New("not connected")
		}
		return nil
	})
	proxy.frozen.Store(true)
	publishLines(t, a.BrokerAddrs()[0], "stall/x", 0, 50)
	waitFor(t, 10*time.Second, func() error {
		if s := a.Status().Uplink.Stalls; s == 0 {
			return errors.New("no stall detected")
		}
		return nil
	})
	proxy.frozen.Store(false)
	waitFor(t, 20*time.Second, func() error {
		if d, _ := col.Counts(); d < 50 {
			return fmt.Errorf("%d of 50 arrived after the stall", d)
		}
		return nil
	})
	got := col.Order()
	for i := range 50 {
		if !slices.Contains(got, fmt.Sprintf("%08d", i)) {
			t.Fatalf("message %d lost", i)
		}
	}
}

func TestAnonymousOnlyOnLoopback(t *testing.T) {
	requireClients(t)
	tests := []struct {
		name  string
		allow bool
		ok    bool
	}{
		{"wildcard address refuses anonymous", false, false},
		{"wildcard address with allow_anonymous", true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := testAgent(t, "", func(c *Config) {
				// Bound on every interface; the client still connects over loopback.
				c.Broker.Listeners = []ListenerConfig{{Address: "0.0.0.0:0", AllowAnonymous: tc.allow}}
			})
			_, port := hostPort(t, a.BrokerAddrs()[0])
			_, err := run(t, 10*time.Second, "mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", "mqttv5", "-q", "1", "-t", "a/b", "-m", "x")
			if tc.ok && err != nil {
				t.Fatalf("anonymous publish refused: %v", err)
			}
			if !tc.ok {
				if err == nil {
					t.Fatal("anonymous client admitted on a non-loopback listener")
				}
				if !strings.Contains(strings.ToLower(err.Error()), "bad user name or password") {
					t.Errorf("error does not say why: %v", err)
				}
			}
		})
	}
}

// TestRefusedMessageIsResent: an upstream that refuses a publish with a
// reason that may pass later (0x87 Not authorized, from Mosquitto's ACL)
// makes the uplink pause and send the same message again, in order, until
// the upstream takes it.
func TestRefusedMessageIsResent(t *testing.T) {
	requireClients(t)
	acl := filepath.Join(t.TempDir(), "acl")
	deny := "topic read #\n"
	if err := os.WriteFile(acl, []byte(deny), 0o644); err != nil {
		t.Fatal(err)
	}
	up := mosqtest.StartT(t, mosqtest.Options{Extra: "acl_file " + acl})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/acl/#")
	a := testAgent(t, up.URL(), nil)
	publishLines(t, a.BrokerAddrs()[0], "acl/x", 0, 5)
	waitFor(t, 20*time.Second, func() error {
		if st := a.Status().Uplink; st.Refused == 0 {
			return fmt.Errorf("no refusal seen; %+v", *st)
		}
		return nil
	})
	if d, _ := col.Counts(); d != 0 {
		t.Fatalf("%d messages arrived through a denying ACL", d)
	}
	if n := a.Status().Outbox.Messages; n != 5 {
		t.Fatalf("outbox holds %d messages after the refusal, want 5", n)
	}
	if err := os.WriteFile(acl, []byte("topic readwrite #\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := up.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, func() error {
		if d, _ := col.Counts(); d < 5 {
			return fmt.Errorf("%d of 5 arrived after the ACL allowed them; %+v", d, *a.Status().Uplink)
		}
		return nil
	})
	got := col.Order()
	for i, p := range got {
		if want := fmt.Sprintf("%08d", i); p != want {
			t.Fatalf("arrival %d is %s, want %s (order %v)", i, p, want, got)
		}
	}
}

// TestUpstreamMaximumPacketSize: a message larger than the upstream's
// Maximum Packet Size (Mosquitto's max_packet_size, announced in CONNACK)
// would be refused with a DISCONNECT every time it is sent and block its
// route. It is dropped and counted as rejected; the messages around it
// arrive, in order, on one connection.
func TestUpstreamMaximumPacketSize(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{Extra: "max_packet_size 1000"})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/big/#")
	a := testAgent(t, up.URL(), nil)
	addr := a.BrokerAddrs()[0]
	publishLines(t, addr, "big/x", 0, 3)
	host, port := hostPort(t, addr)
	if out, err := run(t, 30*time.Second, "mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1",
		"-t", "big/x", "-m", strings.Repeat("x", 2000)); err != nil {
		t.Fatalf("mosquitto_pub: %v: %s", err, out)
	}
	publishLines(t, addr, "big/x", 3, 3)
	waitFor(t, 30*time.Second, func() error {
		if d, _ := col.Counts(); d < 6 {
			return fmt.Errorf("%d of 6 small messages arrived; %+v", d, *a.Status().Uplink)
		}
		return nil
	})
	for i, p := range col.Order() {
		if want := fmt.Sprintf("%08d", i); p != want {
			t.Fatalf("arrival %d is %.20s, want %s (the oversized message must not arrive)", i, p, want)
		}
	}
	st := a.Status()
	if st.Uplink.Rejected != 1 || st.Uplink.Reconnects != 0 {
		t.Fatalf("uplink %+v, want 1 rejected and no reconnect", *st.Uplink)
	}
	waitFor(t, 10*time.Second, func() error {
		if n := a.Status().Outbox.Messages; n != 0 {
			return fmt.Errorf("%d messages still stored", n)
		}
		return nil
	})
}

// TestNoSubscribersCounted: an upstream with no subscriber for the topic
// accepts a message with PUBACK 0x10 and drops it. That is a delivery (the
// outbox lets it go), but the operator should see it: it is counted.
func TestNoSubscribersCounted(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{})
	a := testAgent(t, up.URL(), nil)
	publishLines(t, a.BrokerAddrs()[0], "nobody/x", 0, 3)
	waitFor(t, 20*time.Second, func() error {
		if st := a.Status(); st.Uplink.Forwarded < 3 || st.Outbox.Messages != 0 {
			return fmt.Errorf("outbox %+v; uplink %+v", st.Outbox, *st.Uplink)
		}
		return nil
	})
	if st := a.Status().Uplink; st.NoSubscribers != 3 {
		t.Fatalf("no-subscriber acknowledgements counted %d, want 3 (%+v)", st.NoSubscribers, *st)
	}
}

// TestSmallReceiveMaximum: with an upstream that allows only 5 QoS 1
// publishes in flight, everything arrives, in order, on one connection.
// (That the window stays within Receive Maximum is TestWindowWithinReceiveMaximum
// in runtime/uplink: Mosquitto 2.0.11 does not refuse a client that exceeds it.)
func TestSmallReceiveMaximum(t *testing.T) {
	requireClients(t)
	up := mosqtest.StartT(t, mosqtest.Options{Extra: "max_inflight_messages 5"})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/"+deviceID+"/rm/#")
	a := testAgent(t, up.URL(), nil)
	const n = 2000
	publishLines(t, a.BrokerAddrs()[0], "rm/x", 0, n)
	waitFor(t, 30*time.Second, func() error {
		if d, _ := col.Counts(); d < n {
			return fmt.Errorf("%d of %d arrived; uplink %+v", d, n, *a.Status().Uplink)
		}
		return nil
	})
	for i, p := range col.Order() {
		if want := fmt.Sprintf("%08d", i); p != want {
			t.Fatalf("arrival %d is %s, want %s", i, p, want)
		}
	}
	if st := a.Status().Uplink; st.Reconnects != 0 {
		t.Fatalf("uplink %+v: want no reconnect", *st)
	}
}
