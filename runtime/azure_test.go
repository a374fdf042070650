package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

var hubKey = []byte("azure-test-key-0123456789abcdef")

// startHub runs the emulator on free loopback ports until the test ends.
func startHub(t *testing.T) *hub.Hub {
	t.Helper()
	h, err := hub.New(hub.Options{Listen: "127.0.0.1:0", API: "off", DefaultKey: hubKey, RedeliveryDelay: 50 * time.Millisecond,
		Log: testLogger(t).With("component", "hub")})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// azureConfig points an agent at the hub with the azure dialect.
func azureConfig(h *hub.Hub, dir string) func(*Config) {
	return func(c *Config) {
		if dir != "" {
			c.DataDir = dir
		}
		c.Uplink.URL = "mqtt://" + h.Addr()
		c.Uplink.Dialect = "azure"
		c.Uplink.Azure.Host = "outpost-hub.local"
		c.Uplink.Azure.SharedAccessKey = base64.StdEncoding.EncodeToString(hubKey)
		c.Uplink.Azure.MethodTimeout = Duration(2 * time.Second)
	}
}

var toolsWasm []byte

// installTools installs the sandbox's Go test guest as plugin "tools"
// unless it is there from an earlier run on the same data directory.
func installTools(t *testing.T, a *Agent) {
	t.Helper()
	for _, p := range a.Plugins().List() {
		if p.Name == "tools" {
			return
		}
	}
	if toolsWasm == nil {
		toolsWasm = wasmtest.BuildGo(t, "../plugins/sandbox/testdata/goguest")
	}
	sum := sha256.Sum256(toolsWasm)
	man := fmt.Sprintf(`name: tools
version: 1.0.0
sha256: %s
handlers:
  - {kind: method, name: echo}
  - {kind: method, name: panic}
  - {kind: method, name: sleep}
  - {kind: command, name: fail}
  - {kind: command, name: flaky}
  - {kind: command, name: ok}
  - {kind: dm_action, name: device.reboot}
`, hex.EncodeToString(sum[:]))
	if _, err := a.Plugins().Install(context.Background(), []byte(man), toolsWasm, nil); err != nil {
		t.Fatal(err)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 15s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func connected(h *hub.Hub, id string) bool {
	for _, d := range h.Devices() {
		if d.ID == id && d.Connected {
			return true
		}
	}
	return false
}

// TestAzureMethodsThroughHub: a method invoked from the hub reaches a wasm
// handler and its response comes back; unknown, trapping and late
// handlers get 501, 500 and 504; the hub never had to disconnect the agent.
func TestAzureMethodsThroughHub(t *testing.T) {
	h := startHub(t)
	a := testAgent(t, "", azureConfig(h, ""))
	installTools(t, a)
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })

	ctx := context.Background()
	r, err := h.Invoke(ctx, deviceID, "echo", []byte(`{"ping":1}`), 10*time.Second)
	if err != nil || r.Status != 200 || r.Payload != `{"ping":1}` {
		t.Fatalf("echo: %+v %v", r, err)
	}
	for _, c := range []struct {
		method, payload string
		status          int
		body            string
	}{
		{"nosuch", "", 501, `no plugin serves method "nosuch"`},
		{"panic", "", 500, ""},
		{"sleep", "5s", 504, ""}, // beyond uplink.azure.method_timeout (2s)
	} {
		r, err := h.Invoke(ctx, deviceID, c.method, []byte(c.payload), 10*time.Second)
		if err != nil || r.Status != c.status || !strings.Contains(r.Payload, c.body) {
			t.Errorf("%s: %+v %v, want status %d", c.method, r, err, c.status)
		}
	}
	if r, err := h.Invoke(ctx, deviceID, "echo", []byte("still"), 10*time.Second); err != nil || r.Payload != "still" {
		t.Fatalf("echo after the failures: %+v %v", r, err)
	}
	if st := h.Stats(); st.Disconnects != 0 || st.Connects != 1 {
		t.Fatalf("hub stats %+v: the agent must never be disconnected by the hub", st)
	}
}

// TestAzureCommandsThroughHub: commands are completed, abandoned (then
// redelivered with delivery-count 2 and completed), and rejected.
func TestAzureCommandsThroughHub(t *testing.T) {
	h := startHub(t)
	a := testAgent(t, "", azureConfig(h, ""))
	installTools(t, a)
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	send := func(name, payload string) hub.Command {
		t.Helper()
		cmd, err := h.SendCommand(deviceID, name, []byte(payload), nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		c, err := h.WaitCommand(ctx, cmd)
		if err != nil {
			t.Fatalf("command %s not settled: %+v", name, c)
		}
		return c
	}
	if c := send("ok", ""); c.State != "completed" || c.Deliveries != 1 {
		t.Errorf("ok: %+v", c)
	}
	if c := send("flaky", ""); c.State != "completed" || c.Deliveries != 2 {
		t.Errorf("flaky: %+v, want completed on the second delivery", c)
	}
	if c := send("fail", "no"); c.State != "rejected" || c.Deliveries != 1 {
		t.Errorf("fail: %+v, want rejected", c)
	}
	if c := send("", "no handler for c2d"); c.State != "rejected" {
		t.Errorf("a command no handler serves: %+v, want rejected", c)
	}
	if st := h.Stats(); st.Disconnects != 0 {
		t.Fatalf("hub disconnected the agent %d times", st.Disconnects)
	}
}

// TestAzureTwinConvergesAfterOffline: desired patches made while the agent
// is down, and reported patches the agent queued meanwhile, meet when it
// reconnects.
func TestAzureTwinConvergesAfterOffline(t *testing.T) {
	h := startHub(t)
	dir := t.TempDir()
	a := testAgent(t, "", azureConfig(h, dir))
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	if _, err := h.PatchDesired(deviceID, []byte(`{"rate":5}`)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "live desired patch", func() bool { return a.twin.Desired().Props["rate"] != nil })
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	for _, p := range []string{`{"rate":7,"mode":"eco"}`, `{"mode":null,"limits":{"max":80}}`} {
		if _, err := h.PatchDesired(deviceID, []byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	b := testAgent(t, "", func(c *Config) { azureConfig(h, dir)(c); c.Uplink.URL = "mqtt://127.0.0.1:1" }) // offline
	if _, err := b.twin.Report([]byte(`{"fw":"1.2.0"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.twin.Report([]byte(`{"fw":"1.3.0","uptime":42}`)); err != nil {
		t.Fatal(err)
	}
	if got := b.twin.Reported().Props["fw"]; got != "1.3.0" {
		t.Fatalf("reported view offline: fw %v", got)
	}
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	c := testAgent(t, "", azureConfig(h, dir))
	var doc struct {
		Desired  map[string]any `json:"desired"`
		Reported map[string]any `json:"reported"`
	}
	waitUntil(t, "twin converged", func() bool {
		raw, err := h.Twin(deviceID)
		if err != nil || json.Unmarshal(raw, &doc) != nil {
			return false
		}
		d := c.twin.Desired()
		return doc.Reported["fw"] == "1.3.0" && len(c.twin.Pending()) == 0 &&
			fmt.Sprint(doc.Desired["$version"]) == fmt.Sprint(d.Version) && fmt.Sprint(d.Props) == "map[limits:map[max:80] rate:7]"
	})
	if doc.Reported["uptime"] == nil {
		t.Fatalf("hub reported %v: the second queued patch is missing", doc.Reported)
	}
}

// TestAzureTelemetryThroughHub: local publishes reach the hub with the
// API's properties; a throttled message is sent again, a refused one is
// dropped, and the hub never disconnects the agent.
func TestAzureTelemetryThroughHub(t *testing.T) {
	h := startHub(t)
	a := testAgent(t, "", azureConfig(h, ""))
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	addr := a.BrokerAddrs()[0]
	cl := mqtttest.Client(t, addr, "sensor")
	pub := func(payload string) {
		t.Helper()
		if err := publishWithProps(cl, "plant/line1/temp", payload, map[string]string{"unit": "C"}); err != nil {
			t.Fatal(err)
		}
	}
	received := func(want string) func() bool {
		return func() bool {
			var got []string
			for _, e := range h.Telemetry() {
				got = append(got, e.Payload)
			}
			return strings.Join(got, ",") == want
		}
	}
	pub("21.5")
	waitUntil(t, "the first message at the hub", received("21.5")) // so that the fault hits the next one
	h.AddFault(hub.Fault{Device: deviceID, Op: "telemetry", Status: "0501"})
	pub("throttled-once")
	waitUntil(t, "the throttled message sent again", received("21.5,throttled-once"))
	h.AddFault(hub.Fault{Device: deviceID, Op: "telemetry", Status: "0100"})
	pub("refused")
	pub("after")
	waitUntil(t, "telemetry at the hub", received("21.5,throttled-once,after"))
	e := h.Telemetry()[0]
	if e.Topic != "$iothub/telemetry" || e.Props["@unit"] != "C" || e.Props["message-id"] == "" || e.Props["creation-time"] == "" {
		t.Fatalf("telemetry event %+v", e)
	}
	// The hub may record "after" before the agent has read the refusal of
	// the message before it: wait for the counts.
	waitUntil(t, "the bad request dropped, the throttled message retried", func() bool {
		st := a.Status().Uplink
		return st.Rejected == 1 && st.Refused == 1
	})
	if st := h.Stats(); st.Disconnects != 0 || st.Connects != 1 {
		t.Fatalf("hub stats %+v: a throttled or refused message must cost no connection", st)
	}
}

// TestAzureReauthenticates: with a 10 s signature, the agent
// re-authenticates before it expires and stays on its first connection.
func TestAzureReauthenticates(t *testing.T) {
	h := startHub(t)
	testAgent(t, "", func(c *Config) { azureConfig(h, "")(c); c.Uplink.Azure.SASLifetime = Duration(10 * time.Second) })
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	time.Sleep(12 * time.Second)
	if st := h.Stats(); st.Connects != 1 || st.Disconnects != 0 || !connected(h, deviceID) {
		t.Fatalf("hub stats %+v after the first signature expired: want one connection, kept", st)
	}
}

// publishWithProps publishes at QoS 1 with user properties and waits for
// the PUBACK.
func publishWithProps(cl *paho.Client, topic, payload string, props map[string]string) error {
	p := &paho.Publish{QoS: 1, Topic: topic, Payload: []byte(payload), Properties: &paho.PublishProperties{}}
	for k, v := range props {
		p.Properties.User = append(p.Properties.User, paho.UserProperty{Key: k, Value: v})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := cl.Publish(ctx, p)
	if err == nil && r.ReasonCode >= 0x80 {
		err = fmt.Errorf("PUBACK reason 0x%02x", r.ReasonCode)
	}
	return err
}
