package runtime

import (
	"fmt"
	"net"
	"net/url"
)

// Warnings are the configuration's choices that are valid but that an
// operator should make on purpose: each names its key. `outpost config
// validate` prints them, and the agent logs them at start.
func (c *Config) Warnings() []string {
	var out []string
	warn := func(key, format string, args ...any) {
		out = append(out, fmt.Sprintf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	users := len(c.Broker.Users) > 0 || c.Broker.UsersFile != ""
	for i, l := range c.Broker.Listeners {
		if onLoopback(l.Address) {
			continue
		}
		key := fmt.Sprintf("broker.listeners[%d]", i)
		switch {
		case l.AllowAnonymous:
			warn(key, "%s is reachable from the network and admits anonymous clients (allow_anonymous)", l.Address)
		case !users && l.CertFile == "":
			warn(key, "%s is reachable from the network but admits no one: no users, no anonymous clients", l.Address)
		}
		if users && l.CertFile == "" {
			warn(key, "%s takes passwords over plain TCP: set cert_file and key_file (docs/SECURITY.md)", l.Address)
		}
	}
	if c.Admin.HTTP != "" && !onLoopback(c.Admin.HTTP) {
		warn("admin.http", "%s serves the metrics and status to the network (read-only, no authentication)", c.Admin.HTTP)
	}
	if u, err := url.Parse(c.Uplink.URL); err == nil && u.Scheme == "mqtt" && !onLoopback(u.Host) {
		if c.Uplink.Password != "" || u.User != nil || c.Uplink.Azure.SharedAccessKey != "" || c.Uplink.Watson.Token != "" {
			warn("uplink.url", "credentials go to %s over plain TCP: use mqtts://", u.Redacted())
		}
	}
	if c.Uplink.TLS.InsecureSkipVerify {
		warn("uplink.tls.insecure_skip_verify", "the upstream's certificate is not verified")
	}
	if c.Storage.MaxBytes == 0 && c.Storage.MaxMessages == 0 {
		warn("storage.max_bytes", "the outbox has no cap: a long outage can fill the disk")
	}
	return out
}

// onLoopback reports whether host:port (or a host) is a loopback address
// or localhost.
func onLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
