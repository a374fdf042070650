package main

import (
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
)

// TestHubCLI runs `outpost hub` and the agent as processes, connected with
// the azure dialect on the hub's defaults, and drives the hub with its CLI:
// a method, a command, the twin, telemetry, a fault, and bad usage.
func TestHubCLI(t *testing.T) {
	mosqtest.Require(t, "mosquitto_pub")
	hp := startHubProc(t)
	api, mqttAddr, hub, hubErr := hp.api, hp.mqtt, hp.cmd, hp.stderr

	cfg := `uplink:
  backoff_min: 50ms
  backoff_max: 500ms
  dialect: azure
  azure:
    host: outpost-hub.local
    shared_access_key: ` + defaultHubKey + "\n"
	a := startAgentConfig(t, cfg, "mqtt://"+mqttAddr, "--install", examplePlugin(t))
	hubcli := func(args ...string) (int, string, string) {
		t.Helper()
		return cli(t, append([]string{"hub"}, append(args, "--api", api)...)...)
	}
	waitFor(t, 30*time.Second, func() error {
		if _, o, _ := hubcli("devices"); !strings.Contains(o, `"connected": true`) {
			return fmt.Errorf("devices: %s", o)
		}
		return nil
	})
	if code, o, e := hubcli("invoke", "gw", "echo", "--payload", "hello"); code != 0 || strings.TrimSpace(o) != "hello" || !strings.Contains(e, "status 200") {
		t.Fatalf("invoke: %d %q %q", code, o, e)
	}
	if code, _, e := hubcli("invoke", "gw", "nosuch"); code != 1 || !strings.Contains(e, "status 501") {
		t.Fatalf("invoke of an unknown method: %d %q", code, e)
	}
	if code, o, e := hubcli("send-command", "gw", "--command", "setpoint", "--payload", `{"value":42}`, "--wait", "20s"); code != 0 || !strings.Contains(o, `"state": "completed"`) {
		t.Fatalf("send-command: %d %s %s", code, o, e)
	}
	if code, o, _ := hubcli("send-command", "gw", "--command", "setpoint", "--payload", `{"value":95}`, "--wait", "20s"); code != 0 || !strings.Contains(o, `"state": "rejected"`) {
		t.Fatalf("a command its handler refuses: %d %s", code, o)
	}
	if code, o, e := hubcli("patch-desired", "gw", `{"rate":5}`); code != 0 || !strings.Contains(o, `"version"`) {
		t.Fatalf("patch-desired: %d %s %s", code, o, e)
	}
	if code, o, _ := hubcli("twin", "gw"); code != 0 || !strings.Contains(o, `"rate": 5`) {
		t.Fatalf("twin: %d %s", code, o)
	}
	host, port, _ := strings.Cut(a.addr, ":")
	if err := exec.Command("mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", "plant/temp", "-m", "21.5").Run(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		if _, o, _ := hubcli("telemetry"); !strings.Contains(o, `"payload": "21.5"`) {
			return fmt.Errorf("telemetry: %s", o)
		}
		return nil
	})
	if code, _, e := hubcli("fault", "--op", "telemetry", "--status", "0501"); code != 0 {
		t.Fatalf("fault: %d %s", code, e)
	}
	for _, bad := range [][]string{{"invoke", "gw"}, {"fault", "--op", "telemetry"}, {"frobnicate"}} {
		if code, _, e := hubcli(bad...); code != 2 || e == "" {
			t.Errorf("%v: exit %d %q, want 2 and a message", bad, code, e)
		}
	}
	if code, _, e := hubcli("twin", "nobody"); code != 1 || !strings.Contains(e, "HTTP 404") {
		t.Errorf("twin of an unknown device: %d %q", code, e)
	}
	if err := hub.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := hub.Wait(); err != nil {
		t.Fatalf("hub exit on SIGINT: %v %s", err, hubErr.String())
	}
}
