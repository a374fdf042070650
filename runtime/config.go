package runtime

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/internal/units"

	"github.com/outpost-edge/outpost/runtime/broker"
	"github.com/outpost-edge/outpost/runtime/router"
)

// Version is the agent's version, as the binary reports it (the hub sees it
// in the Azure client-agent property).
var Version = "dev"

// Config is the agent's configuration: one YAML file (snake_case keys),
// decoded over the embedded defaults, then validated as a whole.
type Config struct {
	// DeviceID names this gateway upstream. Default: the host name.
	DeviceID string `yaml:"device_id"`
	DataDir  string `yaml:"data_dir"` // default ./data
	// MemoryLimit is the Go runtime's soft memory limit: the garbage
	// collector works harder near it, so RSS stays flat under a large
	// backlog. 0 = no limit. The GOMEMLIMIT environment variable wins.
	MemoryLimit ByteSize      `yaml:"memory_limit"`
	Log         LogConfig     `yaml:"log"`
	Broker      BrokerConfig  `yaml:"broker"`
	Storage     StorageConfig `yaml:"storage"`
	Routes      []RouteConfig `yaml:"routes"`
	Uplink      UplinkConfig  `yaml:"uplink"`
	Plugins     PluginsConfig `yaml:"plugins"`
	Admin       AdminConfig   `yaml:"admin"`
	DM          DMConfig      `yaml:"dm"`
}

// AdminConfig configures the local administration API (the outpost CLI
// talks to it).
type AdminConfig struct {
	// Socket is the unix socket of the API, mode 0600. Default
	// {data_dir}/outpost.sock; "off" disables the API.
	Socket string `yaml:"socket"`
	// HTTP is the host:port of a read-only HTTP listener for Prometheus
	// and health checks: /metrics, /healthz, /readyz, /v1/status. Empty =
	// off (the socket serves the same routes).
	HTTP string `yaml:"http"`
}

// AdminSocket is the admin API's socket path, with the default applied; ""
// when the API is off.
func (c *Config) AdminSocket() string {
	switch c.Admin.Socket {
	case "off":
		return ""
	case "":
		return filepath.Join(c.DataDir, "outpost.sock")
	}
	return c.Admin.Socket
}

// PluginsConfig configures the wasm handlers.
type PluginsConfig struct {
	// Dir holds the installed plugins, loaded at start. Default
	// {data_dir}/plugins.
	Dir string `yaml:"dir"`
	// TrustKeys is a file of ed25519 public keys (base64, one per line);
	// when set, only plugins whose manifest is signed by one of them load.
	TrustKeys string `yaml:"trust_keys"`
	// MaxConcurrent bounds the local requests served at once; more are
	// answered 429.
	MaxConcurrent int `yaml:"max_concurrent"`
	// Rollout lets the cloud install, upgrade, roll back and remove
	// plugins through the dialect (Azure direct methods, a Watson DM
	// custom action bundle).
	Rollout RolloutConfig `yaml:"rollout"`
}

// RolloutConfig configures remote plugin rollout (docs/DIALECTS.md,
// "Remote plugin rollout").
type RolloutConfig struct {
	// Enabled serves the rollout methods (pluginInstall, pluginRollback,
	// pluginRemove, pluginList) on Azure and advertises the Watson bundle
	// outpost-plugins. Default false: installing code is a larger power
	// than any other request, so an operator turns it on.
	Enabled bool `yaml:"enabled"`
	// Hosts are the hosts modules and manifests may be downloaded from
	// (redirects too): host, host:port, *.domain, or "*" for any. Required
	// when Enabled.
	Hosts []string `yaml:"hosts"`
	// MaxBytes bounds a downloaded module. Default 32MiB.
	MaxBytes ByteSize `yaml:"max_bytes"`
}

// LogConfig configures logging.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // auto (text on a terminal, else JSON), text, json
	// Components sets levels by component, over Level: broker, uplink,
	// azure, watson, plugins, dispatch, admin, firmware, hub...
	// (the "component" of each log line).
	Components map[string]string `yaml:"components"`
}

