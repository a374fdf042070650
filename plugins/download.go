package plugins

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/plugins/sandbox"
)

// BlobStore is where staged blobs live, for the blob and http
// capabilities. Its errors are the sandbox's (sandbox.ErrNotFound,
// sandbox.ErrBadArg).
type BlobStore interface {
	sandbox.BlobStore
	Create(name string) (BlobWriter, error)
}

// BlobWriter writes one blob: Commit makes it visible, Abort drops it.
type BlobWriter interface {
	io.Writer
	Commit() error
	Abort()
}

// DefaultHTTPBytes bounds a download when the manifest sets no
// limits.http_bytes.
const DefaultHTTPBytes = 64 << 20

// MaxBlobsPerPlugin bounds the blobs one plugin keeps: each is at most its
// download limit, so the two bound its disk use.
const MaxBlobsPerPlugin = 4

// BlobName is the stored name of a plugin's blob: the plugin's name, a dot,
// and the blob's.
func BlobName(plugin, blob string) string { return plugin + "." + blob }

// PluginBlobs is the view of the blob store one plugin has: its own blobs,
// by their short names.
func PluginBlobs(b BlobStore, plugin string) BlobStore { return pluginBlobs{b: b, plugin: plugin} }

type pluginBlobs struct {
	b      BlobStore
	plugin string
}

func (p pluginBlobs) name(n string) (string, error) {
	if n == "" || len(n) > 128 {
		return "", fmt.Errorf("%w: blob name %q", sandbox.ErrBadArg, n)
	}
	return BlobName(p.plugin, n), nil
}

func (p pluginBlobs) Size(n string) (int64, error) {
	full, err := p.name(n)
	if err != nil {
		return 0, err
	}
	return p.b.Size(full)
}

func (p pluginBlobs) ReadAt(n string, buf []byte, off int64) (int, error) {
	full, err := p.name(n)
	if err != nil {
		return 0, err
	}
	return p.b.ReadAt(full, buf, off)
}

func (p pluginBlobs) Remove(n string) error {
	full, err := p.name(n)
	if err != nil {
		return err
	}
	return p.b.Remove(full)
}

func (p pluginBlobs) Create(n string) (BlobWriter, error) {
	full, err := p.name(n)
	if err != nil {
		return nil, err
	}
	if l, ok := p.b.(interface{ List(prefix string) []string }); ok {
		have := l.List(p.plugin + ".")
		exists := false
		for _, h := range have {
			exists = exists || h == full
		}
		if !exists && len(have) >= MaxBlobsPerPlugin {
			return nil, fmt.Errorf("%w: the plugin keeps %d blobs already (at most %d): delete one first", sandbox.ErrLimit, len(have), MaxBlobsPerPlugin)
		}
	}
	return p.b.Create(full)
}

// HostList is a manifest's http_hosts: host names or addresses, with an
// optional ":port" (without one, any port), "*.domain" for a domain's
// subdomains, or "*" for any host (loopback and private addresses
// included: narrow it on a gateway). Names are matched as written, not as
// resolved.
type HostList []string

// Allows reports whether the URL's host (and port) is in the list.
func (l HostList) Allows(u *url.URL) bool {
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	for _, e := range l {
		e = strings.ToLower(e)
		if e == "*" {
			return true
		}
		eh, ep, err := net.SplitHostPort(e)
		if err != nil {
			eh, ep = e, ""
		}
		eh = strings.Trim(eh, "[]")
		if ep != "" && ep != port {
			continue
		}
		if d, ok := strings.CutPrefix(eh, "*."); ok {
			if strings.HasSuffix(host, "."+d) {
				return true
			}
			continue
		}
		if eh == host {
			return true
		}
	}
	return false
}

// Downloader fetches URLs into blobs for the http capability: streaming,
// only from allowed hosts (redirects too), within a size, reporting its
// progress.
type Downloader struct {
	Blobs BlobStore
	// Client is the HTTP client; nil = one with a 30s connect and header
	// timeout and idle connections closed after 30s (the call's deadline
	// bounds the whole download).
	Client *http.Client

	once   sync.Once
	client *http.Client
}

