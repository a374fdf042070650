package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// installGuest installs the sandbox's Go test guest as plugin "tools",
// serving the methods echo, panic and sleep and the command fail.
func installGuest(t *testing.T, a *Agent) {
	t.Helper()
	wasm := wasmtest.BuildGo(t, "../plugins/sandbox/testdata/goguest")
	sum := sha256.Sum256(wasm)
	man := fmt.Sprintf("name: tools\nversion: 1.0.0\nsha256: %s\nhandlers:\n  - {kind: method, name: echo}\n  - {kind: method, name: panic}\n  - {kind: command, name: fail}\n  - {kind: method, name: sleep}\n",
		hex.EncodeToString(sum[:]))
	if _, err := a.Plugins().Install(context.Background(), []byte(man), wasm, nil); err != nil {
		t.Fatal(err)
	}
}

// TestLocalRequestResponse: a local MQTT 5 client (mosquitto_rr) calls a
// wasm handler through the local broker with no uplink at all, and gets
// the response on its response topic with the status; requests are not
// stored for upstream; a failing handler gets its error status and the
// next request is served.
func TestLocalRequestResponse(t *testing.T) {
	mosqtest.Require(t, "mosquitto_rr")
	a := testAgent(t, "", nil)
	installGuest(t, a)
	host, port := hostPort(t, a.BrokerAddrs()[0])
	rr := func(topic, payload string, extra ...string) string {
		t.Helper()
		args := append([]string{"-h", host, "-p", port, "-t", topic, "-e", "replies/" + t.Name(), "-m", payload, "-W", "20", "-F", "%p|%P|%C"}, extra...)
		out, err := run(t, 30*time.Second, "mosquitto_rr", args...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	out := rr("outpost/methods/echo", "hello", "-D", "publish", "user-property", "line", "3", "-D", "publish", "content-type", "text/plain")
	parts := strings.SplitN(out, "|", 3)
	if len(parts) != 3 || parts[0] != "hello" || !strings.Contains(parts[1], "status:200") || !strings.Contains(parts[1], "line:3") || parts[2] != "text/plain" {
		t.Fatalf("echo: %q, want payload hello, status:200 and line:3 properties, content type text/plain", out)
	}
	out = rr("outpost/methods/nosuch", "x")
	if !strings.Contains(out, "status:501") || !strings.Contains(out, `no plugin serves method "nosuch"`) {
		t.Fatalf("unknown method: %q", out)
	}
	out = rr("outpost/methods/panic", "x")
	if !strings.Contains(out, "status:500") || !strings.Contains(out, "outpost-error:trap") {
		t.Fatalf("panicking handler: %q", out)
	}
	out = rr("outpost/commands/fail", "because")
	if !strings.Contains(out, "status:422") || !strings.Contains(out, "refused: because") {
		t.Fatalf("command: %q", out)
	}
	// The request's Message Expiry is its deadline.
	out = rr("outpost/methods/sleep", "10s", "-D", "publish", "message-expiry-interval", "1")
	if !strings.Contains(out, "status:504") || !strings.Contains(out, "outpost-error:timeout") {
		t.Fatalf("a handler past the request's expiry: %q", out)
	}
	if out := rr("outpost/methods/echo", "again"); !strings.HasPrefix(out, "again|") {
		t.Fatalf("after the failures: %q", out)
	}
	if st := a.Status(); st.Outbox.Messages != 0 {
		t.Fatalf("%d messages stored for upstream: requests and responses must stay local", st.Outbox.Messages)
	}
}

// TestPluginCapabilities: a plugin granted kv keeps a counter in the store
// across calls and restarts, within its quota; granted publish, it
// publishes to local subscribers and to the outbox, only under its
// publish_topics.
func TestPluginCapabilities(t *testing.T) {
	mosqtest.Require(t, "mosquitto_rr", "mosquitto_sub")
	dataDir := t.TempDir()
	wasm := wasmtest.BuildGo(t, "../plugins/sandbox/testdata/capguest")
	sum := sha256.Sum256(wasm)
	man := fmt.Sprintf(`name: caps
version: 1.0.0
sha256: %s
handlers:
  - {kind: method, name: count}
  - {kind: method, name: fill}
  - {kind: method, name: publish}
capabilities: [kv, publish]
publish_topics: ["plant/+/status", "outpost/#"]
limits: {kv_quota: 1KiB}
`, hex.EncodeToString(sum[:]))
	start := func() (*Agent, func(topic, payload string) string) {
		a := testAgent(t, "", func(c *Config) { c.DataDir = dataDir })
		host, port := hostPort(t, a.BrokerAddrs()[0])
		return a, func(topic, payload string) string {
			t.Helper()
			out, err := run(t, 30*time.Second, "mosquitto_rr", "-h", host, "-p", port, "-t", topic, "-e", "replies/caps", "-m", payload, "-W", "20", "-F", "%P %p")
			if err != nil {
				t.Fatal(err)
			}
			return strings.TrimSpace(out)
		}
	}
	a, rr := start()
	if _, err := a.Plugins().Install(context.Background(), []byte(man), wasm, nil); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		if out := rr("outpost/methods/count", ""); out != fmt.Sprintf("status:200 %d", i) {
			t.Fatalf("count %d: %q", i, out)
		}
	}
	if out := rr("outpost/methods/fill", "2000"); !strings.HasPrefix(out, "status:413 ") {
		t.Fatalf("over the quota: %q", out)
	}

	// A persistent local subscriber: registered first (-E), collected after.
	host, port := hostPort(t, a.BrokerAddrs()[0])
	subArgs := []string{"-h", host, "-p", port, "-t", "plant/#", "-q", "1", "-c", "-i", "caps-sub", "-V", "mqttv5", "-x", "60"}
	if _, err := run(t, 30*time.Second, "mosquitto_sub", append(subArgs, "-E")...); err != nil {
		t.Fatal(err)
	}
	if out := rr("outpost/methods/publish", "plant/line1/status running"); out != "status:204" {
		t.Fatalf("publish: %q", out)
	}
	got, err := run(t, 30*time.Second, "mosquitto_sub", append(subArgs, "-C", "1", "-v", "-W", "20")...)
	if err != nil || strings.TrimSpace(got) != "plant/line1/status running" {
		t.Fatalf("the local subscriber got %q, %v", got, err)
	}
	if st := a.Status(); st.Outbox.Messages != 1 {
		t.Fatalf("%d messages in the outbox, want the plugin's publish", st.Outbox.Messages)
	}
	if out := rr("outpost/methods/publish", "plant/line1/secret x"); !strings.HasPrefix(out, "status:403 ") {
		t.Fatalf("a topic outside publish_topics: %q", out)
	}
	if out := rr("outpost/methods/publish", "outpost/methods/count x"); !strings.HasPrefix(out, "status:403 ") {
		t.Fatalf("a request topic, even within publish_topics: %q", out)
	}
	if out := rr("outpost/methods/publish", "plant/+/status x"); !strings.HasPrefix(out, "status:403 ") {
		t.Fatalf("a wildcard topic: %q", out)
	}

	// The store keeps the counter across a restart of the agent.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	_, rr = start()
	if out := rr("outpost/methods/count", ""); out != "status:200 4" {
		t.Fatalf("count after a restart: %q", out)
	}
}
