// Package plugins manages the wasm handlers the agent runs: their
// manifests, signatures, the registry of installed plugins and which one
// serves each request name. The sandbox (plugins/sandbox) runs them.
package plugins

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/units"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/router"
)

// Manifest describes a plugin. It is YAML:
//
//	name: diagnostics
//	version: 1.0.0
//	sha256: 3f2a...            # of the wasm module
//	handlers:
//	  - {kind: method, name: getDiagnostics}
//	capabilities: [kv]        # kv, publish, blob, http, dm, twin
//	concurrency: stateless    # or stateful: one instance, one call at a time
//	publish_topics: []        # topic filters publish may use
//	http_hosts: []            # hosts http may download from
//	limits: {memory: 64MiB, timeout: 5s, instances: 2}
//	config: {any: yaml}       # given to the module's outpost_init as JSON
type Manifest struct {
	Name         string        `yaml:"name"`
	Version      string        `yaml:"version"`
	SHA256       string        `yaml:"sha256"`
	Handlers     []HandlerSpec `yaml:"handlers"`
	Capabilities []string      `yaml:"capabilities"`
	// Concurrency is stateless (default: a pool of instances) or stateful
	// (one instance, calls one at a time, so module state carries from
	// call to call; it is still lost when the instance fails).
	Concurrency   string   `yaml:"concurrency"`
	PublishTopics []string `yaml:"publish_topics"`
	// HTTPHosts are the hosts the http capability may download from (see
	// HostList).
	HTTPHosts HostList       `yaml:"http_hosts"`
	Limits    ManifestLimits `yaml:"limits"`
	Config    map[string]any `yaml:"config"`
	raw       []byte         // the bytes it was parsed from, which a signature covers
}

// HandlerSpec is one name a plugin serves.
type HandlerSpec struct {
	Kind string `yaml:"kind" json:"kind"` // command, method or dm_action
	Name string `yaml:"name" json:"name"`
}

// claim is what h claims in the registry. The manifest was checked, so
// its kind parses.
func (h HandlerSpec) claim() claim {
	k, _ := abi.ParseKind(h.Kind)
	return claim{k, h.Name}
}

// ManifestLimits are the limits a plugin asks for; zero takes the default.
type ManifestLimits struct {
	Memory      units.ByteSize `yaml:"memory"`
	Timeout     units.Duration `yaml:"timeout"`
	Instances   int            `yaml:"instances"`
	MaxRequest  units.ByteSize `yaml:"max_request"`
	MaxResponse units.ByteSize `yaml:"max_response"`
	KVQuota     units.ByteSize `yaml:"kv_quota"`   // key/value bytes [1 MiB]
	HTTPBytes   units.ByteSize `yaml:"http_bytes"` // the largest download [64 MiB]
}

// Capabilities a manifest may ask for.
const (
	CapKV      = "kv"
	CapPublish = "publish"
	CapBlob    = "blob"
	CapHTTP    = "http"
	CapDM      = "dm"
	CapTwin    = "twin"
)

var capabilities = []string{CapKV, CapPublish, CapBlob, CapHTTP, CapDM, CapTwin}

// CapabilityOf is the capability a module must ask for to import from the
// host module mod, or "" when mod is not a capability.
func CapabilityOf(mod string) string {
	switch mod {
	case abi.ModuleKV:
		return CapKV
	case abi.ModuleMQTT:
		return CapPublish
	case abi.ModuleBlob:
		return CapBlob
	case abi.ModuleHTTP:
		return CapHTTP
	case abi.ModuleDM:
		return CapDM
	case abi.ModuleTwin:
		return CapTwin
	}
	return ""
}

var nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// ParseManifest parses and checks a manifest. Errors name the field and
// what is allowed.
func ParseManifest(b []byte) (*Manifest, error) {
	var m Manifest
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	m.raw = b
	var errs []string
	bad := func(field, format string, a ...any) { errs = append(errs, field+": "+fmt.Sprintf(format, a...)) }
	if !nameRe.MatchString(m.Name) {
		bad("name", "%q: want 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit", m.Name)
	}
	if m.Version == "" {
		bad("version", "missing")
	}
	if s, err := hex.DecodeString(m.SHA256); err != nil || len(s) != sha256.Size {
		bad("sha256", "%q: want the 64 hex digits of the module's SHA-256", m.SHA256)
	}
	if len(m.Handlers) == 0 {
		bad("handlers", "none: a plugin must serve at least one name")
	}
	seen := map[HandlerSpec]bool{}
	for i, h := range m.Handlers {
		if _, ok := abi.ParseKind(h.Kind); !ok {
			bad(fmt.Sprintf("handlers[%d].kind", i), "%q: want command, method or dm_action", h.Kind)
		}
		if h.Name == "" || len(h.Name) > 256 || strings.ContainsAny(h.Name, "+#/\x00") {
			bad(fmt.Sprintf("handlers[%d].name", i), "%q: want 1-256 characters without '/', '+', '#'", h.Name)
		}
		if seen[h] {
			bad(fmt.Sprintf("handlers[%d]", i), "%s %q is listed twice", h.Kind, h.Name)
		}
		seen[h] = true
	}
	if m.Concurrency != "" && m.Concurrency != "stateless" && m.Concurrency != "stateful" {
		bad("concurrency", "%q: want stateless or stateful", m.Concurrency)
	}
	if m.Concurrency == "stateful" && m.Limits.Instances > 1 {
		bad("limits.instances", "%d with concurrency stateful, which has one instance", m.Limits.Instances)
	}
	for i, c := range m.Capabilities {
		if !slices.Contains(capabilities, c) {
			bad(fmt.Sprintf("capabilities[%d]", i), "%q: want one of %s", c, strings.Join(capabilities, ", "))
		}
	}
	if len(m.HTTPHosts) > 0 && !m.Has(CapHTTP) {
		bad("http_hosts", "set without the http capability")
	}
	if m.Has(CapHTTP) && len(m.HTTPHosts) == 0 {
		bad("http_hosts", "the http capability needs at least one host (\"*\" for any)")
	}
	for i, h := range m.HTTPHosts {
		if h == "" || strings.ContainsAny(h, "/?#@ ") {
			bad(fmt.Sprintf("http_hosts[%d]", i), "%q: want a host, host:port, *.domain or *", h)
		}
	}
	if m.Limits.HTTPBytes < 0 || m.Limits.HTTPBytes > 4<<30 {
		bad("limits.http_bytes", "%d: at most 4GiB", m.Limits.HTTPBytes)
	}
	if len(m.PublishTopics) > 0 && !m.Has(CapPublish) {
		bad("publish_topics", "set without the publish capability")
	}
	if m.Has(CapPublish) && len(m.PublishTopics) == 0 {
		bad("publish_topics", "the publish capability needs at least one topic filter")
	}
	for i, f := range m.PublishTopics {
		if err := router.ValidFilter(f); err != nil {
			bad(fmt.Sprintf("publish_topics[%d]", i), "%v", err)
		}
	}
	if m.Limits.Memory < 0 || m.Limits.Memory > 4<<30 || (m.Limits.Memory > 0 && m.Limits.Memory < 64<<10) {
		bad("limits.memory", "%d: want 64KiB to 4GiB", m.Limits.Memory)
	}
	if m.Limits.Timeout < 0 || m.Limits.Instances < 0 || m.Limits.MaxRequest < 0 || m.Limits.MaxResponse < 0 || m.Limits.KVQuota < 0 {
		bad("limits", "negative values are not allowed")
	}
	if time.Duration(m.Limits.Timeout) > 24*time.Hour {
		bad("limits.timeout", "%v: at most 24h", time.Duration(m.Limits.Timeout))
	}
	if m.Limits.Instances > 64 {
		bad("limits.instances", "%d: at most 64", m.Limits.Instances)
	}
	if m.Limits.MaxRequest > 64<<20 || m.Limits.MaxResponse > 64<<20 {
		bad("limits", "max_request and max_response: at most 64MiB")
	}
	if m.Limits.KVQuota > 1<<30 {
		bad("limits.kv_quota", "%d: at most 1GiB", m.Limits.KVQuota)
	}
	if len(errs) > 0 {
		return nil, errors.New("manifest: " + strings.Join(errs, "; "))
	}
	return &m, nil
}

