package plugins

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/storage"
)

// blobs is the store's blobs with the sandbox's errors, as the agent
// gives them.
type blobs struct{ b *storage.Blobs }

func (s blobs) err(err error) error {
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("%w: %w", sandbox.ErrNotFound, err)
	case errors.Is(err, storage.ErrBadBlob):
		return fmt.Errorf("%w: %w", sandbox.ErrBadArg, err)
	}
	return err
}
func (s blobs) Size(n string) (int64, error) { v, err := s.b.Size(n); return v, s.err(err) }
func (s blobs) ReadAt(n string, p []byte, o int64) (int, error) {
	v, err := s.b.ReadAt(n, p, o)
	return v, s.err(err)
}
func (s blobs) Remove(n string) error  { return s.err(s.b.Remove(n)) }
func (s blobs) List(p string) []string { return s.b.List(p) }
func (s blobs) Create(n string) (BlobWriter, error) {
	w, err := s.b.Create(n)
	if err != nil {
		return nil, s.err(err)
	}
	return w, nil
}

func TestHostList(t *testing.T) {
	for _, c := range []struct {
		list HostList
		url  string
		ok   bool
	}{
		{HostList{"fw.example.com"}, "https://fw.example.com/a", true},
		{HostList{"fw.example.com"}, "https://FW.Example.com:8443/a", true}, // no port: any
		{HostList{"fw.example.com:443"}, "https://fw.example.com/a", true},  // the default port
		{HostList{"fw.example.com:443"}, "http://fw.example.com/a", false},
		{HostList{"fw.example.com:8443"}, "https://fw.example.com:8443/a", true},
		{HostList{"*.example.com"}, "https://fw.example.com/a", true},
		{HostList{"*.example.com"}, "https://evilexample.com/a", false},
		{HostList{"*.example.com"}, "https://example.com/a", false},
		{HostList{"fw.example.com"}, "https://fw.example.com.evil.net/a", false},
		{HostList{"fw.example.com"}, "https://fw.example.com@evil.net/a", false},
		{HostList{"[::1]:8080"}, "http://[::1]:8080/a", true},
		{HostList{"::1"}, "http://[::1]:9/a", true},
		{HostList{"*"}, "http://10.0.0.1/a", true},
		{HostList{}, "http://x/a", false},
	} {
		u, _ := url.Parse(c.url)
		if got := c.list.Allows(u); got != c.ok {
			t.Errorf("%v allows %s: %v, want %v", c.list, c.url, got, c.ok)
		}
	}
}

// TestDownload: the body lands in the plugin's own blob, only when whole
// and within the size, from allowed hosts only (redirects too); each
// failure keeps the blob that was there and maps to its sandbox error.
func TestDownload(t *testing.T) {
	st, err := storage.OpenBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	store := blobs{st}
	body := strings.Repeat("f", 100_000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/fw.bin":
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			_, _ = w.Write([]byte(body))
		case "/chunked": // no Content-Length
			w.(http.Flusher).Flush()
			_, _ = w.Write([]byte(body))
		case "/short":
			w.Header().Set("Content-Length", "1000")
			_, _ = w.Write([]byte("only this"))
		case "/redirect-away":
			http.Redirect(w, r, "http://other.invalid/fw.bin", http.StatusFound)
		case "/redirect-home":
			http.Redirect(w, r, "/fw.bin", http.StatusFound)
		case "/boom":
			http.Error(w, "down", http.StatusBadGateway)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	d := &Downloader{}
	own := PluginBlobs(store, "fw")
	var mu sync.Mutex
	var reports []int
	progress := func(p int, _ string) { mu.Lock(); reports = append(reports, p); mu.Unlock() }
	get := func(path string, max int64) error {
		_, err := d.Get(context.Background(), srv.URL+path, own, "img", HostList{host}, max, progress)
		return err
	}
	if err := get("/fw.bin", 1<<20); err != nil {
		t.Fatal(err)
	}
	if n, _ := own.Size("img"); n != int64(len(body)) {
		t.Fatalf("blob of %d bytes", n)
	}
	if n, _ := store.Size("fw.img"); n != int64(len(body)) {
		t.Fatalf("the plugin's blob is not stored under its name: %d", n)
	}
	if len(reports) == 0 || reports[len(reports)-1] >= 100 {
		t.Errorf("progress reports %v", reports)
	}
	for _, c := range []struct {
		path string
		max  int64
		want error
	}{
		{"/missing", 1 << 20, sandbox.ErrNotFound},
		{"/boom", 1 << 20, sandbox.ErrUnavailable},
		{"/short", 1 << 20, sandbox.ErrUnavailable},
		{"/fw.bin", 1000, sandbox.ErrLimit},
		{"/chunked", 1000, sandbox.ErrLimit},
		{"/redirect-away", 1 << 20, sandbox.ErrDenied},
	} {
		if err := get(c.path, c.max); !errors.Is(err, c.want) {
			t.Errorf("%s (max %d): %v, want %v", c.path, c.max, err, c.want)
		}
		if n, _ := own.Size("img"); n != int64(len(body)) {
			t.Fatalf("%s: the failed download replaced the blob (%d bytes)", c.path, n)
		}
	}
	if err := get("/redirect-home", 1<<20); err != nil {
		t.Errorf("a redirect to the same host: %v", err)
	}
	if _, err := d.Get(context.Background(), "http://elsewhere.invalid/x", own, "img", HostList{host}, 1<<20, nil); !errors.Is(err, sandbox.ErrDenied) {
		t.Errorf("a host not listed: %v", err)
	}
	if _, err := d.Get(context.Background(), "ftp://"+host+"/x", own, "img", HostList{"*"}, 1<<20, nil); !errors.Is(err, sandbox.ErrBadArg) {
		t.Errorf("not http: %v", err)
	}
	if _, err := d.Get(context.Background(), srv.URL+"/missing", own, "../x", HostList{host}, 1<<20, nil); !errors.Is(err, sandbox.ErrBadArg) {
		t.Errorf("a bad blob name, checked before the request: %v", err)
	}
	// Another plugin sees none of fw's blobs, and a plugin keeps at most
	// MaxBlobsPerPlugin.
	if _, err := PluginBlobs(store, "other").Size("img"); !errors.Is(err, sandbox.ErrNotFound) {
		t.Errorf("another plugin sees fw's blob: %v", err)
	}
	for i := range MaxBlobsPerPlugin - 1 {
		if _, err := d.Get(context.Background(), srv.URL+"/fw.bin", own, fmt.Sprint("b", i), HostList{host}, 1<<20, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.Get(context.Background(), srv.URL+"/fw.bin", own, "one-more", HostList{host}, 1<<20, nil); !errors.Is(err, sandbox.ErrLimit) {
		t.Errorf("a blob past the plugin's %d: %v", MaxBlobsPerPlugin, err)
	}
	if err := get("/fw.bin", 1<<20); err != nil { // replacing one of its own is fine
		t.Errorf("replacing a blob at the cap: %v", err)
	}
}
