// Package examples tests the example handlers: each is built from source,
// installed in a real agent with the manifest it ships, and called through
// the agent's local broker with mosquitto_rr. The Go and the
// AssemblyScript examples serve the same handlers and pass the same test.
package examples

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/runtime"
)

func TestGoExample(t *testing.T) {
	conformance(t, wasmtest.BuildGo(t, "handler-go"), "handler-go/manifest.yaml.in")
}

func TestAssemblyScriptExample(t *testing.T) {
	conformance(t, wasmtest.BuildAS(t, "handler-as"), "handler-as/manifest.yaml.in")
}

// conformance installs a module with its manifest in a real agent and
// calls each handler with mosquitto_rr through the agent's local broker.
func conformance(t *testing.T, wasm []byte, manifestIn string) {
	mosqtest.Require(t, "mosquitto_rr")
	tmpl, err := os.ReadFile(manifestIn)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(wasm)
	manifest := strings.ReplaceAll(string(tmpl), "@SHA256@", hex.EncodeToString(sum[:]))

	cfg := runtime.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Broker.Listeners = []runtime.ListenerConfig{{Address: "127.0.0.1:0"}}
	a, err := runtime.New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Plugins().Install(context.Background(), []byte(manifest), wasm, nil); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	defer a.Close(context.Background())
	host, port, _ := net.SplitHostPort(a.BrokerAddrs()[0])

	rr := func(topic, payload string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "mosquitto_rr", "-h", host, "-p", port, "-t", topic, "-e", "replies/example",
			"-m", payload, "-W", "20", "-F", "%P %p").CombinedOutput()
		if err != nil {
			t.Fatalf("mosquitto_rr %s: %v: %s", topic, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if out := rr("outpost/methods/getDiagnostics", ""); !strings.HasPrefix(out, "status:200 ") || !strings.Contains(out, `"setpoint_limits":{"min":5,"max":80}`) {
		t.Fatalf("getDiagnostics: %s (the limits come from the manifest's config)", out)
	}
	if out := rr("outpost/methods/echo", "ping"); out != "status:200 ping" {
		t.Fatalf("echo: %q", out)
	}
	if out := rr("outpost/commands/setpoint", `{"value": 42}`); out != `status:200 {"accepted":42}` {
		t.Fatalf("setpoint 42: %q", out)
	}
	if out := rr("outpost/commands/setpoint", `{"value": 95}`); !strings.HasPrefix(out, "status:422 ") || !strings.Contains(out, "95 is outside 5..80") {
		t.Fatalf("setpoint 95: %q", out)
	}
	if out := rr("outpost/commands/setpoint", `not json`); !strings.HasPrefix(out, "status:400 ") {
		t.Fatalf("setpoint with a bad payload: %q", out)
	}
}

// TestSecureConfig: the secure broker example is a valid configuration.
func TestSecureConfig(t *testing.T) {
	cfg, err := runtime.LoadConfig("configs/secure.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Broker.Users) != 2 || !cfg.Broker.Listeners[1].RequireClientCert {
		t.Fatalf("broker %+v", cfg.Broker)
	}
}
