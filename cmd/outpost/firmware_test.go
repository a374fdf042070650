package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
)

// builtinPlugin writes a first-party handler, built, with its manifest,
// into a plugin directory.
func builtinPlugin(t *testing.T, name string) string {
	return pluginDir(t, filepath.Join("..", "..", "plugins", "builtin", name))
}

// slowServer serves image at /fw.bin: the first response slowly, 64 KiB
// every 20 ms, the next ones at once. served counts the bytes sent.
func slowServer(t *testing.T, image []byte, served *atomic.Int64) *httptest.Server {
	t.Helper()
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(image)))
		if requests.Add(1) > 1 {
			_, _ = w.Write(image)
			return
		}
		for off := 0; off < len(image); off += 64 << 10 {
			end := min(off+64<<10, len(image))
			if _, err := w.Write(image[off:end]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			served.Add(int64(end - off))
			time.Sleep(20 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestFirmwareSurvivesKill9 runs a Watson firmware update through the hub
// with the agent killed -9 twice: in the middle of the download, which
// starts again after the restart, and in the middle of the install, which
// the restart finds in place (the version command says so). The update
// ends in success, with the image intact.
func TestFirmwareSurvivesKill9(t *testing.T) {
	h, err := hub.New(hub.Options{Listen: "127.0.0.1:0", API: "off", DefaultToken: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })

	image := make([]byte, 4<<20)
	_, _ = rand.Read(image)
	sum := sha256.Sum256(image)
	var served atomic.Int64
	srv := slowServer(t, image, &served)

	work := t.TempDir()
	version, installed, installing := filepath.Join(work, "version"), filepath.Join(work, "image"), filepath.Join(work, "installing")
	if err := os.WriteFile(version, []byte("1.0.0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The install command applies the image and writes the new version,
	// then "reboots": it blocks until the agent is killed.
	install := fmt.Sprintf(`cp "$OUTPOST_FIRMWARE_FILE" %q && echo "$OUTPOST_FIRMWARE_VERSION" > %q && touch %q && exec sleep 20`,
		installed, version, installing)
	cfg := fmt.Sprintf(`uplink:
  backoff_min: 50ms
  backoff_max: 500ms
  dialect: watson
  watson: {org: outpst, type: gw, token: tok}
dm:
  version_command: [cat, %q]
  install_command: [sh, -c, %q]
`, version, install)
	a := startAgentConfig(t, cfg, "mqtt://"+h.Addr(), "--install", builtinPlugin(t, "firmware"))
	dev := "gw:gw"
	waitFor(t, 30*time.Second, func() error {
		if st, err := h.Watson(dev); err != nil || !st.Managed {
			return fmt.Errorf("not managed: %v", err)
		}
		return nil
	})
	a.args = a.args[:len(a.args)-2] // installed once; the data directory keeps it

	result := make(chan hub.FirmwareReport, 1)
	go func() {
		rep, err := h.FirmwareUpdate(context.Background(), dev, hub.Firmware{URI: srv.URL + "/fw.bin", Version: "2.0.0",
			Verifier: "sha256:" + hex.EncodeToString(sum[:])}, 90*time.Second)
		if err != nil {
			rep.Result = err.Error()
		}
		result <- rep
	}()
	waitFor(t, 30*time.Second, func() error {
		if n := served.Load(); n < 1<<20 {
			return fmt.Errorf("%d bytes served", n)
		}
		return nil
	})
	a.kill()
	n := served.Load()
	if n >= int64(len(image)) {
		t.Fatal("the download finished before the kill")
	}
	t.Logf("killed -9 after %d of %d bytes of the download", n, len(image))
	if st, _ := h.Watson(dev); fmt.Sprint(st.Firmware["state"]) != "1" {
		t.Fatalf("before the kill the platform saw %v, want state 1 (downloading)", st.Firmware)
	}
	a.start()

	// The download starts again and finishes; the install runs and
	// "reboots" the device.
	waitFor(t, 60*time.Second, func() error {
		if _, err := os.Stat(installing); err != nil {
			return fmt.Errorf("install not started: %v", err)
		}
		return nil
	})
	a.kill()
	t.Log("killed -9 during the install")
	a.start()

	select {
	case rep := <-result:
		if rep.Result != "success" {
			t.Fatalf("firmware update: %+v", rep)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the firmware update did not finish")
	}
	got, err := os.ReadFile(installed)
	if err != nil || sha256.Sum256(got) != sum {
		t.Fatalf("installed %d bytes (err %v), not the image", len(got), err)
	}
	st, _ := h.Watson(dev)
	if fmt.Sprint(st.Firmware["state"], st.Firmware["updateStatus"]) != "0 0" {
		t.Fatalf("the platform's last firmware value: %v", st.Firmware)
	}
	for _, want := range []string{"firmware download cut by a restart: starting it again", "firmware update finished across a restart"} {
		if !strings.Contains(a.stderr.String(), want) {
			t.Errorf("the agent's log lacks %q", want)
		}
	}
}
