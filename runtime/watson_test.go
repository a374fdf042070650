package runtime

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
)

// watsonConfig points an agent at the hub with the watson dialect, as
// device outpst/gw/DEVICE.
func watsonConfig(h *hub.Hub, mutate func(*WatsonConfig)) func(*Config) {
	return func(c *Config) {
		c.Uplink.URL = "mqtt://" + h.Addr()
		c.Uplink.Dialect = "watson"
		c.Uplink.Watson = WatsonConfig{Org: "outpst", Type: "gw", Token: "watson-test-token",
			Info: map[string]any{"serialNumber": "SN-7"}, Bundles: []string{"example-bundle-v1"}}
		c.DM.FirmwareVersion = "1.0.0"
		if mutate != nil {
			mutate(&c.Uplink.Watson)
		}
	}
}

func startWatsonHub(t *testing.T) *hub.Hub {
	t.Helper()
	h, err := hub.New(hub.Options{Listen: "127.0.0.1:0", API: "off", DefaultToken: "watson-test-token", DefaultKey: hubKey,
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

// TestWatsonThroughHub: the agent manages itself on connect, its events
// reach the hub, a command from the hub reaches a wasm handler, a reboot
// is agreed by its handler and runs the operator's command, and unknown
// operations get 501 and the connection stays up.
func TestWatsonThroughHub(t *testing.T) {
	h := startWatsonHub(t)
	marker := filepath.Join(t.TempDir(), "rebooted")
	a := testAgent(t, "", func(c *Config) {
		watsonConfig(h, nil)(c)
		c.DM.RebootCommand = []string{"sh", "-c", "echo rebooting > " + marker}
	})
	installTools(t, a)
	dev := "gw:" + deviceID
	waitUntil(t, "device managed", func() bool {
		st, err := h.Watson(dev)
		return err == nil && st.Managed
	})
	st, _ := h.Watson(dev)
	if st.Supports["deviceActions"] != true || st.Supports["firmwareActions"] != true || st.Supports["example-bundle-v1"] != true ||
		!strings.Contains(string(st.DeviceInfo), `"fwVersion":"1.0.0"`) || !strings.Contains(string(st.DeviceInfo), "SN-7") {
		t.Fatalf("manage as the hub saw it: %+v %s", st, st.DeviceInfo)
	}

	cl := mqtttest.Client(t, a.BrokerAddrs()[0], "sensor")
	if err := publishWithProps(cl, "plant/line1/temp", `{"t":20}`, nil); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "event at the hub", func() bool {
		for _, e := range h.Telemetry() {
			if e.Topic == "iot-2/evt/telemetry/fmt/json" && e.Payload == `{"t":20}` && e.Device == dev {
				return true
			}
		}
		return false
	})

	if err := h.WatsonCommand(dev, "ok", "json", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "command served by the handler", func() bool {
		for _, p := range a.Plugins().List() {
			if p.Name == "tools" && p.Stats.Calls >= 1 {
				return true
			}
		}
		return false
	})

	ctx := context.Background()
	r, err := h.DMRequest(ctx, dev, "mgmt/initiate/device/reboot", nil, 10*time.Second)
	if err != nil || r.RC != 202 {
		t.Fatalf("reboot: %+v %v", r, err)
	}
	waitUntil(t, "the operator's reboot command ran", func() bool {
		b, err := os.ReadFile(marker)
		return err == nil && strings.TrimSpace(string(b)) == "rebooting"
	})
	for op, want := range map[string]int{"mgmt/initiate/device/factory_reset": 501, "mgmt/initiate/nothing": 501,
		"mgmt/custom/example-bundle-v1/blink": 501, "mgmt/initiate/firmware/update": 400} {
		r, err := h.DMRequest(ctx, dev, op, nil, 10*time.Second)
		if err != nil || r.RC != want {
			t.Errorf("%s: %+v %v, want rc %d", op, r, err, want)
		}
	}
	raw, _ := json.Marshal(map[string]any{"fields": []string{"mgmt.firmware"}})
	if r, err := h.DMRequest(ctx, dev, "observe", raw, 10*time.Second); err != nil || r.RC != 200 || !strings.Contains(string(r.D), `"state":0`) {
		t.Fatalf("observe: %+v %v", r, err)
	}

	// Device-initiated DM, asked for by local clients.
	mosqtest.Require(t, "mosquitto_rr")
	for _, c := range []struct{ topic, payload, status string }{
		{"outpost/dm/location", `{"latitude":51.5072,"longitude":-0.1276,"elevation":35}`, "200"},
		{"outpost/dm/location", `{"latitude":100,"longitude":0}`, "400"},
		{"outpost/dm/error-code", `{"errorCode":12}`, "200"},
		{"outpost/dm/error-code", `{"code":12}`, "400"},
		{"outpost/dm/log", `{"message":"disk 91% full","severity":1}`, "200"},
		{"outpost/dm/nothing", ``, "404"},
	} {
		if st, body := requestLocal(t, a, c.topic, c.payload); st != c.status {
			t.Errorf("%s %s: status %s %s, want %s", c.topic, c.payload, st, body, c.status)
		}
	}
	st, _ = h.Watson(dev)
	if !strings.Contains(string(st.Location), "51.5072") || len(st.ErrorCodes) != 1 || st.ErrorCodes[0] != 12 ||
		len(st.Logs) != 1 || !strings.Contains(string(st.Logs[0]), "disk 91% full") {
		t.Fatalf("DM state at the hub: %+v", st)
	}
	if st, body := requestLocal(t, a, "outpost/dm/clear-error-codes", ""); st != "200" {
		t.Fatalf("clear error codes: %s %s", st, body)
	}
	if st, body := requestLocal(t, a, "outpost/dm/unmanage", ""); st != "200" {
		t.Fatalf("unmanage: %s %s", st, body)
	}
	if st, _ := h.Watson(dev); st.Managed || len(st.ErrorCodes) != 0 {
		t.Fatalf("after unmanage and clear: %+v", st)
	}
	if s := h.Stats(); s.Disconnects != 0 || s.Connects != 1 {
		t.Fatalf("hub stats %+v", s)
	}
}