// BrokerConfig configures the local broker (docs/SECURITY.md).
type BrokerConfig struct {
	// Listeners are the TCP (or TLS) listeners. Default: 127.0.0.1:1883.
	Listeners []ListenerConfig `yaml:"listeners"`
	// MaxPacketSize is the largest packet a client may send. Default 1MiB;
	// 0 = no limit.
	MaxPacketSize ByteSize `yaml:"max_packet_size"`
	// MaxClients bounds the connected clients, on all listeners; more are
	// refused with CONNACK 0x89 Server busy. Default 1000; 0 = no limit.
	MaxClients int `yaml:"max_clients"`
	// Users are the accounts clients log in with, besides those of
	// UsersFile. A client that sends a username or password must match one,
	// on any listener (when there are no users at all, credentials are
	// ignored and every client is anonymous).
	Users []BrokerUser `yaml:"users"`
	// UsersFile is a YAML file with a "users:" list shaped as Users, read
	// at start (and by 'outpost config validate').
	UsersFile string `yaml:"users_file"`
	// ACL applies to every user, in addition to the user's own: typically
	// patterns such as devices/%u/#. A user may do only what an ACL allows.
	ACL BrokerACL `yaml:"acl"`
	// AnonymousACL, when set, limits anonymous clients. Unset, they may
	// publish and subscribe to anything (they are on loopback, or on a
	// listener where the operator allowed them).
	AnonymousACL *BrokerACL `yaml:"anonymous_acl"`
	// RateLimit bounds each client's publishes. Default: no limit.
	RateLimit RateLimitConfig `yaml:"rate_limit"`
	// AuthBackoff slows password guessing from one address.
	AuthBackoff AuthBackoffConfig `yaml:"auth_backoff"`
}

// ListenerConfig is one TCP listener, with TLS when CertFile is set.
type ListenerConfig struct {
	// Address is host:port; port 0 picks a free port.
	Address string `yaml:"address"`
	// AllowAnonymous admits clients without credentials on a non-loopback
	// address. Loopback listeners always admit them.
	AllowAnonymous bool `yaml:"allow_anonymous"`
	// CertFile and KeyFile are the PEM server certificate (chain) and key;
	// set, the listener speaks TLS (1.2 or later) only.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile holds the PEM CA certificates client certificates must
	// chain to; a client that presents a certificate is verified.
	ClientCAFile string `yaml:"client_ca_file"`
	// RequireClientCert refuses clients without a valid client certificate
	// (the TLS handshake fails). Needs ClientCAFile.
	RequireClientCert bool `yaml:"require_client_cert"`
}

// BrokerUser is an account of the local broker.
type BrokerUser struct {
	// Username is unique, without '/', '+' or '#'.
	Username string `yaml:"username"`
	// PasswordHash is a bcrypt ($2a$...) or argon2id ($argon2id$...) hash,
	// as 'outpost passwd' prints it. Never the password itself.
	PasswordHash PasswordHash `yaml:"password_hash"`
	// ACL is what this user may do besides broker.acl.
	ACL BrokerACL `yaml:"acl"`
}

// PasswordHash is a password hash. 'outpost config print' shows it as
// "<hash>".
type PasswordHash string

// MarshalYAML redacts the hash.
func (h PasswordHash) MarshalYAML() (any, error) {
	if h == "" {
		return "", nil
	}
	return "<hash>", nil
}

// BrokerACL lists topic filters a client may publish to and subscribe to.
// %u stands for the username and %c for the client id; a rule whose
// substituted value is empty or contains '/', '+' or '#' matches nothing.
type BrokerACL struct {
	// Publish are the filters of the topics the client may publish to.
	Publish []string `yaml:"publish"`
	// Subscribe are the filters the client may subscribe within, and so
	// the topics it may receive.
	Subscribe []string `yaml:"subscribe"`
}

// RateLimitConfig bounds each client's publishes (a token bucket). Over
// the limit, an MQTT 5 QoS 1 publish gets PUBACK 0x96 Message rate too high,
// a QoS 0 publish is dropped, and a QoS 2 publish or an MQTT 3.1.1 client's
// QoS 1 or 2 publish closes the connection (DISCONNECT 0x96 for MQTT 5).
type RateLimitConfig struct {
	// MessagesPerSecond is the sustained rate. 0 = no limit.
	MessagesPerSecond float64 `yaml:"messages_per_second"`
	// Burst is how many publishes may come at once. 0 = the rate rounded
	// up.
	Burst int `yaml:"burst"`
}

// AuthBackoffConfig slows password guessing: after FreeFailures failed
// logins from one IP address, each further failure locks it out for a
// backoff doubling from 1s up to Max, during which its logins are refused
// (CONNACK 0x9F) even with the right password.
type AuthBackoffConfig struct {
	// FreeFailures are the failed logins allowed before the backoff.
	// Default 3.
	FreeFailures int `yaml:"free_failures"`
	// Max caps the lockout. Default 30s; 0 turns the backoff off.
	Max Duration `yaml:"max"`
}

