package plugins

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

var shared struct {
	once sync.Once
	e    *sandbox.Engine
}

func engine(t *testing.T) *sandbox.Engine {
	shared.once.Do(func() {
		e, err := sandbox.NewEngine("")
		if err != nil {
			panic(err)
		}
		shared.e = e
	})
	return shared.e
}

func open(t *testing.T, dir string, trust TrustKeys) *Registry {
	t.Helper()
	r, err := Open(context.Background(), Options{Dir: dir, Engine: engine(t), Trust: trust})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(context.Background()) })
	return r
}

func sum(wasm []byte) string {
	s := sha256.Sum256(wasm)
	return hex.EncodeToString(s[:])
}

// manifest writes a manifest for wasm; handlers are "kind:name".
func manifest(name, version string, wasm []byte, handlers ...string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "name: %s\nversion: %s\nsha256: %s\nhandlers:\n", name, version, sum(wasm))
	for _, h := range handlers {
		k, n, _ := strings.Cut(h, ":")
		fmt.Fprintf(&b, "  - {kind: %s, name: %s}\n", k, n)
	}
	return []byte(b.String())
}

func echoWat(t *testing.T) []byte   { return wasmtest.Wat(t, "sandbox/testdata/wat/echo.wat") }
func goGuest(t *testing.T) []byte   { return wasmtest.BuildGo(t, "sandbox/testdata/goguest") }
func failsInit(t *testing.T) []byte { return wasmtest.Wat(t, "sandbox/testdata/wat/initfails.wat") }

func call(r *Registry, kind abi.Kind, name, payload string) *sandbox.Response {
	return r.Call(context.Background(), &sandbox.Request{Meta: abi.Meta{Kind: kind, Name: name}, Payload: []byte(payload)})
}

