package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// hubProc is `outpost hub` running as a child process.
type hubProc struct {
	api, mqtt string
	cmd       *exec.Cmd
	stderr    *lockedBuffer
}

// startHubProc runs `outpost hub` on a free API port and a free MQTT port
// (extra flags come last, so they win), and reads the addresses it prints.
func startHubProc(t *testing.T, extra ...string) *hubProc {
	t.Helper()
	apiPort, err := mosqtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	h := &hubProc{api: fmt.Sprintf("127.0.0.1:%d", apiPort), stderr: &lockedBuffer{}}
	h.cmd = exec.Command(binary, append([]string{"hub", "--listen", "127.0.0.1:0", "--api", h.api, "--log-level", "warn"}, extra...)...)
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	h.cmd.Stderr = h.stderr
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.cmd.Process.Kill(); _ = h.cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("hub: %v %s", err, h.stderr.String())
	}
	m := regexp.MustCompile(`MQTT on (\S+),`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("hub printed %q", line)
	}
	h.mqtt = m[1]
	return h
}

// TestHubPluginCLI rolls a plugin out with the hub's CLI, from the files
// the hub serves (--serve), to an Azure device and to a Watson device:
// install, upgrade, a tampered module refused, rollback, list, remove, and
// bad usage.
func TestHubPluginCLI(t *testing.T) {
	files := t.TempDir()
	versions := map[string]string{}  // version -> sha256
	manifests := map[string]string{} // version -> the manifest's sha256
	for _, v := range []string{"1", "2"} {
		wasm := wasmtest.Wat(t, filepath.Join("..", "..", "runtime", "testdata", "rollout", "v"+v+".wat"))
		sum := sha256.Sum256(wasm)
		versions[v] = hex.EncodeToString(sum[:])
		man := fmt.Sprintf("name: versioned\nversion: %s.0.0\nsha256: %s\nhandlers:\n  - {kind: method, name: version}\n", v, versions[v])
		msum := sha256.Sum256([]byte(man))
		manifests[v] = hex.EncodeToString(msum[:])
		for name, b := range map[string][]byte{"v" + v + ".wasm": wasm, "v" + v + ".yaml": []byte(man)} {
			if err := os.WriteFile(filepath.Join(files, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A module whose bytes are not the ones its sha256 names.
	tampered, _ := os.ReadFile(filepath.Join(files, "v2.wasm"))
	if err := os.WriteFile(filepath.Join(files, "tampered.wasm"), append(tampered, 0, 4, 3, 'x', 'y', 'z'), 0o600); err != nil {
		t.Fatal(err)
	}
	hp := startHubProc(t, "--serve", files)
	api, mqttAddr := hp.api, hp.mqtt
	base := "http://" + api + "/files/"
	rolloutCfg := "plugins:\n  rollout:\n    enabled: true\n    hosts: [\"" + api + "\"]\n"
	startAgentConfig(t, `uplink:
  backoff_min: 50ms
  backoff_max: 500ms
  dialect: azure
  azure:
    host: outpost-hub.local
    shared_access_key: `+defaultHubKey+"\n"+rolloutCfg, "mqtt://"+mqttAddr)
	startAgentConfig(t, `uplink:
  backoff_min: 50ms
  backoff_max: 500ms
  dialect: watson
  watson:
    org: outpst
    type: gwtype
    token: outpost-local-token
`+rolloutCfg, "mqtt://"+mqttAddr)
	hubcli := func(args ...string) (int, string, string) {
		t.Helper()
		return cli(t, append([]string{"hub"}, append(args, "--api", api)...)...)
	}
	waitFor(t, 30*time.Second, func() error {
		_, o, _ := hubcli("devices")
		_, st, _ := hubcli("dm-state", "gwtype:gw")
		if strings.Count(o, `"connected": true`) != 2 || !strings.Contains(st, `"outpost-plugins": true`) {
			return fmt.Errorf("devices: %s, watson DM state: %s", o, st)
		}
		return nil
	})
	install := func(dev, v, uri string) (int, string, string) {
		t.Helper()
		return hubcli("plugin-install", dev, "--name", "versioned", "--uri", uri, "--sha256", versions[v],
			"--manifest", filepath.Join(files, "v"+v+".yaml"), "--timeout", "60s")
	}
	for _, dev := range []string{"gw", "gwtype:gw"} {
		t.Run(dev, func(t *testing.T) {
			if code, o, e := install(dev, "1", base+"v1.wasm"); code != 0 || !strings.Contains(o, "1.0.0") || !strings.Contains(e, "status 200") {
				t.Fatalf("plugin-install v1: %d %q %q", code, o, e)
			}
			if code, o, e := hubcli("plugin-install", dev, "--name", "versioned", "--uri", base+"v2.wasm", "--sha256", versions["2"],
				"--manifest-uri", base+"v2.yaml", "--manifest-sha256", manifests["2"]); code != 0 || !strings.Contains(o, "2.0.0") {
				t.Fatalf("plugin-install v2, the manifest by URI: %d %q %q", code, o, e)
			}
			if code, _, e := install(dev, "2", base+"tampered.wasm"); code != 1 || !strings.Contains(e, "sha256") {
				t.Fatalf("plugin-install of a tampered module: %d %q, want exit 1 naming the sha256", code, e)
			}
			if code, o, e := hubcli("plugin-list", dev); code != 0 || !strings.Contains(o, "2.0.0") {
				t.Fatalf("plugin-list after the refused upgrade: %d %q %q", code, o, e)
			}
			if dev == "gw" {
				if code, o, e := hubcli("invoke", dev, "version"); code != 0 || strings.TrimSpace(o) != "2.0.0" {
					t.Fatalf("invoke version: %d %q %q", code, o, e)
				}
			}
			if code, o, e := hubcli("plugin-rollback", dev, "--name", "versioned"); code != 0 || !strings.Contains(o, "1.0.0") {
				t.Fatalf("plugin-rollback: %d %q %q", code, o, e)
			}
			if code, o, e := hubcli("plugin-list", dev); code != 0 || !strings.Contains(o, "1.0.0") {
				t.Fatalf("plugin-list after the rollback: %d %q %q", code, o, e)
			}
			if code, o, e := hubcli("plugin-remove", dev, "--name", "versioned"); code != 0 {
				t.Fatalf("plugin-remove: %d %q %q", code, o, e)
			}
			if code, o, e := hubcli("plugin-list", dev); code != 0 || strings.Contains(o, "versioned") {
				t.Fatalf("plugin-list after the remove: %d %q %q", code, o, e)
			}
		})
	}
	for _, bad := range [][]string{
		{"plugin-install", "gw", "--name", "versioned", "--uri", base + "v1.wasm"},
		{"plugin-rollback", "gw"},
		{"plugin-remove"},
	} {
		if code, _, e := hubcli(bad...); code != 2 || e == "" {
			t.Errorf("%v: exit %d %q, want 2 and a message", bad, code, e)
		}
	}
}