// usersFile is the shape of broker.users_file.
type usersFile struct {
	Users []BrokerUser `yaml:"users"`
}

// LoadUsersFile reads a broker users file.
func LoadUsersFile(path string) ([]BrokerUser, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: users file: %w", err)
	}
	var f usersFile
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config: users file %s: %w", path, err)
	}
	return f.Users, nil
}

// BrokerUsers returns the broker's users: broker.users, then those of
// broker.users_file.
func (c *Config) BrokerUsers() ([]BrokerUser, error) {
	users := append([]BrokerUser(nil), c.Broker.Users...)
	if c.Broker.UsersFile != "" {
		more, err := LoadUsersFile(c.Broker.UsersFile)
		if err != nil {
			return nil, err
		}
		users = append(users, more...)
	}
	return users, nil
}

// StorageConfig configures the outbox.
type StorageConfig struct {
	Durability  string   `yaml:"durability"`  // process, fsync
	Compression string   `yaml:"compression"` // snappy, none
	MaxBytes    ByteSize `yaml:"max_bytes"`   // 0 = no cap
	MaxMessages int64    `yaml:"max_messages"`
	WhenFull    string   `yaml:"when_full"` // drop_oldest, reject_new
	TTL         Duration `yaml:"ttl"`       // 0 = messages do not expire
}

// RouteConfig is one outbox route: the local topics it takes, its priority
// and the time to live of its messages.
type RouteConfig struct {
	Name     string   `yaml:"name"`
	Match    []string `yaml:"match"`
	Priority int      `yaml:"priority"`
	TTL      Duration `yaml:"ttl"`
}

// UplinkConfig configures the upstream connection.
type UplinkConfig struct {
	// Dialect is the hub's API: generic (plain MQTT 5), azure (Azure IoT
	// Hub MQTT 5), watson (Watson IoT Platform).
	Dialect string `yaml:"dialect"`
	// URL of the upstream broker, mqtt://host:port or mqtts://host:port.
	// Empty: no uplink, messages are stored until one is configured.
	URL      string    `yaml:"url"`
	ClientID string    `yaml:"client_id"` // default outpost-{device_id}
	Username string    `yaml:"username"`
	Password string    `yaml:"password"`
	TLS      TLSConfig `yaml:"tls"`
	// TopicPrefix is put before each local topic upstream; {device_id} is
	// replaced. Default "outpost/{device_id}/".
	TopicPrefix    string   `yaml:"topic_prefix"`
	KeepAlive      Duration `yaml:"keep_alive"`
	ConnectTimeout Duration `yaml:"connect_timeout"`
	BackoffMin     Duration `yaml:"backoff_min"`
	BackoffMax     Duration `yaml:"backoff_max"`
	StallTimeout   Duration `yaml:"stall_timeout"`

	Azure  AzureConfig  `yaml:"azure"`
	Watson WatsonConfig `yaml:"watson"`
}

// WatsonConfig configures the watson dialect.
type WatsonConfig struct {
	Org      string `yaml:"org"`       // the 6-character organization id, or quickstart
	Type     string `yaml:"type"`      // the device (or gateway) type
	DeviceID string `yaml:"device_id"` // default: device_id
	Token    string `yaml:"token"`     // the auth token
	// Gateway connects as a gateway, for itself and its Children.
	Gateway  bool           `yaml:"gateway"`
	Children []WatsonChild  `yaml:"children"`
	Manage   *bool          `yaml:"manage"`   // device management; default on (off on quickstart)
	Lifetime Duration       `yaml:"lifetime"` // manage lifetime; 0 = never dormant, else at least 1h
	Info     map[string]any `yaml:"device_info"`
	Metadata map[string]any `yaml:"metadata"`
	Bundles  []string       `yaml:"bundles"` // custom action bundles the handlers serve
	Format   string         `yaml:"event_format"`
	_        struct{}       `yaml:"-"`
}

// WatsonChild is a device behind a Watson gateway, managed through it.
type WatsonChild struct {
	Type string `yaml:"type"`
	ID   string `yaml:"id"`
}

