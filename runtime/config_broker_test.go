package runtime

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// bcryptHash is a valid bcrypt hash (of "secret", cost 4).
const bcryptHash = "$2a$04$rMxLHslMenU6E/0UHuhle.EEEnlveOR.3NR/8NppjGcC5BFAOg8my"

// TestValidateBrokerSecurityKeys: each new broker key's problem is
// reported with its key, all at once.
func TestValidateBrokerSecurityKeys(t *testing.T) {
	dir := t.TempDir()
	badFile := filepath.Join(dir, "users.yaml")
	if err := os.WriteFile(badFile, []byte("users:\n  - {username: 'x+y', password_hash: plain}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, yaml string
		want       []string
	}{
		{"cert without key", "broker: {listeners: [{address: ':8883', cert_file: c.pem}]}", []string{"broker.listeners[0].cert_file: cert_file and key_file go together"}},
		{"client ca without tls", "broker: {listeners: [{address: ':1883', client_ca_file: ca.pem}]}", []string{"broker.listeners[0].client_ca_file: client certificates need TLS"}},
		{"require cert without ca", "broker: {listeners: [{address: ':8883', cert_file: c, key_file: k, require_client_cert: true}]}", []string{"broker.listeners[0].require_client_cert: needs client_ca_file"}},
		{"max clients", "broker: {max_clients: -1}", []string{"broker.max_clients: -1 must not be negative"}},
		{"rate", "broker: {rate_limit: {messages_per_second: -1}}", []string{"broker.rate_limit.messages_per_second: -1 must not be negative"}},
		{"burst", "broker: {rate_limit: {burst: 5}}", []string{"broker.rate_limit.burst: needs broker.rate_limit.messages_per_second"}},
		{"burst negative", "broker: {rate_limit: {messages_per_second: 1, burst: -1}}", []string{"broker.rate_limit.burst: -1 must not be negative"}},
		{"free failures", "broker: {auth_backoff: {free_failures: -1}}", []string{"broker.auth_backoff.free_failures: -1 must not be negative"}},
		{"backoff max", "broker: {auth_backoff: {max: 10ms}}", []string{"broker.auth_backoff.max: 10ms is below the 1s minimum"}},
		{"acl filter", "broker: {acl: {publish: ['a/#/b'], subscribe: ['x/%d']}}", []string{"broker.acl.publish[0]", "not a valid MQTT topic filter", "broker.acl.subscribe[0]", "% must be followed by u"}},
		{"anonymous acl", "broker: {anonymous_acl: {subscribe: ['#/x']}}", []string{"broker.anonymous_acl.subscribe[0]"}},
		{"username", "broker: {users: [{username: 'a/b', password_hash: '" + bcryptHash + "'}]}", []string{`broker.users[0].username: "a/b"`}},
		{"empty username", "broker: {users: [{password_hash: '" + bcryptHash + "'}]}", []string{`broker.users[0].username: ""`}},
		{"duplicate user", "broker: {users: [{username: a, password_hash: '" + bcryptHash + "'}, {username: a, password_hash: '" + bcryptHash + "'}]}", []string{`broker.users[1].username: "a" is also broker.users[0]`}},
		{"plain password", "broker: {users: [{username: a, password_hash: hunter2}]}", []string{"broker.users[0].password_hash", "outpost passwd"}},
		{"user acl", "broker: {users: [{username: a, password_hash: '" + bcryptHash + "', acl: {publish: ['+x']}}]}", []string{"broker.users[0].acl.publish[0]"}},
		{"users file missing", "broker: {users_file: /nonexistent/users.yaml}", []string{"broker.users_file", "no such file"}},
		{"users file content", "broker: {users_file: '" + badFile + "'}", []string{`broker.users_file: users[0].username: "x+y"`, "broker.users_file: users[0].password_hash"}},
		{"unknown key", "broker: {users: [{username: a, password: x}]}", []string{"field password not found"}},
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

// TestBrokerSecurityConfig: a full secure broker section is valid, the
// users file adds to the inline users, and the hashes print as "<hash>".
func TestBrokerSecurityConfig(t *testing.T) {
	dir := t.TempDir()
	usersFile := filepath.Join(dir, "users.yaml")
	if err := os.WriteFile(usersFile, []byte("users:\n  - username: device-b\n    password_hash: '"+bcryptHash+"'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig([]byte(`
broker:
  listeners:
    - {address: '127.0.0.1:1883'}
    - {address: '0.0.0.0:8883', cert_file: s.pem, key_file: k.pem, client_ca_file: ca.pem, require_client_cert: true}
  max_clients: 50
  users_file: '` + usersFile + `'
  users:
    - username: device-a
      password_hash: '` + bcryptHash + `'
      acl: {publish: ['outpost/methods/+'], subscribe: ['outpost/responses/%c/#']}
  acl: {publish: ['devices/%u/#'], subscribe: ['devices/%u/#']}
  anonymous_acl: {publish: ['public/#'], subscribe: ['public/#']}
  rate_limit: {messages_per_second: 100, burst: 200}
  auth_backoff: {free_failures: 5, max: 1m}
`))
	if err != nil {
		t.Fatal(err)
	}
	users, err := cfg.BrokerUsers()
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 2 || users[0].Username != "device-a" || users[1].Username != "device-b" {
		t.Fatalf("users %+v, want device-a then device-b", users)
	}
	opts := brokerOptions(&cfg, users)
	if len(opts.Users) != 2 || opts.Listeners[1].TLS == nil || !opts.Listeners[1].TLS.RequireClientCert ||
		opts.AnonymousACL == nil || opts.RateLimit.Burst != 200 || opts.MaxClients != 50 || opts.UserACL.Publish[0] != "devices/%u/#" {
		t.Fatalf("broker options %+v", opts)
	}
	var out bytes.Buffer
	if err := yaml.NewEncoder(&out).Encode(cfg); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "$2a$") || !strings.Contains(out.String(), "password_hash: <hash>") {
		t.Fatalf("printed config shows the hash:\n%s", out.String())
	}

	def := DefaultConfig()
	if def.Broker.MaxClients != 1000 || def.Broker.AuthBackoff.FreeFailures != 3 || time.Duration(def.Broker.AuthBackoff.Max) != 30*time.Second {
		t.Fatalf("broker defaults %+v", def.Broker)
	}
}
