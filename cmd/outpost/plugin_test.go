package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// examplePlugin writes the Go example handler, built, with its manifest,
// into a plugin directory.
func examplePlugin(t *testing.T) string { return pluginDir(t, "../../examples/handler-go") }

// pluginDir builds the Go handler in src and writes it, with the manifest
// of src/manifest.yaml.in, into a plugin directory.
func pluginDir(t *testing.T, src string) string {
	t.Helper()
	wasm := wasmtest.BuildGo(t, src)
	tmpl, err := os.ReadFile(filepath.Join(src, "manifest.yaml.in"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(wasm)
	dir := t.TempDir()
	man := strings.ReplaceAll(string(tmpl), "@SHA256@", hex.EncodeToString(sum[:]))
	if err := os.WriteFile(filepath.Join(dir, "manifest.yaml"), []byte(man), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "module.wasm"), wasm, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// cli runs the outpost binary and returns its exit code, stdout and stderr.
func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, out.String(), errb.String()
}

// TestPluginCLI: install, list, invoke and remove a handler in a running
// agent with the CLI; an installed plugin is served again after kill -9
// and a restart.
func TestPluginCLI(t *testing.T) {
	dir := examplePlugin(t)
	p := startAgent(t, "")
	var sock string
	for i, a := range p.args {
		if a == "--data" {
			sock = filepath.Join(p.args[i+1], "outpost.sock")
		}
	}
	expect := func(wantCode int, wantOut, wantErr string, args ...string) {
		t.Helper()
		code, out, errs := cli(t, append(args, "--socket", sock)...)
		if code != wantCode || !strings.Contains(out, wantOut) || !strings.Contains(errs, wantErr) {
			t.Fatalf("outpost %s: exit %d, stdout %q, stderr %q; want exit %d, %q, %q", strings.Join(args, " "), code, out, errs, wantCode, wantOut, wantErr)
		}
	}
	// The agent loads its plugins, then opens the socket.
	waitAdmin := func() {
		waitFor(t, 30*time.Second, func() error {
			if code, _, errs := cli(t, "plugin", "list", "--socket", sock); code != 0 {
				return errors.New(errs)
			}
			return nil
		})
	}
	waitAdmin()
	expect(0, "installed example-go 0.1.0 (3 handlers, signed: false)", "", "plugin", "install", dir)
	expect(0, "example-go  0.1.0", "", "plugin", "list")
	expect(0, `"setpoint_limits":{"min":5,"max":80}`, "status 200", "invoke", "getDiagnostics")
	expect(1, "95 is outside 5..80", "status 422", "invoke", "setpoint", "--kind", "command", "--payload", `{"value": 95}`)
	expect(0, `"sha256": "`, "", "plugin", "inspect", "example-go")
	// A module file is inspected offline: what its manifest must ask for,
	// and why the agent would refuse it.
	expect(0, `"manifest_capabilities": []`, "", "plugin", "inspect", filepath.Join(dir, "module.wasm"))
	expect(1, `"exports": [`, "would be refused: does not export outpost_handle", "plugin", "inspect", "../../plugins/sandbox/testdata/wat/nohandle.wasm")
	notWasm := filepath.Join(t.TempDir(), "manifest.wasm")
	if err := os.WriteFile(notWasm, []byte("name: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	expect(1, "", "not a WebAssembly module", "plugin", "inspect", notWasm)

	// A manifest that does not match the module is refused before it is sent.
	bad := t.TempDir()
	man, _ := os.ReadFile(filepath.Join(dir, "manifest.yaml"))
	wasm, _ := os.ReadFile(filepath.Join(dir, "module.wasm"))
	_ = os.WriteFile(filepath.Join(bad, "manifest.yaml"), man, 0o600)
	_ = os.WriteFile(filepath.Join(bad, "module.wasm"), append(wasm, 0), 0o600)
	expect(1, "", "the module's sha256 is", "plugin", "install", bad)

	// Installed plugins survive kill -9.
	p.kill()
	p.start()
	waitAdmin()
	expect(0, "ping", "status 200", "invoke", "echo", "--payload", "ping")

	expect(0, "removed example-go", "", "plugin", "remove", "example-go")
	expect(1, "", "status 501", "invoke", "getDiagnostics")
	expect(1, "", "plugin example-go is not installed", "plugin", "inspect", "example-go")
	code, _, errs := cli(t, "plugin", "list", "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if code != 1 || !strings.Contains(errs, "cannot reach the agent") {
		t.Fatalf("no agent: exit %d, %q", code, errs)
	}
}