// DMConfig configures device management, whatever the dialect: the
// operator's commands the agent runs for reboot, factory reset and
// firmware install (argv lists, run without a shell), and the firmware
// version running.
type DMConfig struct {
	// FirmwareVersion is the firmware version running, unless
	// VersionCommand says otherwise.
	FirmwareVersion string `yaml:"firmware_version"`
	// VersionCommand prints the firmware version running (its trimmed
	// output); it runs at start, so that an update that rebooted the
	// device is known to have taken.
	VersionCommand      []string `yaml:"version_command"`
	RebootCommand       []string `yaml:"reboot_command"`
	FactoryResetCommand []string `yaml:"factory_reset_command"`
	// InstallCommand installs a downloaded image: OUTPOST_FIRMWARE_FILE is
	// its path, OUTPOST_FIRMWARE_VERSION and OUTPOST_FIRMWARE_NAME the
	// platform's parameters.
	InstallCommand  []string `yaml:"install_command"`
	DeviceActions   *bool    `yaml:"device_actions"`   // advertise reboot and factory reset; default on
	FirmwareActions *bool    `yaml:"firmware_actions"` // advertise firmware download and update; default on
}

// AzureConfig configures the azure dialect.
type AzureConfig struct {
	// Host is the hub's host name, which the SAS signature covers. Default:
	// the URL's host.
	Host     string `yaml:"host"`
	DeviceID string `yaml:"device_id"` // default: device_id
	ModuleID string `yaml:"module_id"`
	// SharedAccessKey is the base64 key that signs the SAS: the device's,
	// or the policy's with SASPolicy. Empty: X.509 (uplink.tls.cert_file).
	SharedAccessKey string   `yaml:"shared_access_key"`
	SASPolicy       string   `yaml:"sas_policy"`
	SASLifetime     Duration `yaml:"sas_lifetime"` // default 1h; re-authenticated at four fifths
	// DefaultCommand names the handler of commands without an @command
	// application property. Default c2d.
	DefaultCommand string   `yaml:"default_command"`
	MethodTimeout  Duration `yaml:"method_timeout"`  // default 30s
	CommandTimeout Duration `yaml:"command_timeout"` // default 60s
}

// TLSConfig configures mqtts:// connections.
type TLSConfig struct {
	CAFile             string `yaml:"ca_file"`
	CertFile           string `yaml:"cert_file"`
	KeyFile            string `yaml:"key_file"`
	ServerName         string `yaml:"server_name"`
	InsecureSkipVerify bool   `yaml:"insecure_skip_verify"`
}

// DefaultConfig returns the embedded defaults: a local broker on
// 127.0.0.1:1883, data in ./data, one route for every topic, no uplink.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		DeviceID:    sanitizeID(host),
		DataDir:     "./data",
		MemoryLimit: 64 << 20,
		Log:         LogConfig{Level: "info", Format: "auto"},
		Broker: BrokerConfig{
			Listeners:     []ListenerConfig{{Address: "127.0.0.1:1883"}},
			MaxPacketSize: 1 << 20,
			MaxClients:    1000,
			AuthBackoff:   AuthBackoffConfig{FreeFailures: 3, Max: Duration(30 * time.Second)},
		},
		Storage: StorageConfig{
			Durability:  "process",
			Compression: "snappy",
			MaxBytes:    1 << 30,
			WhenFull:    "drop_oldest",
		},
		Routes:  []RouteConfig{{Name: "telemetry", Match: []string{"#"}}},
		Plugins: PluginsConfig{MaxConcurrent: 64},
		Uplink: UplinkConfig{
			Dialect:        "generic",
			TopicPrefix:    "outpost/{device_id}/",
			KeepAlive:      Duration(30 * time.Second),
			ConnectTimeout: Duration(10 * time.Second),
			BackoffMin:     Duration(500 * time.Millisecond),
			BackoffMax:     Duration(30 * time.Second),
			StallTimeout:   Duration(30 * time.Second),
		},
	}
}

var idUnsafe = regexp.MustCompile(`[^A-Za-z0-9._-]`)

func sanitizeID(s string) string {
	s = idUnsafe.ReplaceAllString(s, "-")
	if s == "" {
		return "outpost"
	}
	return s
}