// TestInstallUpgradeRollbackRemove: a plugin serves its names once
// installed; an upgrade serves in its place; a rollback brings the version
// before back; after removal the names are 501 again.
func TestInstallUpgradeRollbackRemove(t *testing.T) {
	r := open(t, t.TempDir(), nil)
	if st := call(r, abi.KindMethod, "echo", "x").Status; st != 501 {
		t.Fatalf("before install: status %d, want 501", st)
	}
	wat := echoWat(t)
	info, err := r.Install(context.Background(), manifest("echo", "1.0.0", wat, "method:echo"), wat, nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != "1.0.0" || info.Signed {
		t.Fatalf("info %+v", info)
	}
	if resp := call(r, abi.KindMethod, "echo", "v1"); resp.Status != 200 || resp.ContentType != "application/octet-stream" {
		t.Fatalf("v1: status %d, content type %q, err %v", resp.Status, resp.ContentType, resp.Err)
	}
	g := goGuest(t)
	if _, err := r.Install(context.Background(), manifest("echo", "2.0.0", g, "method:echo", "method:sleep"), g, nil); err != nil {
		t.Fatal(err)
	}
	// The Go guest echoes the content type it was given (none).
	if resp := call(r, abi.KindMethod, "echo", "v2"); resp.Status != 200 || resp.ContentType != "" || string(resp.Payload) != "v2" {
		t.Fatalf("v2: status %d, content type %q, payload %q", resp.Status, resp.ContentType, resp.Payload)
	}
	if l := r.List(); len(l) != 1 || l[0].Version != "2.0.0" || len(l[0].Handlers) != 2 {
		t.Fatalf("list %+v", l)
	}
	if _, err := r.Rollback(context.Background(), "echo"); err != nil {
		t.Fatal(err)
	}
	if resp := call(r, abi.KindMethod, "echo", "back"); resp.ContentType != "application/octet-stream" {
		t.Fatalf("after rollback: content type %q, want v1's", resp.ContentType)
	}
	if st := call(r, abi.KindMethod, "sleep", "1ms").Status; st != 501 {
		t.Fatalf("a name only v2 served: status %d after rollback, want 501", st)
	}
	if err := r.Remove(context.Background(), "echo"); err != nil {
		t.Fatal(err)
	}
	if st := call(r, abi.KindMethod, "echo", "x").Status; st != 501 || len(r.List()) != 0 {
		t.Fatalf("after remove: status %d, %d plugins", st, len(r.List()))
	}
	if err := r.Remove(context.Background(), "echo"); err == nil || !strings.Contains(err.Error(), "not installed") {
		t.Fatalf("second remove: %v", err)
	}
}

// TestUpgradeLetsCallsFinish: a call running on the old version when the
// new one is installed finishes there.
func TestUpgradeLetsCallsFinish(t *testing.T) {
	r := open(t, t.TempDir(), nil)
	g := goGuest(t)
	if _, err := r.Install(context.Background(), manifest("slow", "1", g, "method:sleep"), g, nil); err != nil {
		t.Fatal(err)
	}
	done := make(chan *sandbox.Response)
	go func() { done <- call(r, abi.KindMethod, "sleep", "500ms") }()
	for i := 0; r.List()[0].Stats.Running == 0; i++ {
		if i > 2000 {
			t.Fatal("the call did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := r.Install(context.Background(), manifest("slow", "2", g, "method:sleep"), g, nil); err != nil {
		t.Fatal(err)
	}
	if resp := <-done; resp.Status != 200 || string(resp.Payload) != "slept 500ms" {
		t.Fatalf("the call across the upgrade: status %d, payload %q, err %v", resp.Status, resp.Payload, resp.Err)
	}
	if l := r.List(); l[0].Version != "2" {
		t.Fatalf("serving %s", l[0].Version)
	}
}

// TestInstallRefuses: each bad plugin is refused with a specific error and
// what was serving goes on serving.
func TestInstallRefuses(t *testing.T) {
	dir := t.TempDir()
	r := open(t, dir, nil)
	wat := echoWat(t)
	if _, err := r.Install(context.Background(), manifest("echo", "1", wat, "method:echo"), wat, nil); err != nil {
		t.Fatal(err)
	}
	fi := failsInit(t)
	for _, c := range []struct {
		name           string
		manifest, wasm []byte
		want           string
	}{
		{"sha256 mismatch", manifest("echo", "2", wat, "method:echo"), append([]byte{}, fi...), "the module's sha256 is " + sum(fi)},
		{"init fails", manifest("echo", "2", fi, "method:echo"), fi, "outpost_init returned 1"},
		{"claimed by another", manifest("other", "1", wat, "method:echo"), wat, `method "echo" is already served by plugin echo`},
		{"not wasm", manifest("echo", "2", []byte("MZ\x90\x00 not wasm"), "method:echo"), []byte("MZ\x90\x00 not wasm"), "not a WebAssembly module"},
		{"bad manifest", []byte("name: Echo!\nversion: 1\nsha256: xyz\nhandlers: [{kind: rpc, name: a/b}]\ncapabilities: [net]\n"), wat,
			`name: "Echo!"`},
		{"unknown field", []byte("name: echo\nversion: 1\nsha: 00\n"), wat, "field sha not found"},
		{"concurrency", append(manifest("echo", "2", wat, "method:echo"), "concurrency: parallel\n"...), wat, `concurrency: "parallel"`},
		{"limits over the caps", append(manifest("echo", "2", wat, "method:echo"), "limits: {timeout: 48h, instances: 100}\n"...), wat, "limits.timeout: 48h0m0s: at most 24h"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := r.Install(context.Background(), c.manifest, c.wasm, nil)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
			if resp := call(r, abi.KindMethod, "echo", "still"); resp.Status != 200 || string(resp.Payload) != "still" {
				t.Fatalf("the installed version: status %d, payload %q", resp.Status, resp.Payload)
			}
		})
	}
	// The bad manifest names every field it refuses.
	_, err := r.Install(context.Background(), []byte("name: Echo!\nversion: 1\nsha256: xyz\nhandlers: [{kind: rpc, name: a/b}]\ncapabilities: [net]\n"), wat, nil)
	for _, want := range []string{"sha256:", "handlers[0].kind", "handlers[0].name", "capabilities[0]"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%v: does not name %s", err, want)
		}
	}
	if l := r.List(); len(l) != 1 || l[0].Version != "1" {
		t.Fatalf("list %+v", l)
	}
}

// TestSignatures: with trust keys, only a manifest signed by one of them
// installs; the signature covers the module through its sha256.
func TestSignatures(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	_, otherPriv, _ := ed25519.GenerateKey(nil)
	keyFile := filepath.Join(t.TempDir(), "trust.keys")
	if err := os.WriteFile(keyFile, []byte("# operators\n"+base64.StdEncoding.EncodeToString(pub)+" ops@plant\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := LoadTrustKeys(keyFile)
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys %d, %v", len(keys), err)
	}
	r := open(t, t.TempDir(), keys)
	wat := echoWat(t)
	man := manifest("echo", "1", wat, "method:echo")
	tampered := append([]byte{}, man...)
	tampered = append(tampered, []byte("capabilities: [kv]\n")...)
	for _, c := range []struct {
		name     string
		man, sig []byte
		want     string
	}{
		{"unsigned", man, nil, "unsigned, and trust keys are configured"},
		{"untrusted key", man, Sign(otherPriv, man), "does not match the manifest under any trusted key"},
		{"tampered manifest", tampered, Sign(priv, man), "does not match"},
		{"garbage", man, []byte("not base64!"), "not a base64 ed25519 signature"},
	} {
		if _, err := r.Install(context.Background(), c.man, wat, c.sig); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
	}
	info, err := r.Install(context.Background(), man, wat, Sign(priv, man))
	if err != nil || !info.Signed {
		t.Fatalf("signed: %+v, %v", info, err)
	}
	for _, bad := range []string{"", "# only a comment\n", "abc\n"} {
		if err := os.WriteFile(keyFile, []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadTrustKeys(keyFile); err == nil {
			t.Errorf("trust keys %q accepted", bad)
		}
	}
}

// TestOpenLoadsInstalled: installed plugins load again at start; one whose
// files were damaged is skipped and the others serve.
func TestOpenLoadsInstalled(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(context.Background(), Options{Dir: dir, Engine: engine(t)})
	if err != nil {
		t.Fatal(err)
	}
	wat, g := echoWat(t), goGuest(t)
	if _, err := r.Install(context.Background(), manifest("a", "1", wat, "method:a"), wat, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Install(context.Background(), manifest("b", "1", g, "command:fail"), g, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Install(context.Background(), manifest("c", "1", wat, "method:c"), wat, nil); err != nil {
		t.Fatal(err)
	}
	r.Close(context.Background())
	if err := os.WriteFile(filepath.Join(dir, "c", fileModule), []byte("\x00asm damaged"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = open(t, dir, nil)
	if st := call(r, abi.KindMethod, "a", "x").Status; st != 200 {
		t.Fatalf("a: %d", st)
	}
	if resp := call(r, abi.KindCommand, "fail", "why"); resp.Status != 422 {
		t.Fatalf("b: %d", resp.Status)
	}
	if st := call(r, abi.KindMethod, "c", "x").Status; st != 501 || len(r.List()) != 2 {
		t.Fatalf("damaged c: status %d, %d plugins loaded", st, len(r.List()))
	}
}

// TestOpenRecoversInterruptedInstall: a crash between moving the current
// version aside and renaming the new one into place leaves .{name}-old,
// which the next start restores; an unfinished new version is removed.
func TestOpenRecoversInterruptedInstall(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(context.Background(), Options{Dir: dir, Engine: engine(t)})
	if err != nil {
		t.Fatal(err)
	}
	wat := echoWat(t)
	if _, err := r.Install(context.Background(), manifest("echo", "1", wat, "method:echo"), wat, []byte("not checked")); err != nil {
		t.Fatal(err)
	}
	if l := r.List(); l[0].Signed {
		t.Fatal("a plugin shows as signed with no trust keys to check the signature")
	}
	r.Close(context.Background())
	// The state a crash in the middle of an upgrade leaves.
	if err := os.Rename(filepath.Join(dir, "echo"), oldDir(dir, "echo")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, ".echo-new-123"), 0o750); err != nil {
		t.Fatal(err)
	}
	// And the state a crash in the middle of a remove leaves: half of a
	// plugin's files, renamed away.
	if err := os.MkdirAll(delDir(dir, "gone"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(delDir(dir, "gone"), fileManifest), []byte("name: gone\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = open(t, dir, nil)
	if st := call(r, abi.KindMethod, "echo", "back").Status; st != 200 {
		t.Fatalf("after recovery: status %d", st)
	}
	if l := r.List(); len(l) != 1 {
		t.Fatalf("after recovery: %d plugins, want 1: %+v", len(l), l)
	}
	for _, leftover := range []string{".echo-old", ".echo-new-123", ".gone-del"} {
		if _, err := os.Stat(filepath.Join(dir, leftover)); !os.IsNotExist(err) {
			t.Errorf("%s is still there: %v", leftover, err)
		}
	}
	for _, bad := range []string{"../x", "a/b", ""} {
		if _, err := r.Rollback(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "is not a plugin name") {
			t.Errorf("rollback %q: %v", bad, err)
		}
		if err := r.Remove(context.Background(), bad); err == nil || !strings.Contains(err.Error(), "is not a plugin name") {
			t.Errorf("remove %q: %v", bad, err)
		}
	}
}

// TestInstallAfterCloseRefused: once closed, the registry takes no plugin
// that it would never close.
func TestInstallAfterCloseRefused(t *testing.T) {
	r, err := Open(context.Background(), Options{Dir: t.TempDir(), Engine: engine(t)})
	if err != nil {
		t.Fatal(err)
	}
	r.Close(context.Background())
	wat := echoWat(t)
	if _, err := r.Install(context.Background(), manifest("echo", "1", wat, "method:echo"), wat, nil); err == nil || !strings.Contains(err.Error(), "registry is closed") {
		t.Fatalf("install after Close: %v", err)
	}
}

// TestCloseEndsCallsWhenItsContextEnds: Close with a context that ends
// ends a call stuck in a guest (504) instead of waiting for its deadline.
func TestCloseEndsCallsWhenItsContextEnds(t *testing.T) {
	r, err := Open(context.Background(), Options{Dir: t.TempDir(), Engine: engine(t)})
	if err != nil {
		t.Fatal(err)
	}
	loop := wasmtest.Wat(t, "sandbox/testdata/wat/loop.wat")
	man := string(manifest("loop", "1", loop, "method:loop")) + "limits:\n  timeout: 1h\n"
	if _, err := r.Install(context.Background(), []byte(man), loop, nil); err != nil {
		t.Fatal(err)
	}
	looping := make(chan *sandbox.Response, 1)
	go func() { looping <- call(r, abi.KindMethod, "loop", "") }()
	for deadline := time.Now().Add(30 * time.Second); r.List()[0].Stats.Running != 1; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the call never reached the guest")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	closed := make(chan struct{})
	go func() { r.Close(ctx); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	if resp := <-looping; resp.Status != abi.StatusTimeout {
		t.Fatalf("the call in progress: status %d", resp.Status)
	}
}
