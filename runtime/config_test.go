package runtime

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultConfigIsValid(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("embedded defaults are invalid: %v", err)
	}
	if got := cfg.Broker.Listeners[0].Address; got != "127.0.0.1:1883" {
		t.Errorf("default listener %q, want 127.0.0.1:1883", got)
	}
	if cfg.Uplink.URL != "" {
		t.Errorf("default uplink %q, want none", cfg.Uplink.URL)
	}
}

func TestParseConfig(t *testing.T) {
	cfg, err := ParseConfig([]byte(`
device_id: gw-7
data_dir: /var/lib/outpost
storage:
  durability: fsync
  max_bytes: 64MiB
  when_full: reject_new
  ttl: 24h
routes:
  - name: alarms
    match: ["plant/+/alarm"]
    priority: 5
    ttl: 1h
  - name: telemetry
    match: ["#"]
uplink:
  url: mqtts://hub.example:8883
  backoff_max: 2m
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DeviceID != "gw-7" || cfg.Storage.Durability != "fsync" || cfg.Storage.MaxBytes != 64<<20 ||
		time.Duration(cfg.Storage.TTL) != 24*time.Hour || len(cfg.Routes) != 2 || cfg.Routes[0].Priority != 5 ||
		time.Duration(cfg.Uplink.BackoffMax) != 2*time.Minute {
		t.Fatalf("decoded %+v", cfg)
	}
	// Keys the file did not set keep their defaults.
	if time.Duration(cfg.Uplink.KeepAlive) != 30*time.Second || cfg.Broker.Listeners[0].Address != "127.0.0.1:1883" {
		t.Fatalf("defaults lost: %+v", cfg)
	}
}

func TestParseConfigEmptyFile(t *testing.T) {
	if _, err := ParseConfig(nil); err != nil {
		t.Fatalf("an empty file should mean the defaults: %v", err)
	}
}

// TestValidateNamesEveryKey checks that each bad value is reported with its
// key and what is allowed, and that all problems are reported at once.
func TestValidateNamesEveryKey(t *testing.T) {
	tests := []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{"durability", "storage: {durability: sync}", []string{`storage.durability: "sync" is not one of process, fsync`}},
		{"when_full", "storage: {when_full: block}", []string{`storage.when_full: "block" is not one of drop_oldest, reject_new`}},
		{"compression", "storage: {compression: lz4}", []string{`storage.compression: "lz4" is not one of snappy, none`}},
		{"max_bytes unit", "storage: {max_bytes: 10XB}", []string{`unknown unit "XB"`}},
		{"max_bytes tiny", "storage: {max_bytes: 100}", []string{"storage.max_bytes: 100 bytes is below the 1MiB minimum"}},
		{"ttl", "storage: {ttl: forever}", []string{`"forever" is not a duration`}},
		{"url scheme", "uplink: {url: 'http://x:1883'}", []string{"uplink.url", "scheme must be mqtt or mqtts"}},
		{"url port", "uplink: {url: 'mqtt://broker'}", []string{"uplink.url", "a port from 1 to 65535 is required"}},
		{"url garbage", "uplink: {url: 'mqtt://[::1'}", []string{"uplink.url", "is not a URL"}},
		{"listener", "broker: {listeners: [{address: 'localhost'}]}", []string{"broker.listeners[0].address", "is not host:port"}},
		{"route filter", "routes: [{name: r, match: ['a/#/b']}]", []string{"routes[0].match[0]", "'#' must be the last level"}},
		{"route dup", "routes: [{name: r, match: ['#']}, {name: r, match: ['x']}]", []string{`routes[1].name: "r" is used by another route`}},
		{"route no match", "routes: [{name: r}]", []string{"routes[0].match: at least one topic filter is required"}},
		{"no routes", "routes: []", []string{"routes: at least one route is required"}},
		{"backoff", "uplink: {backoff_min: 10s, backoff_max: 5s}", []string{"uplink.backoff_max: 5s must be above uplink.backoff_min 10s"}},
		{"device id", "device_id: 'a b'", []string{`device_id: "a b"`}},
		{"unknown key", "storage: {durabilty: fsync}", []string{"field durabilty not found"}},
		{"log level", "log: {level: verbose}", []string{`log.level: "verbose" is not one of debug, info, warn, error`}},
		{"several at once", "storage: {durability: x, when_full: y}\nlog: {format: xml}", []string{"storage.durability", "storage.when_full", "log.format"}},
		{"dialect", "uplink: {dialect: aws}", []string{`uplink.dialect: "aws" is not one of generic, azure, watson`}},
		{"azure key", "uplink: {dialect: azure, azure: {shared_access_key: 'not base64!'}}", []string{"uplink.azure.shared_access_key: not base64"}},
		{"azure no auth", "uplink: {dialect: azure}", []string{"uplink.azure.shared_access_key: required, unless X.509"}},
		{"azure password", "uplink: {dialect: azure, password: p, azure: {shared_access_key: a2V5}}", []string{"uplink.username: not used by the azure dialect"}},
		{"azure lifetime", "uplink: {dialect: azure, azure: {shared_access_key: a2V5, sas_lifetime: 1s}}", []string{"uplink.azure.sas_lifetime: 1s is below the 10s minimum"}},
		{"azure module", "uplink: {dialect: azure, azure: {shared_access_key: a2V5, module_id: 'a/b'}}", []string{"uplink.azure.device_id"}},
		{"watson org", "uplink: {dialect: watson, watson: {org: ABC, type: t, token: x}}", []string{`uplink.watson.org: "ABC"`}},
		{"watson type", "uplink: {dialect: watson, watson: {org: abc123, type: 'a:b', token: x}}", []string{`uplink.watson.type: "a:b"`}},
		{"watson token", "uplink: {dialect: watson, watson: {org: abc123, type: t}}", []string{"uplink.watson.token: required"}},
		{"watson quickstart gateway", "uplink: {dialect: watson, watson: {org: quickstart, type: t, gateway: true}}", []string{"a gateway cannot connect to quickstart"}},
		{"watson children", "uplink: {dialect: watson, watson: {org: abc123, type: t, token: x, children: [{type: s, id: s1}]}}", []string{"child devices need gateway: true"}},
		{"watson lifetime", "uplink: {dialect: watson, watson: {org: abc123, type: t, token: x, lifetime: 10m}}", []string{"uplink.watson.lifetime: 10m0s: 0 (never dormant) or at least 1h"}},
		{"rollout hosts", "plugins: {rollout: {enabled: true}}", []string{"plugins.rollout.hosts: at least one host is required"}},
		{"rollout host", "plugins: {rollout: {enabled: true, hosts: ['http://x/']}}", []string{`plugins.rollout.hosts[0]: "http://x/"`}},
		{"rollout max_bytes", "plugins: {rollout: {max_bytes: 1KiB}}", []string{"plugins.rollout.max_bytes: 1024: want 64KiB to 1GiB"}},
		{"dm command", "dm: {reboot_command: ['']}", []string{"dm.reboot_command: the first element"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.yaml))
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadConfigNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "outpost.yaml")
	if err := os.WriteFile(p, []byte("storage: {durability: nope}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadConfig(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "storage.durability") {
		t.Fatalf("error %v should name the file and the key", err)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("missing file accepted")
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"1048576", 1 << 20, true},
		{"512KiB", 512 << 10, true},
		{"64MiB", 64 << 20, true},
		{"1GiB", 1 << 30, true},
		{"1GB", 1e9, true},
		{" 2 MB ", 2e6, true},
		{"1.5GiB", 0, false},
		{"-1", 0, false},
		{"10 parsecs", 0, false},
		{"99999999999999999999TiB", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseByteSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("storage: {durability: fsync, max_bytes: 64MiB}\n"))
	f.Add([]byte("routes: [{name: a, match: ['x/+/y', '#']}]\nuplink: {url: 'mqtt://h:1'}\n"))
	f.Add([]byte("broker: {listeners: [{address: ':0'}]}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := ParseConfig(b)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("ParseConfig returned a config that does not validate: %v", err)
		}
	})
}

func TestChanges(t *testing.T) {
	cur := DefaultConfig()
	next := DefaultConfig()
	next.Routes = append(next.Routes, RouteConfig{Name: "alarms", Match: []string{"alarms/#"}, Priority: 9})
	next.Storage.MaxBytes = 2 << 30
	next.Log.Components = map[string]string{"uplink": "debug"}
	next.Uplink.Azure.Host = "hub.example"
	next.Broker.Listeners = []ListenerConfig{{Address: "0.0.0.0:1883"}}
	live, restart := cur.Changes(&next)
	if got := strings.Join(live, ","); got != "log.components.uplink,routes,storage.max_bytes" {
		t.Errorf("live changes %s", got)
	}
	if got := strings.Join(restart, ","); got != "broker.listeners,uplink.azure.host" {
		t.Errorf("restart changes %s", got)
	}
	if live, restart := cur.Changes(&cur); len(live)+len(restart) != 0 {
		t.Errorf("no change: %v %v", live, restart)
	}
}

func TestSecrets(t *testing.T) {
	c := DefaultConfig()
	c.Uplink.URL = "mqtt://u:p%40ss%2Fw0rd@hub:1883"
	c.Uplink.Password = "plain-pw"
	got := strings.Join(c.Secrets(), " ")
	for _, want := range []string{"p@ss/w0rd", "p%40ss%2Fw0rd", "plain-pw"} {
		if !strings.Contains(got, want) {
			t.Errorf("Secrets() = %q lacks %q", got, want)
		}
	}
	c.Uplink.Azure.SharedAccessKey, c.Uplink.Watson.Token = "a2V5LWtleQ==", "tok-tok-tok"
	r := c.Redacted()
	if strings.Contains(r.Uplink.URL, "w0rd") || r.Uplink.Password != "<redacted>" ||
		r.Uplink.Azure.SharedAccessKey != "<redacted>" || r.Uplink.Watson.Token != "<redacted>" {
		t.Errorf("Redacted: url %q password %q key %q token %q", r.Uplink.URL, r.Uplink.Password,
			r.Uplink.Azure.SharedAccessKey, r.Uplink.Watson.Token)
	}
	if c.Uplink.Password != "plain-pw" {
		t.Error("Redacted changed the configuration it copied")
	}
}

func TestWarnings(t *testing.T) {
	c := DefaultConfig()
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("the defaults warn: %q", w)
	}
	c.Broker.Listeners = []ListenerConfig{{Address: "0.0.0.0:1883", AllowAnonymous: true}}
	c.Admin.HTTP = "0.0.0.0:9181"
	c.Uplink.URL = "mqtt://u:pw@broker.example:1883"
	c.Uplink.TLS.InsecureSkipVerify = true
	c.Storage.MaxBytes = 0
	got := strings.Join(c.Warnings(), "\n")
	for _, key := range []string{"broker.listeners[0]: 0.0.0.0:1883 is reachable from the network and admits anonymous",
		"admin.http:", "uplink.url: credentials go to mqtt://u:xxxxx@broker.example:1883 over plain TCP",
		"uplink.tls.insecure_skip_verify:", "storage.max_bytes: the outbox has no cap"} {
		if !strings.Contains(got, key) {
			t.Errorf("warnings lack %q:\n%s", key, got)
		}
	}
	if strings.Contains(got, "pw@") {
		t.Errorf("a warning shows the password:\n%s", got)
	}
}

// TestLiveKeysDocumented: the operator's guide lists every key a reload
// applies live.
func TestLiveKeysDocumented(t *testing.T) {
	b, err := os.ReadFile("../docs/OPERATIONS.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(b), "### Reload")
	section, _, _ = strings.Cut(section, "## Observe")
	for _, k := range liveKeys {
		if !strings.Contains(section, "`"+k+"`") {
			t.Errorf("docs/OPERATIONS.md, Reload, does not list %s", k)
		}
	}
}