// LoadConfig reads the YAML file at path over the defaults and validates
// the result. Unknown keys are errors.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	cfg, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes YAML over the defaults and validates the result.
func ParseConfig(b []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// Validate reports every problem of the configuration at once, each naming
// the key and what is allowed.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	oneOf := func(key, v string, allowed ...string) {
		for _, a := range allowed {
			if v == a {
				return
			}
		}
		bad(key, "%q is not one of %s", v, strings.Join(allowed, ", "))
	}

	if c.DeviceID == "" {
		bad("device_id", "must not be empty")
	} else if idUnsafe.MatchString(c.DeviceID) || len(c.DeviceID) > 128 {
		bad("device_id", "%q: use 1 to 128 of A-Z a-z 0-9 . _ -", c.DeviceID)
	}
	if c.Plugins.MaxConcurrent < 1 || c.Plugins.MaxConcurrent > 100000 {
		bad("plugins.max_concurrent", "%d: want 1 to 100000", c.Plugins.MaxConcurrent)
	}
	if r := c.Plugins.Rollout; r.Enabled {
		if len(r.Hosts) == 0 {
			bad("plugins.rollout.hosts", "at least one host is required when plugins.rollout.enabled is true (\"*\" for any)")
		}
		for i, h := range r.Hosts {
			if h == "" || strings.ContainsAny(h, "/?#@ ") {
				bad(fmt.Sprintf("plugins.rollout.hosts[%d]", i), "%q: want a host, host:port, *.domain or *", h)
			}
		}
	}
	if m := c.Plugins.Rollout.MaxBytes; m < 0 || m > 1<<30 || (m > 0 && m < 64<<10) {
		bad("plugins.rollout.max_bytes", "%d: want 64KiB to 1GiB (0 = 32MiB)", m)
	}
	if c.DataDir == "" {
		bad("data_dir", "must not be empty")
	}
	if c.MemoryLimit != 0 && c.MemoryLimit < 16<<20 {
		bad("memory_limit", "%d bytes is below the 16MiB minimum (0 = no limit)", c.MemoryLimit)
	}
	oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	oneOf("log.format", c.Log.Format, "auto", "text", "json")
	for comp, l := range c.Log.Components {
		oneOf("log.components."+comp, l, "debug", "info", "warn", "error")
	}

	if len(c.Broker.Listeners) == 0 {
		bad("broker.listeners", "at least one listener is required")
	}
	for i, l := range c.Broker.Listeners {
		if _, port, err := net.SplitHostPort(l.Address); err != nil {
			bad(fmt.Sprintf("broker.listeners[%d].address", i), "%q is not host:port (%v)", l.Address, err)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad(fmt.Sprintf("broker.listeners[%d].address", i), "%q: port must be 0 to 65535", l.Address)
		}
		key := fmt.Sprintf("broker.listeners[%d]", i)
		if (l.CertFile == "") != (l.KeyFile == "") {
			bad(key+".cert_file", "cert_file and key_file go together")
		}
		if l.ClientCAFile != "" && l.CertFile == "" {
			bad(key+".client_ca_file", "client certificates need TLS: set cert_file and key_file")
		}
		if l.RequireClientCert && l.ClientCAFile == "" {
			bad(key+".require_client_cert", "needs client_ca_file (the CA that client certificates chain to)")
		}
	}
	if c.Admin.HTTP != "" {
		if _, port, err := net.SplitHostPort(c.Admin.HTTP); err != nil {
			bad("admin.http", "%q is not host:port (%v)", c.Admin.HTTP, err)
		} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			bad("admin.http", "%q: port must be 0 to 65535", c.Admin.HTTP)
		}
	}
	if c.Broker.MaxPacketSize < 0 || c.Broker.MaxPacketSize > 268435455 {
		bad("broker.max_packet_size", "%d is out of range (0 = no limit, at most 268435455 bytes)", c.Broker.MaxPacketSize)
	}
	c.validateBrokerSecurity(bad)

	oneOf("storage.durability", c.Storage.Durability, "process", "fsync")
	oneOf("storage.when_full", c.Storage.WhenFull, "drop_oldest", "reject_new")
	oneOf("storage.compression", c.Storage.Compression, "snappy", "none")
	if c.Storage.MaxBytes < 0 {
		bad("storage.max_bytes", "must not be negative")
	} else if c.Storage.MaxBytes > 0 && c.Storage.MaxBytes < 1<<20 {
		bad("storage.max_bytes", "%d bytes is below the 1MiB minimum (0 = no cap)", c.Storage.MaxBytes)
	}
	if c.Storage.MaxMessages < 0 {
		bad("storage.max_messages", "must not be negative (0 = no cap)")
	}
	if c.Storage.TTL < 0 {
		bad("storage.ttl", "must not be negative (0 = no expiry)")
	}

	if len(c.Routes) == 0 {
		bad("routes", "at least one route is required")
	}
	seen := map[string]bool{}
	for i, r := range c.Routes {
		key := fmt.Sprintf("routes[%d]", i)
		switch {
		case r.Name == "":
			bad(key+".name", "must not be empty")
		case len(r.Name) > 64:
			bad(key+".name", "%q is longer than 64 bytes", r.Name)
		case seen[r.Name]:
			bad(key+".name", "%q is used by another route", r.Name)
		}
		seen[r.Name] = true
		if len(r.Match) == 0 {
			bad(key+".match", "at least one topic filter is required")
		}
		for j, f := range r.Match {
			if err := router.ValidFilter(f); err != nil {
				bad(fmt.Sprintf("%s.match[%d]", key, j), "%v", err)
			}
		}
		if r.TTL < 0 {
			bad(key+".ttl", "must not be negative")
		}
	}

	u := &c.Uplink
	oneOf("uplink.dialect", u.Dialect, "generic", "azure", "watson")
	switch u.Dialect {
	case "azure":
		c.validateAzure(bad)
	case "watson":
		c.validateWatson(bad)
	}
	for key, argv := range map[string][]string{"dm.reboot_command": c.DM.RebootCommand,
		"dm.factory_reset_command": c.DM.FactoryResetCommand, "dm.install_command": c.DM.InstallCommand} {
		if len(argv) > 0 && argv[0] == "" {
			bad(key, "the first element is the program to run and must not be empty")
		}
	}
	if u.URL != "" {
		if _, err := ParseUplinkURL(u.URL); err != nil {
			bad("uplink.url", "%v", err)
		}
	}
	if strings.ContainsAny(u.TopicPrefix, "#+") {
		bad("uplink.topic_prefix", "%q must not contain wildcards", u.TopicPrefix)
	}
	for key, d := range map[string]Duration{
		"uplink.keep_alive": u.KeepAlive, "uplink.connect_timeout": u.ConnectTimeout,
		"uplink.backoff_min": u.BackoffMin, "uplink.backoff_max": u.BackoffMax,
		"uplink.stall_timeout": u.StallTimeout,
	} {
		if d <= 0 {
			bad(key, "must be a positive duration such as 30s")
		}
	}
	if u.KeepAlive > 0 && (u.KeepAlive < Duration(time.Second) || u.KeepAlive > Duration(65535*time.Second)) {
		bad("uplink.keep_alive", "%s is out of range (1s to 18h12m15s)", time.Duration(u.KeepAlive))
	}
	if u.BackoffMax <= u.BackoffMin {
		bad("uplink.backoff_max", "%s must be above uplink.backoff_min %s", time.Duration(u.BackoffMax), time.Duration(u.BackoffMin))
	}
	if (u.TLS.CertFile == "") != (u.TLS.KeyFile == "") {
		bad("uplink.tls", "cert_file and key_file go together")
	}
	return errors.Join(errs...)
}