// Has reports whether the manifest asks for capability c.
func (m *Manifest) Has(c string) bool { return slices.Contains(m.Capabilities, c) }

// CheckModule checks that wasm is the module the manifest names.
func (m *Manifest) CheckModule(wasm []byte) error {
	sum := sha256.Sum256(wasm)
	if got := hex.EncodeToString(sum[:]); !strings.EqualFold(got, m.SHA256) {
		return fmt.Errorf("plugins: %s: the module's sha256 is %s, the manifest says %s", m.Name, got, m.SHA256)
	}
	return nil
}

// sandboxConfig is the sandbox configuration the manifest asks for.
func (m *Manifest) sandboxConfig() (sandbox.Config, error) {
	var cfg []byte
	if m.Config != nil {
		b, err := json.Marshal(m.Config)
		if err != nil {
			return sandbox.Config{}, fmt.Errorf("plugins: %s: config: %w", m.Name, err)
		}
		cfg = b
	}
	instances := m.Limits.Instances
	if m.Concurrency == "stateful" {
		instances = 1
	}
	return sandbox.Config{
		Name:   m.Name,
		Config: cfg,
		Limits: sandbox.Limits{
			Memory:      uint64(m.Limits.Memory),
			Timeout:     time.Duration(m.Limits.Timeout),
			Instances:   instances,
			MaxRequest:  int(m.Limits.MaxRequest),
			MaxResponse: int(m.Limits.MaxResponse),
		},
	}, nil
}

// TrustKeys are the ed25519 public keys whose signatures are accepted.
type TrustKeys []ed25519.PublicKey

// LoadTrustKeys reads a trust.keys file: one base64 ed25519 public key per
// line, optionally followed by a comment; blank lines and lines starting
// with '#' are skipped.
func LoadTrustKeys(path string) (TrustKeys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("plugins: trust keys: %w", err)
	}
	var keys TrustKeys
	for i, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(f[0])
		if err != nil || len(k) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("plugins: %s line %d: want a base64 ed25519 public key (%d bytes)", path, i+1, ed25519.PublicKeySize)
		}
		keys = append(keys, ed25519.PublicKey(k))
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("plugins: %s holds no keys", path)
	}
	return keys, nil
}

// Verify checks sig (base64, as in a .sig file) over the manifest's bytes
// against the keys. The manifest holds the module's sha256, so the
// signature covers both.
func (k TrustKeys) Verify(m *Manifest, sig []byte) error {
	if len(sig) == 0 {
		return fmt.Errorf("plugins: %s: unsigned, and trust keys are configured: only signed plugins load", m.Name)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(sig)))
	if err != nil || len(raw) != ed25519.SignatureSize {
		return fmt.Errorf("plugins: %s: the signature is not a base64 ed25519 signature", m.Name)
	}
	for _, key := range k {
		if ed25519.Verify(key, m.raw, raw) {
			return nil
		}
	}
	return fmt.Errorf("plugins: %s: the signature does not match the manifest under any trusted key", m.Name)
}

// Sign returns the base64 signature of a manifest's bytes, for tools and
// tests.
func Sign(key ed25519.PrivateKey, manifest []byte) []byte {
	return []byte(base64.StdEncoding.EncodeToString(ed25519.Sign(key, manifest)) + "\n")
}
