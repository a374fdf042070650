package runtime

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// firmwareServer serves one image at /fw.bin (and 404 elsewhere), on
// loopback.
func firmwareServer(t *testing.T, image []byte) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/fw.bin" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(image)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// installBuiltin installs the first-party handler in plugins/builtin/name,
// built from source, with its manifest's lines replaced as given.
func installBuiltin(t *testing.T, a *Agent, name string, replace ...string) {
	t.Helper()
	dir := filepath.Join("..", "plugins", "builtin", name)
	wasm := wasmtest.BuildGo(t, dir)
	in, err := os.ReadFile(filepath.Join(dir, "manifest.yaml.in"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(wasm)
	man := strings.ReplaceAll(string(in), "@SHA256@", hex.EncodeToString(sum[:]))
	for i := 0; i+1 < len(replace); i += 2 {
		man = strings.ReplaceAll(man, replace[i], replace[i+1])
	}
	if _, err := a.Plugins().Install(context.Background(), []byte(man), wasm, nil); err != nil {
		t.Fatal(err)
	}
}

// TestWatsonFirmwareThroughHub runs Watson firmware downloads and updates
// end to end with the first-party firmware handler: an update before any
// download is refused, a URI the server does not have fails with
// updateStatus 6, a host outside http_hosts too, a verifier mismatch with
// 4, and a good image installs with the operator's command.
func TestWatsonFirmwareThroughHub(t *testing.T) {
	h := startWatsonHub(t)
	image := make([]byte, 3<<20)
	_, _ = rand.Read(image)
	sum := sha256.Sum256(image)
	verifier := "sha256:" + hex.EncodeToString(sum[:])
	srv := firmwareServer(t, image)
	host := strings.TrimPrefix(srv.URL, "http://")
	installed := filepath.Join(t.TempDir(), "installed")
	a := testAgent(t, "", func(c *Config) {
		watsonConfig(h, nil)(c)
		c.DM.InstallCommand = []string{"sh", "-c", `cp "$OUTPOST_FIRMWARE_FILE" "` + installed + `" && echo "$OUTPOST_FIRMWARE_VERSION" > "` + installed + `.version"`}
	})
	installBuiltin(t, a, "firmware", `http_hosts: ["*"]`, `http_hosts: ["`+host+`"]`)
	dev := "gw:" + deviceID
	waitUntil(t, "device managed", func() bool { st, err := h.Watson(dev); return err == nil && st.Managed })
	ctx := context.Background()

	if r, err := h.DMRequest(ctx, dev, "mgmt/initiate/firmware/update", nil, 10*time.Second); err != nil || r.RC != 400 {
		t.Fatalf("update before download: %+v %v, want rc 400", r, err)
	}
	for _, c := range []struct {
		name string
		fw   hub.Firmware
		want string
	}{
		{"missing", hub.Firmware{URI: srv.URL + "/missing.bin", Version: "2.0.0"}, "updateStatus 6"},
		{"host not allowed", hub.Firmware{URI: strings.Replace(srv.URL, "127.0.0.1", "localhost", 1) + "/fw.bin", Version: "2.0.0"}, "updateStatus 6"},
		{"verifier mismatch", hub.Firmware{URI: srv.URL + "/fw.bin", Version: "2.0.0", Verifier: "sha256:" + strings.Repeat("0", 64)}, "updateStatus 4"},
	} {
		rep, err := h.FirmwareUpdate(ctx, dev, c.fw, 30*time.Second)
		if err != nil || !strings.Contains(rep.Result, c.want) {
			t.Fatalf("%s: %+v %v, want %s", c.name, rep, err, c.want)
		}
	}
	if _, err := os.Stat(installed); err == nil {
		t.Fatal("a failed download was installed")
	}

	rep, err := h.FirmwareUpdate(ctx, dev, hub.Firmware{URI: srv.URL + "/fw.bin", Version: "2.0.0", Verifier: verifier}, 60*time.Second)
	if err != nil || rep.Result != "success" {
		t.Fatalf("update: %+v %v", rep, err)
	}
	got, err := os.ReadFile(installed)
	if err != nil || sha256.Sum256(got) != sum {
		t.Fatalf("the install command got %d bytes (err %v), not the image", len(got), err)
	}
	if v, _ := os.ReadFile(installed + ".version"); strings.TrimSpace(string(v)) != "2.0.0" {
		t.Fatalf("install command saw version %q", v)
	}
	raw, _ := json.Marshal(map[string]any{"fields": []string{"deviceInfo", "mgmt.firmware"}})
	r, err := h.DMRequest(ctx, dev, "observe", raw, 10*time.Second)
	if err != nil || r.RC != 200 || !strings.Contains(string(r.D), `"fwVersion":"2.0.0"`) || !strings.Contains(string(r.D), `"state":0,"updateStatus":0`) {
		t.Fatalf("after the update: %+v %v", r, err)
	}
	if st := h.Stats(); st.Disconnects != 0 {
		t.Fatalf("hub disconnected the agent %d times", st.Disconnects)
	}
}

// TestAzureFirmwareUpdateMethod: on Azure the firmwareUpdate method runs
// the same handlers, answers 202 at once, and the twin's reported firmware
// shows the outcome.
func TestAzureFirmwareUpdateMethod(t *testing.T) {
	h := startHub(t)
	image := []byte("OPFW" + strings.Repeat("x", 100000))
	sum := sha256.Sum256(image)
	srv := firmwareServer(t, image)
	a := testAgent(t, "", azureConfig(h, ""))
	installBuiltin(t, a, "firmware", `magic: ""`, `magic: "OPFW"`)
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	ctx := context.Background()

	r, err := h.Invoke(ctx, deviceID, "firmwareUpdate", []byte(`{"uri":"ftp://x"}`), 10*time.Second)
	if err != nil || r.Status != 400 {
		t.Fatalf("bad uri: %+v %v", r, err)
	}
	body, _ := json.Marshal(map[string]string{"uri": srv.URL + "/fw.bin", "version": "3.1.0", "verifier": hex.EncodeToString(sum[:])})
	r, err = h.Invoke(ctx, deviceID, "firmwareUpdate", body, 10*time.Second)
	if err != nil || r.Status != 202 {
		t.Fatalf("firmwareUpdate: %+v %v", r, err)
	}
	var doc struct {
		Reported struct {
			Firmware map[string]any `json:"firmware"`
		} `json:"reported"`
	}
	waitUntil(t, "the twin reports the installed firmware", func() bool {
		raw, err := h.Twin(deviceID)
		if err != nil || json.Unmarshal(raw, &doc) != nil {
			return false
		}
		f := doc.Reported.Firmware
		return f["installed"] == "3.1.0" && f["state"] == float64(0) && f["updateStatus"] == float64(0)
	})
}

// TestDeviceHandler: the first-party device handler agrees to a reboot,
// which runs the operator's command; refuses a factory reset (off unless
// the operator turns it on); refuses both while a local client has locked
// the device; and its diagnostics say so.
func TestDeviceHandler(t *testing.T) {
	mosqtest.Require(t, "mosquitto_rr")
	h := startWatsonHub(t)
	marker := filepath.Join(t.TempDir(), "rebooted")
	a := testAgent(t, "", func(c *Config) {
		watsonConfig(h, nil)(c)
		c.DM.RebootCommand = []string{"sh", "-c", "echo yes >> " + marker}
		c.DM.FactoryResetCommand = []string{"true"}
	})
	installBuiltin(t, a, "device")
	dev := "gw:" + deviceID
	waitUntil(t, "device managed", func() bool { st, err := h.Watson(dev); return err == nil && st.Managed })
	ctx := context.Background()
	dm := func(op string) int {
		t.Helper()
		r, err := h.DMRequest(ctx, dev, op, nil, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return r.RC
	}
	if rc := dm("mgmt/initiate/device/reboot"); rc != 202 {
		t.Fatalf("reboot: rc %d", rc)
	}
	waitUntil(t, "the reboot command ran", func() bool { b, _ := os.ReadFile(marker); return string(b) == "yes\n" })
	if rc := dm("mgmt/initiate/device/factory_reset"); rc != 501 {
		t.Fatalf("factory reset, not allowed by the handler's config: rc %d, want 501", rc)
	}
	if st, body := requestLocal(t, a, "outpost/methods/device.lock", "on"); st != "200" {
		t.Fatalf("lock: %s %s", st, body)
	}
	if rc := dm("mgmt/initiate/device/reboot"); rc != 400 {
		t.Fatalf("reboot while locked: rc %d, want 400 (the handler's 409)", rc)
	}
	st, body := requestLocal(t, a, "outpost/methods/device.diagnostics", "")
	if st != "200" || !strings.Contains(body, `"locked":true`) || !strings.Contains(body, `"last_reboot"`) {
		t.Fatalf("diagnostics: %s %s", st, body)
	}
	if b, _ := os.ReadFile(marker); string(b) != "yes\n" {
		t.Fatalf("the reboot command ran again while locked: %q", b)
	}
}