// validateBrokerSecurity checks the broker's users, ACLs and limits.
func (c *Config) validateBrokerSecurity(bad func(key, format string, args ...any)) {
	br := &c.Broker
	if br.MaxClients < 0 {
		bad("broker.max_clients", "%d must not be negative (0 = no limit)", br.MaxClients)
	}
	if br.RateLimit.MessagesPerSecond < 0 {
		bad("broker.rate_limit.messages_per_second", "%g must not be negative (0 = no limit)", br.RateLimit.MessagesPerSecond)
	}
	if br.RateLimit.Burst < 0 {
		bad("broker.rate_limit.burst", "%d must not be negative (0 = the rate rounded up)", br.RateLimit.Burst)
	} else if br.RateLimit.Burst > 0 && br.RateLimit.MessagesPerSecond == 0 {
		bad("broker.rate_limit.burst", "needs broker.rate_limit.messages_per_second")
	}
	if br.AuthBackoff.FreeFailures < 0 {
		bad("broker.auth_backoff.free_failures", "%d must not be negative", br.AuthBackoff.FreeFailures)
	}
	if br.AuthBackoff.Max < 0 {
		bad("broker.auth_backoff.max", "must not be negative (0 = no backoff)")
	} else if br.AuthBackoff.Max > 0 && br.AuthBackoff.Max < Duration(time.Second) {
		bad("broker.auth_backoff.max", "%s is below the 1s minimum (0 = no backoff)", time.Duration(br.AuthBackoff.Max))
	}
	checkACL := func(key string, a BrokerACL) {
		for j, f := range a.Publish {
			if err := broker.CheckACLFilter(f); err != nil {
				bad(fmt.Sprintf("%s.publish[%d]", key, j), "%v", err)
			}
		}
		for j, f := range a.Subscribe {
			if err := broker.CheckACLFilter(f); err != nil {
				bad(fmt.Sprintf("%s.subscribe[%d]", key, j), "%v", err)
			}
		}
	}
	checkACL("broker.acl", br.ACL)
	if br.AnonymousACL != nil {
		checkACL("broker.anonymous_acl", *br.AnonymousACL)
	}
	seen := map[string]string{}
	checkUsers := func(key string, users []BrokerUser) {
		for i, u := range users {
			k := fmt.Sprintf("%s[%d]", key, i)
			switch {
			case u.Username == "" || strings.ContainsAny(u.Username, "/+#"):
				bad(k+".username", "%q: want a non-empty name without '/', '+', '#' (it may stand for %%u in a topic)", u.Username)
			case seen[u.Username] != "":
				bad(k+".username", "%q is also %s", u.Username, seen[u.Username])
			default:
				seen[u.Username] = k
			}
			if err := broker.CheckHash(string(u.PasswordHash)); err != nil {
				bad(k+".password_hash", "%v", err)
			}
			checkACL(k+".acl", u.ACL)
		}
	}
	checkUsers("broker.users", br.Users)
	if br.UsersFile != "" {
		users, err := LoadUsersFile(br.UsersFile)
		if err != nil {
			bad("broker.users_file", "%v", err)
		}
		checkUsers("broker.users_file: users", users)
	}
}