func (d *Downloader) httpClient() *http.Client {
	d.once.Do(func() {
		d.client = d.Client
		if d.client == nil {
			d.client = &http.Client{Transport: &http.Transport{
				Proxy:                 http.ProxyFromEnvironment,
				DialContext:           (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
				TLSHandshakeTimeout:   30 * time.Second,
				ResponseHeaderTimeout: 30 * time.Second,
				IdleConnTimeout:       30 * time.Second,
				MaxIdleConnsPerHost:   2,
			}}
		}
	})
	return d.client
}

// Get downloads rawURL into the blob of store, replacing it only once the
// whole body has arrived within max bytes. progress, when set, gets the
// percent done (when the size is known) every tenth of the way.
func (d *Downloader) Get(ctx context.Context, rawURL string, store BlobStore, blob string, hosts HostList, max int64, progress func(int, string)) (int64, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return 0, fmt.Errorf("%w: %q is not an http(s) URL", sandbox.ErrBadArg, sandbox.RedactURL(rawURL))
	}
	if !hosts.Allows(u) {
		return 0, fmt.Errorf("%w: host %q is not in the plugin's http_hosts", sandbox.ErrDenied, u.Host)
	}
	w, err := store.Create(blob) // checks the name before anything is fetched
	if err != nil {
		return 0, err
	}
	n, err := d.fetch(ctx, u, w, hosts, max, progress)
	if err != nil {
		w.Abort()
		return n, err
	}
	if err := w.Commit(); err != nil {
		return n, err
	}
	return n, nil
}

// fetch streams u's body into w.
func (d *Downloader) fetch(ctx context.Context, u *url.URL, w BlobWriter, hosts HostList, max int64, progress func(int, string)) (int64, error) {
	c := *d.httpClient()
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 5 {
			return errors.New("more than 5 redirects")
		}
		if !hosts.Allows(req.URL) {
			return fmt.Errorf("%w: a redirect to host %q, which is not in the plugin's http_hosts", sandbox.ErrDenied, req.URL.Host)
		}
		if via[0].URL.Scheme == "https" && req.URL.Scheme != "https" {
			return fmt.Errorf("%w: a redirect from https to %s", sandbox.ErrDenied, req.URL.Scheme)
		}
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", sandbox.ErrBadArg, err)
	}
	resp, err := c.Do(req)
	if err != nil {
		if errors.Is(err, sandbox.ErrDenied) {
			return 0, err
		}
		return 0, fmt.Errorf("%w: %v", sandbox.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode >= 400 && resp.StatusCode < 500:
		return 0, fmt.Errorf("%w: the server answered %s", sandbox.ErrNotFound, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return 0, fmt.Errorf("%w: the server answered %s", sandbox.ErrUnavailable, resp.Status)
	case resp.ContentLength > max:
		return 0, fmt.Errorf("%w: %d bytes, over the plugin's %d", sandbox.ErrLimit, resp.ContentLength, max)
	}
	n, err := copyBody(ctx, w, resp, max, progress)
	if err != nil {
		return n, err
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("%w: the body ended after %d of %d bytes", sandbox.ErrUnavailable, n, resp.ContentLength)
	}
	return n, nil
}

// copyBody streams the body into w within max bytes, reporting progress.
func copyBody(ctx context.Context, w BlobWriter, resp *http.Response, max int64, progress func(int, string)) (int64, error) {
	buf := make([]byte, 64<<10)
	var n int64
	next := 10
	for {
		k, rerr := resp.Body.Read(buf)
		if k > 0 {
			if n+int64(k) > max {
				return n, fmt.Errorf("%w: over the plugin's %d bytes", sandbox.ErrLimit, max)
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return n, fmt.Errorf("blob write: %w", err)
			}
			n += int64(k)
			if progress != nil && resp.ContentLength > 0 {
				if pct := int(n * 100 / resp.ContentLength); pct >= next && pct < 100 {
					progress(pct, fmt.Sprintf("downloaded %d of %d bytes", n, resp.ContentLength))
					next = pct/10*10 + 10
				}
			}
		}
		if errors.Is(rerr, io.EOF) {
			return n, nil
		}
		if rerr != nil {
			return n, fmt.Errorf("%w: the body broke off after %d bytes: %v", sandbox.ErrUnavailable, n, rerr)
		}
	}
}
