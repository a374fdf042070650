package runtime

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/runtime/rollout"
)

// rolloutModule is one version of the test plugin "versioned" (its method
// "version" answers the version), built from runtime/testdata/rollout.
type rolloutModule struct {
	wasm     []byte
	sum      string
	manifest string
}

func newRolloutModule(t *testing.T, fixture, version string) rolloutModule {
	t.Helper()
	wasm := wasmtest.Wat(t, filepath.Join("testdata", "rollout", fixture+".wat"))
	sum := sha256.Sum256(wasm)
	hexSum := hex.EncodeToString(sum[:])
	man := fmt.Sprintf("name: versioned\nversion: %s\nsha256: %s\nhandlers:\n  - {kind: method, name: version}\n", version, hexSum)
	return rolloutModule{wasm: wasm, sum: hexSum, manifest: man}
}

// fileServer serves files by path on loopback. A path in gated waits,
// once its request has arrived (reported on arrived), until the test
// closes release.
type fileServer struct {
	*httptest.Server
	mu      sync.Mutex
	files   map[string][]byte
	gated   map[string]bool
	arrived chan string
	release chan struct{}
}

func newFileServer(t *testing.T) *fileServer {
	t.Helper()
	s := &fileServer{files: map[string][]byte{}, gated: map[string]bool{}, arrived: make(chan string, 8), release: make(chan struct{})}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		b, ok := s.files[r.URL.Path]
		gated := s.gated[r.URL.Path]
		s.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		if gated {
			s.arrived <- r.URL.Path
			select {
			case <-s.release:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = w.Write(b)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *fileServer) put(path string, b []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[path] = b
	return s.URL + path
}

func (s *fileServer) host() string { return strings.TrimPrefix(s.URL, "http://") }

// rolloutConfig turns the rollout on, from the file server's host.
func rolloutConfig(srv *fileServer) func(*Config) {
	return func(c *Config) {
		c.Plugins.Rollout = RolloutConfig{Enabled: true, Hosts: []string{srv.host()}}
	}
}

// invokeJSON invokes an Azure method with a JSON payload.
func invokeJSON(t *testing.T, h *hub.Hub, method string, params any) hub.MethodResult {
	t.Helper()
	b, _ := json.Marshal(params)
	r, err := h.Invoke(context.Background(), deviceID, method, b, 60*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", method, err)
	}
	return r
}

// servingVersion calls the plugin's method from the hub: its answer is the
// version serving, or "status N" when the call fails.
func servingVersion(t *testing.T, h *hub.Hub) string {
	t.Helper()
	r, err := h.Invoke(context.Background(), deviceID, "version", nil, 20*time.Second)
	if err != nil {
		t.Fatalf("version: %v", err)
	}
	if r.Status != 200 {
		return fmt.Sprintf("status %d", r.Status)
	}
	return r.Payload
}

func installParams(m rolloutModule, uri string) map[string]string {
	return map[string]string{"name": "versioned", "uri": uri, "sha256": m.sum, "manifest": m.manifest}
}

// TestAzurePluginRollout drives the rollout from the hub with direct
// methods: install, upgrade (manifest by URI), a tampered module, modules
// that fail to start (the old version answering while the download of
// the bad one is held, and after), a host outside plugins.rollout.hosts,
// bad parameters, rollback, list and remove.
func TestAzurePluginRollout(t *testing.T) {
	h := startHub(t)
	srv := newFileServer(t)
	testAgent(t, "", func(c *Config) {
		azureConfig(h, "")(c)
		c.Uplink.Azure.MethodTimeout = Duration(60 * time.Second)
		rolloutConfig(srv)(c)
	})
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	v1, v2 := newRolloutModule(t, "v1", "1.0.0"), newRolloutModule(t, "v2", "2.0.0")
	v1URI, v2URI := srv.put("/v1.wasm", v1.wasm), srv.put("/v2.wasm", v2.wasm)

	if got := servingVersion(t, h); got != "status 501" {
		t.Fatalf("before the install: %s, want status 501", got)
	}
	r := invokeJSON(t, h, rollout.MethodInstall, installParams(v1, v1URI))
	if r.Status != 200 || !strings.Contains(r.Payload, `"version":"1.0.0"`) {
		t.Fatalf("install v1: %+v", r)
	}
	if got := servingVersion(t, h); got != "1.0.0" {
		t.Fatalf("after the install: %s", got)
	}

	// Upgrade, the manifest by URI.
	p := installParams(v2, v2URI)
	delete(p, "manifest")
	p["manifestUri"] = srv.put("/v2.yaml", []byte(v2.manifest))
	p["version"] = "2.0.0"
	// The manifest grants the capabilities: one fetched by URI must be the
	// one the operator hashed.
	msum := sha256.Sum256([]byte(v2.manifest))
	p["manifestSha256"] = strings.Repeat("0", 64)
	if r := invokeJSON(t, h, rollout.MethodInstall, p); r.Status != 422 || !strings.Contains(r.Payload, "manifest's sha256") {
		t.Fatalf("a manifest that is not the one hashed: %+v, want 422", r)
	}
	delete(p, "manifestSha256")
	if r := invokeJSON(t, h, rollout.MethodInstall, p); r.Status != 400 || !strings.Contains(r.Payload, "manifestSha256") {
		t.Fatalf("manifestUri without manifestSha256: %+v, want 400", r)
	}
	p["manifestSha256"] = hex.EncodeToString(msum[:])
	r = invokeJSON(t, h, rollout.MethodInstall, p)
	var ans rollout.Answer
	if r.Status != 200 || json.Unmarshal([]byte(r.Payload), &ans) != nil || ans.Version != "2.0.0" || ans.Previous != "1.0.0" {
		t.Fatalf("upgrade to v2: %+v", r)
	}
	if got := servingVersion(t, h); got != "2.0.0" {
		t.Fatalf("after the upgrade: %s", got)
	}
	// A retry (its answer lost) changes nothing: v1 stays the version to
	// roll back to.
	r = invokeJSON(t, h, rollout.MethodInstall, p)
	if r.Status != 200 || !strings.Contains(r.Payload, `"version":"2.0.0"`) || strings.Contains(r.Payload, `"previous"`) {
		t.Fatalf("a retried upgrade: %+v, want 200 without a previous version", r)
	}

	// A tampered module: the server gives other bytes than the sha256
	// the operator sent.
	tampered := append(append([]byte(nil), v1.wasm...), 0, 4, 3, 'x', 'y', 'z') // an extra custom section
	r = invokeJSON(t, h, rollout.MethodInstall, installParams(v1, srv.put("/tampered.wasm", tampered)))
	var e struct{ Error string }
	if r.Status != 422 || json.Unmarshal([]byte(r.Payload), &e) != nil || !strings.Contains(e.Error, "sha256") {
		t.Fatalf("tampered module: %+v, want 422 {\"error\": ...sha256...}", r)
	}
	if got := servingVersion(t, h); got != "2.0.0" {
		t.Fatalf("after the tampered module: %s", got)
	}

	// Versions that fail to start: refused, and v2 serves before, while
	// the bad module is on its way, and after.
	for _, c := range []struct{ fixture, want string }{
		{"initfails", "refused to start"},
		{"inittraps", "unreachable"},
		{"nohandle", "does not export outpost_handle"},
	} {
		t.Run(c.fixture, func(t *testing.T) {
			bad := newRolloutModule(t, c.fixture, "3.0.0-"+c.fixture)
			path := "/" + c.fixture + ".wasm"
			uri := srv.put(path, bad.wasm)
			srv.mu.Lock()
			srv.gated[path] = true
			srv.release = make(chan struct{})
			release := srv.release
			srv.mu.Unlock()
			res := make(chan hub.MethodResult, 1)
			go func() {
				b, _ := json.Marshal(installParams(bad, uri))
				r, err := h.Invoke(context.Background(), deviceID, rollout.MethodInstall, b, 60*time.Second)
				if err != nil {
					r = hub.MethodResult{Payload: err.Error()}
				}
				res <- r
			}()
			if got := <-srv.arrived; got != path {
				t.Fatalf("the server got %s", got)
			}
			if got := servingVersion(t, h); got != "2.0.0" {
				t.Fatalf("during the upgrade to %s: %s", c.fixture, got)
			}
			close(release)
			r := <-res
			if r.Status != 422 || !strings.Contains(r.Payload, c.want) || !strings.Contains(r.Payload, "keeps serving") {
				t.Fatalf("upgrade to %s: %+v, want 422 with %q", c.fixture, r, c.want)
			}
			if got := servingVersion(t, h); got != "2.0.0" {
				t.Fatalf("after the upgrade to %s: %s", c.fixture, got)
			}
		})
	}

	// Refused before anything is fetched.
	for _, c := range []struct {
		name   string
		params map[string]string
		status int
		want   string
	}{
		{"host not allowed", installParams(v1, strings.Replace(v1URI, "127.0.0.1", "localhost", 1)), 403, "plugins.rollout.hosts"},
		{"no sha256", map[string]string{"name": "versioned", "uri": v1URI, "manifest": v1.manifest}, 400, "sha256"},
		{"no manifest", map[string]string{"name": "versioned", "uri": v1URI, "sha256": v1.sum}, 400, "manifest"},
		{"ftp", installParams(v1, "ftp://127.0.0.1/v1.wasm"), 400, "want an http or https URI"},
		{"other name", map[string]string{"name": "other", "uri": v1URI, "sha256": v1.sum, "manifest": v1.manifest}, 400, `the manifest is of plugin "versioned"`},
		{"missing file", installParams(v1, srv.URL+"/nosuch.wasm"), 502, "404"},
		{"unknown parameter", map[string]string{"name": "versioned", "url": v1URI}, 400, `unknown parameter "url"`},
	} {
		r := invokeJSON(t, h, rollout.MethodInstall, c.params)
		var e struct{ Error string }
		if r.Status != c.status || json.Unmarshal([]byte(r.Payload), &e) != nil || !strings.Contains(e.Error, c.want) {
			t.Errorf("%s: %+v, want %d with %q", c.name, r, c.status, c.want)
		}
	}
	if got := servingVersion(t, h); got != "2.0.0" {
		t.Fatalf("after the refusals: %s", got)
	}

	r = invokeJSON(t, h, rollout.MethodRollback, map[string]string{"name": "versioned", "version": "1.0.0"})
	if r.Status != 200 || !strings.Contains(r.Payload, `"version":"1.0.0"`) {
		t.Fatalf("rollback: %+v", r)
	}
	if got := servingVersion(t, h); got != "1.0.0" {
		t.Fatalf("after the rollback: %s", got)
	}
	// Retried with the version it wants, a rollback does not roll forward.
	r = invokeJSON(t, h, rollout.MethodRollback, map[string]string{"name": "versioned", "version": "1.0.0"})
	if r.Status != 200 || !strings.Contains(r.Payload, `"version":"1.0.0"`) {
		t.Fatalf("a retried rollback: %+v", r)
	}
	if got := servingVersion(t, h); got != "1.0.0" {
		t.Fatalf("after a retried rollback: %s, want 1.0.0", got)
	}
	r = invokeJSON(t, h, rollout.MethodList, nil)
	if r.Status != 200 || !strings.Contains(r.Payload, `"name":"versioned","version":"1.0.0"`) {
		t.Fatalf("list: %+v", r)
	}
	r = invokeJSON(t, h, rollout.MethodRemove, map[string]string{"name": "versioned"})
	if r.Status != 200 {
		t.Fatalf("remove: %+v", r)
	}
	if got := servingVersion(t, h); got != "status 501" {
		t.Fatalf("after the remove: %s, want status 501", got)
	}
	if r = invokeJSON(t, h, rollout.MethodRemove, map[string]string{"name": "versioned"}); r.Status != 404 {
		t.Fatalf("remove again: %+v, want 404", r)
	}
	if r = invokeJSON(t, h, rollout.MethodRollback, map[string]string{"name": "versioned"}); r.Status != 409 {
		t.Fatalf("rollback of a removed plugin: %+v, want 409", r)
	}
}

// TestAzurePluginRolloutSigned: with trust keys, an unsigned module and
// one signed by an untrusted key are refused, and the version installed
// keeps serving; a module signed by a trusted key installs.
func TestAzurePluginRolloutSigned(t *testing.T) {
	h := startHub(t)
	srv := newFileServer(t)
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	keys := filepath.Join(t.TempDir(), "trust.keys")
	if err := os.WriteFile(keys, []byte(base64.StdEncoding.EncodeToString(pub)+" test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	testAgent(t, "", func(c *Config) {
		azureConfig(h, "")(c)
		c.Uplink.Azure.MethodTimeout = Duration(60 * time.Second)
		c.Plugins.TrustKeys = keys
		rolloutConfig(srv)(c)
	})
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	v1, v2 := newRolloutModule(t, "v1", "1.0.0"), newRolloutModule(t, "v2", "2.0.0")
	v1URI, v2URI := srv.put("/v1.wasm", v1.wasm), srv.put("/v2.wasm", v2.wasm)

	p := installParams(v1, v1URI)
	p["signature"] = string(plugins.Sign(priv, []byte(v1.manifest)))
	if r := invokeJSON(t, h, rollout.MethodInstall, p); r.Status != 200 || !strings.Contains(r.Payload, `"signed":true`) {
		t.Fatalf("signed install: %+v", r)
	}
	for _, c := range []struct{ name, sig, want string }{
		{"unsigned", "", "unsigned"},
		{"untrusted key", string(plugins.Sign(other, []byte(v2.manifest))), "does not match"},
		{"signature of another manifest", string(plugins.Sign(priv, []byte(v1.manifest))), "does not match"},
	} {
		p := installParams(v2, v2URI)
		p["signature"] = c.sig
		r := invokeJSON(t, h, rollout.MethodInstall, p)
		if r.Status != 422 || !strings.Contains(r.Payload, c.want) {
			t.Errorf("%s: %+v, want 422 with %q", c.name, r, c.want)
		}
		if got := servingVersion(t, h); got != "1.0.0" {
			t.Fatalf("after the %s upgrade: %s", c.name, got)
		}
	}
	p = installParams(v2, v2URI)
	p["signature"] = string(plugins.Sign(priv, []byte(v2.manifest)))
	if r := invokeJSON(t, h, rollout.MethodInstall, p); r.Status != 200 {
		t.Fatalf("signed upgrade: %+v", r)
	}
	if got := servingVersion(t, h); got != "2.0.0" {
		t.Fatalf("after the signed upgrade: %s", got)
	}
}

// TestAzurePluginRolloutOff: without plugins.rollout.enabled the methods
// are not served (501), whatever a plugin would claim.
func TestAzurePluginRolloutOff(t *testing.T) {
	h := startHub(t)
	srv := newFileServer(t)
	testAgent(t, "", azureConfig(h, ""))
	waitUntil(t, "agent connected", func() bool { return connected(h, deviceID) })
	v1 := newRolloutModule(t, "v1", "1.0.0")
	if r := invokeJSON(t, h, rollout.MethodInstall, installParams(v1, srv.put("/v1.wasm", v1.wasm))); r.Status != 501 {
		t.Fatalf("install with the rollout off: %+v, want 501", r)
	}
}

// watsonFields is a custom action's d: the parameters as fields.
func watsonFields(p map[string]string) json.RawMessage {
	var fields []map[string]string
	for k, v := range p {
		fields = append(fields, map[string]string{"field": k, "value": v})
	}
	b, _ := json.Marshal(map[string]any{"fields": fields})
	return b
}

// TestWatsonPluginRollout drives the rollout from the hub with the custom
// actions of the bundle outpost-plugins, which the agent advertises:
// install, upgrade, a tampered module and one that fails to start (rc
// 400, the old version serving), rollback, list and remove. The plugin is
// called through the local broker.
func TestWatsonPluginRollout(t *testing.T) {
	mosqtest.Require(t, "mosquitto_rr")
	h := startWatsonHub(t)
	srv := newFileServer(t)
	a := testAgent(t, "", func(c *Config) {
		watsonConfig(h, nil)(c)
		rolloutConfig(srv)(c)
	})
	dev := "gw:" + deviceID
	waitUntil(t, "device managed", func() bool { st, err := h.Watson(dev); return err == nil && st.Managed })
	st, _ := h.Watson(dev)
	if st.Supports[rollout.Bundle] != true || st.Supports["example-bundle-v1"] != true {
		t.Fatalf("manage supports %v, want %s and the configured bundle", st.Supports, rollout.Bundle)
	}
	ctx := context.Background()
	action := func(name string, p map[string]string) hub.DMResult {
		t.Helper()
		var d json.RawMessage
		if p != nil {
			d = watsonFields(p)
		}
		r, err := h.DMRequest(ctx, dev, "mgmt/custom/"+rollout.Bundle+"/"+name, d, 60*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return r
	}
	serving := func() string {
		t.Helper()
		st, body := requestLocal(t, a, "outpost/methods/version", "")
		if st != "200" {
			return "status " + st
		}
		return body
	}
	v1, v2 := newRolloutModule(t, "v1", "1.0.0"), newRolloutModule(t, "v2", "2.0.0")
	v1URI, v2URI := srv.put("/v1.wasm", v1.wasm), srv.put("/v2.wasm", v2.wasm)

	if r := action("install", installParams(v1, v1URI)); r.RC != 200 || r.Message != "installed versioned 1.0.0" {
		t.Fatalf("install: %+v", r)
	}
	if got := serving(); got != "1.0.0" {
		t.Fatalf("after the install: %s", got)
	}
	if r := action("install", installParams(v2, v2URI)); r.RC != 200 || r.Message != "installed versioned 2.0.0 (was 1.0.0)" {
		t.Fatalf("upgrade: %+v", r)
	}
	if got := serving(); got != "2.0.0" {
		t.Fatalf("after the upgrade: %s", got)
	}
	tampered := append(append([]byte(nil), v1.wasm...), 0, 4, 3, 'x', 'y', 'z')
	if r := action("install", installParams(v1, srv.put("/tampered.wasm", tampered))); r.RC != 400 || !strings.Contains(r.Message, "sha256") {
		t.Fatalf("tampered module: %+v, want rc 400 naming the sha256", r)
	}
	bad := newRolloutModule(t, "initfails", "3.0.0")
	if r := action("install", installParams(bad, srv.put("/initfails.wasm", bad.wasm))); r.RC != 400 || !strings.Contains(r.Message, "refused to start") {
		t.Fatalf("a module that fails to start: %+v, want rc 400", r)
	}
	if got := serving(); got != "2.0.0" {
		t.Fatalf("after the refused upgrades: %s", got)
	}
	if r := action("rollback", map[string]string{"name": "versioned"}); r.RC != 200 || r.Message != "rolled versioned back to version 1.0.0" {
		t.Fatalf("rollback: %+v", r)
	}
	if got := serving(); got != "1.0.0" {
		t.Fatalf("after the rollback: %s", got)
	}
	if r := action("list", nil); r.RC != 200 || r.Message != "versioned 1.0.0" {
		t.Fatalf("list: %+v", r)
	}
	if r := action("remove", map[string]string{"name": "versioned"}); r.RC != 200 {
		t.Fatalf("remove: %+v", r)
	}
	if got := serving(); got != "status 501" {
		t.Fatalf("after the remove: %s", got)
	}
	if r := action("remove", map[string]string{"name": "versioned"}); r.RC != 404 {
		t.Fatalf("remove again: %+v, want rc 404 (not installed)", r)
	}
	if r := action("upgrade-all", nil); r.RC != 501 {
		t.Fatalf("an unknown action: %+v, want 501", r)
	}
}