// validateAzure checks the azure dialect's settings.
func (c *Config) validateAzure(bad func(key, format string, args ...any)) {
	u, a := &c.Uplink, &c.Uplink.Azure
	if u.Username != "" || u.Password != "" {
		bad("uplink.username", "not used by the azure dialect, which signs with uplink.azure.shared_access_key or uses X.509")
	}
	if a.SharedAccessKey != "" {
		if _, err := base64.StdEncoding.DecodeString(a.SharedAccessKey); err != nil {
			bad("uplink.azure.shared_access_key", "not base64: %v", err)
		}
	} else if u.TLS.CertFile == "" {
		bad("uplink.azure.shared_access_key", "required, unless X.509 authenticates (uplink.tls.cert_file)")
	} else if a.SASPolicy != "" {
		bad("uplink.azure.sas_policy", "a policy signs with its key: set uplink.azure.shared_access_key")
	}
	id := a.DeviceID
	if id == "" {
		id = c.DeviceID
	}
	if strings.ContainsAny(id+a.ModuleID, "/+#") || len(id) > 128 {
		bad("uplink.azure.device_id", "%q: at most 128 characters, without '/', '+', '#'", id)
	}
	for key, d := range map[string]Duration{"uplink.azure.sas_lifetime": a.SASLifetime,
		"uplink.azure.method_timeout": a.MethodTimeout, "uplink.azure.command_timeout": a.CommandTimeout} {
		if d < 0 {
			bad(key, "must not be negative (0 = the default)")
		}
	}
	if a.SASLifetime > 0 && a.SASLifetime < Duration(10*time.Second) {
		bad("uplink.azure.sas_lifetime", "%s is below the 10s minimum", time.Duration(a.SASLifetime))
	}
	if strings.ContainsAny(a.DefaultCommand, "/+#") {
		bad("uplink.azure.default_command", "%q: a handler name has no '/', '+', '#'", a.DefaultCommand)
	}
}

