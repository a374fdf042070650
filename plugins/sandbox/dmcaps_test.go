package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// memBlobs is a BlobStore in memory.
type memBlobs map[string][]byte

func (m memBlobs) Size(n string) (int64, error) {
	b, ok := m[n]
	if !ok {
		return 0, ErrNotFound
	}
	return int64(len(b)), nil
}
func (m memBlobs) ReadAt(n string, p []byte, off int64) (int, error) {
	b, ok := m[n]
	if !ok {
		return 0, ErrNotFound
	}
	if off >= int64(len(b)) {
		return 0, nil
	}
	return copy(p, b[off:]), nil
}
func (m memBlobs) Remove(n string) error { delete(m, n); return nil }

type memTwin struct {
	mu      sync.Mutex
	reports []string
}

func (t *memTwin) Get() ([]byte, error) { return []byte(`{"desired":{"$version":1}}`), nil }
func (t *memTwin) Report(p []byte) error {
	if !strings.HasPrefix(string(p), "{") {
		return fmt.Errorf("%w: not an object", ErrBadArg)
	}
	t.mu.Lock()
	t.reports = append(t.reports, string(p))
	t.mu.Unlock()
	return nil
}

// TestDMCapabilities: the blob, http, dm and twin host functions, with
// their error codes, their bounds and their rate limit.
func TestDMCapabilities(t *testing.T) {
	wasm := wasmtest.BuildGo(t, "testdata/dmguest")
	blobs := memBlobs{"img": []byte("0123456789")}
	var gets []string
	var progress []string
	var mu sync.Mutex
	tw := &memTwin{}
	p := load(t, engine(t), wasm, Config{Blobs: blobs, Twin: tw,
		HTTPGet: func(_ context.Context, url, blob string, prog func(int, string)) (int64, error) {
			mu.Lock()
			gets = append(gets, url+" "+blob)
			mu.Unlock()
			if prog != nil {
				prog(50, "halfway")
			}
			if strings.Contains(url, "denied") {
				return 0, fmt.Errorf("%w: host", ErrDenied)
			}
			return 42, nil
		},
		Progress: func(req abi.Meta, pct int, msg string) {
			mu.Lock()
			progress = append(progress, fmt.Sprintf("%s %d %s", req.Name, pct, msg))
			mu.Unlock()
		}})
	call := func(name, payload string) (abi.Status, string) {
		r := p.Call(context.Background(), method(name, payload))
		return r.Status, string(r.Payload)
	}
	for _, c := range []struct {
		name, payload string
		status        abi.Status
		body          string
	}{
		{"blob.read", "img 2 4", 200, "2345"},
		{"blob.read", "img 8 100", 200, "89"},
		{"blob.read", "img 10 4", 200, ""},
		{"blob.read", "img -1 4", 403, ""},
		{"blob.read", "nope 0 4", 402, ""},
		{"blob.size", "img", 200, "10"},
		{"blob.size", strings.Repeat("x", 129), 403, ""},
		{"http.get", "http://fw/x img2", 200, "42"},
		{"http.get", "http://denied/x img2", 404, ""},
		{"http.get", "http://" + strings.Repeat("a", 9000) + " img2", 403, ""},
		{"progress", "101 too far", 403, ""},
		{"progress", "50 " + strings.Repeat("m", 257), 403, ""},
		{"twin.get", "", 200, `{"desired":{"$version":1}}`},
		{"twin.report", `{"a":1}`, 202, ""},
		{"twin.report", `[1]`, 403, ""},
		{"blob.delete", "img", 204, ""},
		{"blob.size", "img", 402, ""},
	} {
		st, body := call(c.name, c.payload)
		if st != c.status || (c.body != "" && body != c.body) || (c.status == 200 && c.body == "" && body != "") {
			t.Errorf("%s %.40q: %d %q, want %d %q", c.name, c.payload, st, body, c.status, c.body)
		}
	}
	if len(gets) != 2 || len(tw.reports) != 1 {
		t.Fatalf("host saw gets %q, reports %q", gets, tw.reports)
	}
	mu.Lock()
	if len(progress) != 2 || progress[0] != "http.get 50 halfway" {
		t.Errorf("progress %q: the download's progress is the request's", progress)
	}
	mu.Unlock()
	// Progress reports and twin patches share a rate: past 10 a second
	// they are refused, not queued.
	limited := 0
	for range 30 {
		if st, _ := call("progress", "10 x"); st == 401 {
			limited++
		}
	}
	if limited == 0 {
		t.Error("30 progress reports in a burst: none refused with E_LIMIT")
	}
}

// TestDMCapabilitiesGranted: a module that imports a capability its
// configuration does not grant is refused at load, naming the module.
func TestDMCapabilitiesGranted(t *testing.T) {
	wasm := wasmtest.BuildGo(t, "testdata/dmguest")
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Twin: &memTwin{}, HTTPGet: func(context.Context, string, string, func(int, string)) (int64, error) { return 0, nil },
			Progress: func(abi.Meta, int, string) {}}, abi.ModuleBlob},
		{Config{Blobs: memBlobs{}, Twin: &memTwin{}, Progress: func(abi.Meta, int, string) {}}, abi.ModuleHTTP},
		{Config{Blobs: memBlobs{}, HTTPGet: func(context.Context, string, string, func(int, string)) (int64, error) { return 0, nil },
			Progress: func(abi.Meta, int, string) {}}, abi.ModuleTwin},
	} {
		c.cfg.Name = "dmguest"
		_, err := engine(t).Load(context.Background(), wasm, c.cfg)
		var le *LoadError
		if !errors.As(err, &le) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "not granted") {
			t.Errorf("without %s: %v", c.want, err)
		}
	}
}
