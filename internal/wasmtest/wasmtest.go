// Package wasmtest builds the wasm modules tests run: Go guests from source
// and .wat fixtures with Debian's wabt.
package wasmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var (
	mu    sync.Mutex
	built = map[string][]byte{}
)

// BuildGo builds the Go guest in dir (a main package, a path relative to
// the test's directory) as a WASI reactor and returns the module. Builds
// are cached for the test binary's life.
func BuildGo(t testing.TB, dir string) []byte {
	t.Helper()
	return build(t, dir, func(abs, out string) *exec.Cmd {
		cmd := exec.Command("go", "build", "-buildmode=c-shared", "-trimpath", "-o", out, ".")
		cmd.Dir = abs
		cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm")
		return cmd
	})
}

// build runs the command cmd makes to build dir's module into out, once
// per test binary, and returns the module.
func build(t testing.TB, dir string, cmd func(abs, out string) *exec.Cmd) []byte {
	t.Helper()
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if b, ok := built[abs]; ok {
		return b
	}
	out := filepath.Join(t.TempDir(), "module.wasm")
	if msg, err := cmd(abs, out).CombinedOutput(); err != nil {
		t.Fatalf("building the module in %s: %v\n%s", dir, err, msg)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	built[abs] = b
	return b
}

// Wat returns the committed .wasm beside the .wat file path. With wabt
// installed it first checks that the .wasm is what wat2wasm makes of the
// .wat; without it the test fails when CI=true and skips otherwise.
func Wat(t testing.TB, path string) []byte {
	t.Helper()
	RequireWabt(t)
	wasmPath := strings.TrimSuffix(path, ".wat") + ".wasm"
	committed, err := os.ReadFile(wasmPath)
	if err != nil {
		t.Fatalf("%v (run: wat2wasm %s -o %s)", err, path, wasmPath)
	}
	out := filepath.Join(t.TempDir(), "fixture.wasm")
	if msg, err := exec.Command("wat2wasm", path, "-o", out).CombinedOutput(); err != nil {
		t.Fatalf("wat2wasm %s: %v\n%s", path, err, msg)
	}
	fresh, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fresh, committed) {
		t.Fatalf("%s is stale: run wat2wasm %s -o %s", wasmPath, path, wasmPath)
	}
	return committed
}

// RequireWabt fails the test when wat2wasm is missing and CI=true, and skips
// it otherwise.
func RequireWabt(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("wat2wasm"); err != nil {
		msg := fmt.Sprintf("wat2wasm is missing: install with: apt-get install -y wabt (or run make test)")
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// BuildAS builds the AssemblyScript module whose asconfig.json and
// assembly/index.ts are in dir (relative to the test's directory) with the
// compiler pinned in abi/guest-as (npm ci --prefix abi/guest-as, which make
// test runs), and returns it. Without node or the compiler the test fails
// when CI=true and skips otherwise.
func BuildAS(t testing.TB, dir string) []byte {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	asc := filepath.Join(root, "abi", "guest-as", "node_modules", ".bin", "asc")
	_, nodeErr := exec.LookPath("node")
	if _, err := os.Stat(asc); err != nil || nodeErr != nil {
		msg := "the AssemblyScript compiler is missing: run make test, or npm ci --prefix abi/guest-as (needs node and npm)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return build(t, dir, func(abs, out string) *exec.Cmd {
		cmd := exec.Command(asc, "assembly/index.ts", "--config", "asconfig.json", "--outFile", out)
		cmd.Dir = abs
		return cmd
	})
}

// moduleRoot is the directory of the main module's go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out))), nil
}
