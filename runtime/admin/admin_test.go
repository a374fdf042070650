package admin

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

// TestListenSocketMode: the socket is made for its owner only (0600), and a
// path that holds something other than a socket is left alone.
func TestListenSocketMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "outpost.sock")
	s, err := Listen(path, nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, mode %v", err, fi.Mode())
	}
	if _, err := Listen(path, nil, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "another agent is listening there") {
		t.Fatalf("a second agent on the socket: %v", err)
	}
	_ = s.Close(context.Background())

	file := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, nil, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("a regular file at the path: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Fatalf("the file at the path was changed: %q, %v", b, err)
	}
}

// TestStatuses: the API answers a bad name 400, a plugin that is not
// installed or has no previous version 404.
func TestStatuses(t *testing.T) {
	e, err := sandbox.NewEngine("")
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close(context.Background())
	reg, err := plugins.Open(context.Background(), plugins.Options{Dir: t.TempDir(), Engine: e})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close(context.Background())
	path := filepath.Join(t.TempDir(), "admin.sock")
	s, err := Listen(path, reg, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"DELETE", "/v1/plugins/Bad", 400},
		{"DELETE", "/v1/plugins/absent", 404},
		{"POST", "/v1/plugins/absent/rollback", 404},
		{"POST", "/v1/plugins/Bad/rollback", 400},
		{"GET", "/v1/plugins/absent", 404},
	} {
		req, _ := http.NewRequest(tc.method, "http://outpost"+tc.path, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, resp.StatusCode, tc.want)
		}
	}
}

// TestListenHTTPReadOnly: the TCP listener serves the observability routes
// and nothing that changes the agent: installs, removals, rollbacks and
// invocations are not routes there.
func TestListenHTTPReadOnly(t *testing.T) {
	observe := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("seen " + r.URL.Path)) })
	s, err := ListenHTTP("127.0.0.1:0", observe, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	base := "http://" + s.Addr()
	for _, p := range ObservePaths {
		resp, err := http.Get(base + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("GET %s: %d, want 200", p, resp.StatusCode)
		}
	}
	for _, c := range []struct{ method, path string }{
		{"PUT", "/v1/plugins/x"}, {"DELETE", "/v1/plugins/x"}, {"POST", "/v1/plugins/x/rollback"},
		{"POST", "/v1/invoke"}, {"GET", "/v1/plugins"}, {"POST", "/metrics"},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, strings.NewReader("{}"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 && resp.StatusCode != 405 {
			t.Errorf("%s %s on the TCP listener: %d, want 404 or 405", c.method, c.path, resp.StatusCode)
		}
	}
}
