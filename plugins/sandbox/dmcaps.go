package sandbox

import (
	"context"
	"errors"
	"net/url"

	"github.com/tetratelabs/wazero/api"

	"github.com/outpost-edge/outpost/abi"
)

// BlobStore is the staged blobs (firmware images) a plugin granted "blob"
// reads and deletes. Errors are the capability errors (ErrNotFound,
// ErrBadArg for a bad name) or E_INTERNAL.
type BlobStore interface {
	Size(name string) (int64, error)
	ReadAt(name string, p []byte, off int64) (int, error)
	Remove(name string) error
}

// HTTPGet downloads url into the blob name for a plugin granted "http"
// and returns its size. It checks the URL's host and bounds the size;
// errors are ErrDenied (host), ErrBadArg (URL, name), ErrNotFound (4xx),
// ErrLimit (size) and ErrUnavailable (network, 5xx). ctx is the call's;
// progress, when not nil, reports the download's progress as the request's
// (the plugin is granted "dm").
type HTTPGet func(ctx context.Context, url, blob string, progress func(percent int, msg string)) (int64, error)

// ErrUnavailable is E_UNAVAILABLE: not available now (a server down).
var ErrUnavailable = errors.New("unavailable")

// Progress receives the progress a plugin granted "dm" reports for the
// request it serves.
type Progress func(req abi.Meta, percent int, msg string)

// maxBlobRead bounds one blob_read, so that a guest cannot make the host
// allocate what it likes.
const maxBlobRead = 1 << 20

func (p *Plugin) blobFuncs() []hostFn {
	blobs := p.cfg.Blobs
	name := func(c *call, m api.Module, fn string, ptr, n uint32) (string, bool) {
		if n == 0 || n > 128 {
			return "", false
		}
		return string(read(c, m, fn, ptr, n)), true
	}
	return []hostFn{
		{name: abi.FuncBlobSize, params: 2, results: 1, wideResult: true, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			n, ok := name(c, m, abi.FuncBlobSize, i32(s[0]), i32(s[1]))
			if !ok {
				s[0] = api.EncodeI64(int64(abi.ErrBadArg))
				return
			}
			size, err := blobs.Size(n)
			if err != nil {
				p.logCapErr(abi.FuncBlobSize, err)
				s[0] = api.EncodeI64(int64(errno(err)))
				return
			}
			s[0] = api.EncodeI64(size)
		}},
		{name: abi.FuncBlobRead, params: 5, results: 1, wide: []int{4}, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			n, ok := name(c, m, abi.FuncBlobRead, i32(s[0]), i32(s[1]))
			off := int64(s[4])
			if !ok || off < 0 {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			buf, asked := i32(s[2]), i32(s[3])
			if _, ok := m.Memory().Read(buf, asked); !ok { // the whole range the guest gave must be its
				c.violate("%s: [%d, %d+%d) is outside the guest's %d-byte memory", abi.FuncBlobRead, buf, buf, asked, m.Memory().Size())
			}
			limit := min(asked, maxBlobRead)
			tmp := make([]byte, limit)
			got, err := blobs.ReadAt(n, tmp, off)
			if err != nil {
				p.logCapErr(abi.FuncBlobRead, err)
				ret(s, errno(err))
				return
			}
			ret(s, int32(copyOut(c, m, abi.FuncBlobRead, buf, limit, tmp[:got])))
		}},
		{name: abi.FuncBlobDelete, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			n, ok := name(c, m, abi.FuncBlobDelete, i32(s[0]), i32(s[1]))
			if !ok {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			err := blobs.Remove(n)
			p.logCapErr(abi.FuncBlobDelete, err)
			ret(s, errno(err))
		}},
	}
}

// RedactURL drops a URL's user information, query and fragment (where
// tokens are) for logs.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		if len(raw) > 64 {
			raw = raw[:64] + "..."
		}
		return raw
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

func (p *Plugin) httpFuncs() []hostFn {
	return []hostFn{
		{name: abi.FuncHTTPGet, params: 4, results: 1, wideResult: true, fn: func(ctx context.Context, c *call, m api.Module, s []uint64) {
			if i32(s[1]) > 8192 || i32(s[3]) == 0 || i32(s[3]) > 128 {
				s[0] = api.EncodeI64(int64(abi.ErrBadArg))
				return
			}
			url := string(read(c, m, abi.FuncHTTPGet, i32(s[0]), i32(s[1])))
			blob := string(read(c, m, abi.FuncHTTPGet, i32(s[2]), i32(s[3])))
			var progress func(int, string)
			if p.cfg.Progress != nil {
				if meta, err := abi.DecodeMeta(c.meta); err == nil {
					progress = func(pct int, msg string) { p.cfg.Progress(meta, pct, msg) }
				}
			}
			size, err := p.cfg.HTTPGet(ctx, url, blob, progress)
			if err != nil {
				if p.logs.allow() { // a guest failing in a loop does not flood the log
					p.log.Warn("http_get failed", "url", RedactURL(url), "blob", blob, "error", err)
				}
				s[0] = api.EncodeI64(int64(errno(err)))
				return
			}
			p.log.Info("http_get downloaded", "url", RedactURL(url), "blob", blob, "bytes", size)
			s[0] = api.EncodeI64(size)
		}},
	}
}

func (p *Plugin) dmFuncs() []hostFn {
	return []hostFn{
		{name: abi.FuncProgress, params: 3, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			pct := int32(i32(s[0]))
			if pct < 0 || pct > 100 || i32(s[2]) > 256 {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			msg := string(read(c, m, abi.FuncProgress, i32(s[1]), i32(s[2])))
			if !p.reports.allow() {
				ret(s, int32(abi.ErrLimit))
				return
			}
			meta, err := abi.DecodeMeta(c.meta)
			if err != nil {
				ret(s, int32(abi.ErrInternal))
				return
			}
			p.cfg.Progress(meta, int(pct), msg)
			ret(s, 0)
		}},
	}
}

// TwinAccess is the device state a plugin granted "twin" reads and
// reports to. Errors: ErrBadArg (not a JSON object), ErrLimit (too large,
// too many waiting), ErrUnavailable (no such state).
type TwinAccess interface {
	Get() ([]byte, error)
	Report(patch []byte) error
}

func (p *Plugin) twinFuncs() []hostFn {
	tw := p.cfg.Twin
	return []hostFn{
		{name: abi.FuncTwinGet, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			doc, err := tw.Get()
			if err != nil {
				p.logCapErr(abi.FuncTwinGet, err)
				ret(s, errno(err))
				return
			}
			if buf, limit := i32(s[0]), i32(s[1]); int(limit) >= len(doc) {
				copyOut(c, m, abi.FuncTwinGet, buf, limit, doc)
			}
			ret(s, int32(len(doc)))
		}},
		{name: abi.FuncTwinReport, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			if i32(s[1]) > 32<<10 {
				ret(s, int32(abi.ErrLimit))
				return
			}
			patch := append([]byte(nil), read(c, m, abi.FuncTwinReport, i32(s[0]), i32(s[1]))...)
			if !p.reports.allow() {
				ret(s, int32(abi.ErrLimit))
				return
			}
			err := tw.Report(patch)
			p.logCapErr(abi.FuncTwinReport, err)
			ret(s, errno(err))
		}},
	}
}