// validateWatson checks the watson dialect's settings.
func (c *Config) validateWatson(bad func(key, format string, args ...any)) {
	u, w := &c.Uplink, &c.Uplink.Watson
	if u.Username != "" || u.Password != "" {
		bad("uplink.username", "not used by the watson dialect, which authenticates with uplink.watson.token")
	}
	if w.Org != "quickstart" && !regexp.MustCompile(`^[a-z0-9]{6}$`).MatchString(w.Org) {
		bad("uplink.watson.org", "%q: want the 6-character organization id, or quickstart", w.Org)
	}
	id := w.DeviceID
	if id == "" {
		id = c.DeviceID
	}
	watsonID := regexp.MustCompile(`^[A-Za-z0-9._-]{1,36}$`)
	if !watsonID.MatchString(w.Type) {
		bad("uplink.watson.type", "%q: want 1 to 36 of A-Z a-z 0-9 . _ -", w.Type)
	}
	if !watsonID.MatchString(id) {
		bad("uplink.watson.device_id", "%q: want 1 to 36 of A-Z a-z 0-9 . _ - (device_id is the default)", id)
	}
	switch {
	case w.Org == "quickstart" && w.Gateway:
		bad("uplink.watson.gateway", "a gateway cannot connect to quickstart")
	case w.Org == "quickstart" && w.Manage != nil && *w.Manage:
		bad("uplink.watson.manage", "quickstart has no device management")
	case w.Org != "quickstart" && w.Token == "":
		bad("uplink.watson.token", "required (the device's auth token)")
	}
	if len(w.Children) > 0 && !w.Gateway {
		bad("uplink.watson.children", "child devices need gateway: true")
	}
	for i, ch := range w.Children {
		if !watsonID.MatchString(ch.Type) || !watsonID.MatchString(ch.ID) {
			bad(fmt.Sprintf("uplink.watson.children[%d]", i), "type %q id %q: want 1 to 36 of A-Z a-z 0-9 . _ -", ch.Type, ch.ID)
		}
	}
	if w.Lifetime != 0 && w.Lifetime < Duration(time.Hour) {
		bad("uplink.watson.lifetime", "%s: 0 (never dormant) or at least 1h", time.Duration(w.Lifetime))
	}
	for i, b := range w.Bundles {
		if !regexp.MustCompile(`^[A-Za-z0-9._-]{1,255}$`).MatchString(b) {
			bad(fmt.Sprintf("uplink.watson.bundles[%d]", i), "%q: want 1 to 255 of A-Z a-z 0-9 . _ -", b)
		}
	}
}

// Secrets are the configuration's secret values: the uplink's password
// (also in its URL), the Azure shared access key, the Watson token. The
// logger redacts them wherever they would appear.
func (c *Config) Secrets() []string {
	var out []string
	add := func(v string) {
		if v != "" {
			out = append(out, v)
		}
	}
	add(c.Uplink.Password)
	add(c.Uplink.Azure.SharedAccessKey)
	if k, err := base64.StdEncoding.DecodeString(c.Uplink.Azure.SharedAccessKey); err == nil && len(k) > 0 {
		add(string(k))
	}
	add(c.Uplink.Watson.Token)
	if u, err := url.Parse(c.Uplink.URL); err == nil && u.User != nil {
		if p, ok := u.User.Password(); ok {
			add(p)
			// As a URL prints it: p@ss/w0rd is p%40ss%2Fw0rd.
			_, esc, _ := strings.Cut(url.UserPassword("", p).String(), ":")
			if esc != p {
				add(esc)
			}
		}
	}
	return out
}

// Redacted returns a copy of c with its secrets replaced by "<redacted>",
// for printing.
func (c Config) Redacted() Config {
	const r = "<redacted>"
	set := func(v *string) {
		if *v != "" {
			*v = r
		}
	}
	set(&c.Uplink.Password)
	set(&c.Uplink.Azure.SharedAccessKey)
	set(&c.Uplink.Watson.Token)
	if u, err := url.Parse(c.Uplink.URL); err == nil && u.User != nil {
		c.Uplink.URL = u.Redacted()
	}
	return c
}

// ParseUplinkURL checks an upstream URL: mqtt:// or mqtts://, a host and a
// port.
func ParseUplinkURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%q is not a URL: %v", s, err)
	}
	switch u.Scheme {
	case "mqtt", "mqtts":
	default:
		return nil, fmt.Errorf("%q: scheme must be mqtt or mqtts", u.Redacted())
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("%q: no host", u.Redacted())
	}
	p, err := strconv.Atoi(u.Port())
	if err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("%q: a port from 1 to 65535 is required, as in mqtt://broker:1883", u.Redacted())
	}
	if u.Path != "" && u.Path != "/" {
		return nil, fmt.Errorf("%q: a path is not allowed", u.Redacted())
	}
	return u, nil
}

// Duration is a time.Duration written in YAML as a string such as "30s".
type Duration = units.Duration

// ByteSize is a size in bytes written in YAML as a number or with a unit.
type ByteSize = units.ByteSize

// ParseByteSize parses "64MiB", "1GB" or "1048576".
func ParseByteSize(s string) (ByteSize, error) { return units.ParseByteSize(s) }
