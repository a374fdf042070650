package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// TestTwinLocalWhileOffline: with the hub out of reach, local clients and
// a handler granted "twin" read the cached state and queue reported
// patches; once the hub is reachable the patches reach it in order, and
// desired changes are published on the local broker.
func TestTwinLocalWhileOffline(t *testing.T) {
	mosqtest.Require(t, "mosquitto_rr", "mosquitto_sub")
	h := startHub(t)
	dir := t.TempDir()
	a := testAgent(t, "", func(c *Config) { azureConfig(h, dir)(c); c.Uplink.URL = "mqtt://127.0.0.1:1" })
	wasm := wasmtest.BuildGo(t, "testdata/twinguest")
	sum := sha256.Sum256(wasm)
	man := fmt.Sprintf("name: twin-tools\nversion: 1.0.0\nsha256: %s\ncapabilities: [twin]\nhandlers:\n  - {kind: method, name: twin.get}\n  - {kind: method, name: twin.report}\n", hex.EncodeToString(sum[:]))
	if _, err := a.Plugins().Install(context.Background(), []byte(man), wasm, nil); err != nil {
		t.Fatal(err)
	}
	rr := func(topic, payload string) (string, string) { return requestLocal(t, a, topic, payload) }
	if st, body := rr("outpost/twin/report", `{"fw":"1.0","site":{"hall":3}}`); st != "202" {
		t.Fatalf("local report: status %s %s", st, body)
	}
	if st, body := rr("outpost/methods/twin.report", `{"uptime":5}`); st != "202" {
		t.Fatalf("handler report: status %s %s", st, body)
	}
	if st, _ := rr("outpost/twin/report", `[1,2]`); st != "400" {
		t.Fatalf("a patch that is not an object: status %s, want 400", st)
	}
	if st, _ := rr("outpost/methods/twin.report", `nope`); st != "400" {
		t.Fatalf("a handler's bad patch: status %s, want 400", st)
	}
	for _, topic := range []string{"outpost/twin/get", "outpost/methods/twin.get"} {
		st, body := rr(topic, "")
		if st != "200" || !strings.Contains(body, `"fw":"1.0"`) || !strings.Contains(body, `"uptime":5`) {
			t.Fatalf("%s offline: %s %s", topic, st, body)
		}
	}
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	b := testAgent(t, "", azureConfig(h, dir))
	sub := mosqtest.Subscribe(t, b.BrokerAddrs()[0], "%p", TwinDesiredTopic)
	waitUntil(t, "reported patches at the hub", func() bool {
		raw, err := h.Twin(deviceID)
		var doc struct{ Reported map[string]any }
		return err == nil && json.Unmarshal(raw, &doc) == nil && doc.Reported["fw"] == "1.0" && doc.Reported["uptime"] != nil
	})
	if _, err := h.PatchDesired(deviceID, []byte(`{"rate":9}`)); err != nil {
		t.Fatal(err)
	}
	sub.Wait(t, 10*time.Second, `"rate":9`)
}

// requestLocal sends a request to the agent's local broker with
// mosquitto_rr and returns the response's status property and payload.
func requestLocal(t *testing.T, a *Agent, topic, payload string) (status, body string) {
	t.Helper()
	host, port := hostPort(t, a.BrokerAddrs()[0])
	out, err := run(t, 30*time.Second, "mosquitto_rr", "-h", host, "-p", port, "-t", topic, "-e", "replies/local", "-m", payload, "-W", "20", "-F", "%P|%p")
	if err != nil {
		t.Fatal(err)
	}
	props, body, _ := strings.Cut(strings.TrimSpace(out), "|")
	for _, p := range strings.Fields(props) {
		if v, ok := strings.CutPrefix(p, "status:"); ok {
			status = v
		}
	}
	return status, body
}
