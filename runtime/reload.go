package runtime

import (
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/runtime/router"
	"github.com/outpost-edge/outpost/storage"
)

// liveKeys are the configuration keys a reload applies while the agent
// runs; a change to any other key needs a restart.
var liveKeys = []string{"routes", "storage.max_bytes", "storage.max_messages", "storage.when_full", "storage.ttl",
	"plugins.max_concurrent", "log.level", "log.components",
	"broker.users", "broker.users_file", "broker.acl", "broker.anonymous_acl"}

// ErrNeedsRestart is returned by Reload when the new configuration changes
// a key that cannot change while the agent runs.
type ErrNeedsRestart struct{ Keys []string }

func (e *ErrNeedsRestart) Error() string {
	return fmt.Sprintf("runtime: reload refused: %s cannot change while the agent runs (restart it to apply; the backlog is kept); "+
		"nothing was applied", strings.Join(e.Keys, ", "))
}

// withLive returns next with the live keys of cur, so that what is left to
// compare is what needs a restart.
func withLive(next, cur Config) Config {
	next.Routes = cur.Routes
	next.Storage.MaxBytes, next.Storage.MaxMessages = cur.Storage.MaxBytes, cur.Storage.MaxMessages
	next.Storage.WhenFull, next.Storage.TTL = cur.Storage.WhenFull, cur.Storage.TTL
	next.Plugins.MaxConcurrent = cur.Plugins.MaxConcurrent
	next.Log.Level, next.Log.Components = cur.Log.Level, cur.Log.Components
	next.Broker.Users, next.Broker.UsersFile = cur.Broker.Users, cur.Broker.UsersFile
	next.Broker.ACL, next.Broker.AnonymousACL = cur.Broker.ACL, cur.Broker.AnonymousACL
	return next
}

// Changes lists the keys whose values differ between c and next, as YAML
// paths (uplink.azure.host, routes); live reports whether each can
// change while the agent runs.
func (c *Config) Changes(next *Config) (live, restart []string) {
	fixed := withLive(*next, *c)
	restart = diffPaths("", toTree(*c), toTree(fixed))
	all := diffPaths("", toTree(*c), toTree(*next))
	for _, k := range all {
		if !slices.Contains(restart, k) {
			live = append(live, k)
		}
	}
	return live, restart
}

// toTree is c as YAML's generic tree.
func toTree(c Config) any {
	b, err := yaml.Marshal(c)
	if err != nil {
		return nil
	}
	var t any
	_ = yaml.Unmarshal(b, &t)
	return t
}

// diffPaths returns the paths where a and b differ; maps are walked, other
// values (lists included) compared whole.
func diffPaths(prefix string, a, b any) []string {
	am, aok := a.(map[string]any)
	bm, bok := b.(map[string]any)
	if !aok || !bok {
		if reflect.DeepEqual(a, b) {
			return nil
		}
		return []string{prefix}
	}
	keys := map[string]bool{}
	for k := range am {
		keys[k] = true
	}
	for k := range bm {
		keys[k] = true
	}
	var out []string
	for k := range keys {
		p := k
		if prefix != "" {
			p = prefix + "." + k
		}
		out = append(out, diffPaths(p, am[k], bm[k])...)
	}
	sort.Strings(out)
	return out
}

// Reload applies next, a valid configuration, while the agent runs: the
// routes, the outbox's caps and TTL, the bound on requests served at once,
// and the local broker's users and ACLs. Connections stay up, but for the
// clients of a removed user or a changed password. Log levels are the caller's (it owns the
// logger). If next changes any other key, nothing is applied and the
// error is an *ErrNeedsRestart naming the keys. It returns the keys
// changed.
func (a *Agent) Reload(next Config) ([]string, error) {
	if err := next.Validate(); err != nil {
		return nil, fmt.Errorf("runtime: reload refused, the configuration is not valid (nothing was applied): %w", err)
	}
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	live, restart := a.cfg.Changes(&next)
	// The users' hashes do not show in the YAML tree (they print
	// redacted), nor does the content of users_file: compare them as
	// loaded.
	users, err := next.BrokerUsers()
	if err != nil {
		return nil, fmt.Errorf("runtime: reload refused, the configuration is not valid (nothing was applied): %w", err)
	}
	usersChanged := !reflect.DeepEqual(users, a.users)
	if usersChanged && !slices.Contains(live, "broker.users") {
		live = append(live, "broker.users")
	}
	if len(restart) > 0 {
		return nil, &ErrNeedsRestart{Keys: restart}
	}
	if len(live) == 0 {
		return nil, nil
	}
	routes, rules := routesOf(next.Routes)
	rt, err := router.New(rules)
	if err != nil {
		return nil, fmt.Errorf("runtime: reload: %w", err)
	}
	if usersChanged || !reflect.DeepEqual(next.Broker.ACL, a.cfg.Broker.ACL) ||
		!reflect.DeepEqual(next.Broker.AnonymousACL, a.cfg.Broker.AnonymousACL) {
		// First, so that a refusal leaves everything as it was.
		bo := brokerOptions(&next, users)
		if _, err := a.broker.SetUsers(bo.Users, bo.UserACL, bo.AnonymousACL); err != nil {
			return nil, fmt.Errorf("runtime: reload refused (nothing was applied): %w", err)
		}
		a.users = users
		a.cfg.Broker.Users, a.cfg.Broker.UsersFile = next.Broker.Users, next.Broker.UsersFile
		a.cfg.Broker.ACL, a.cfg.Broker.AnonymousACL = next.Broker.ACL, next.Broker.AnonymousACL
	}
	if err := a.outbox.Reconfigure(routes, limitsOf(next.Storage)); err != nil {
		return nil, fmt.Errorf("runtime: reload: %w", err)
	}
	a.router.Store(rt)
	if a.dispatch != nil {
		a.dispatch.SetLimit(next.Plugins.MaxConcurrent)
	}
	// Only the live keys change: other goroutines read the rest of cfg.
	a.cfg.Routes = next.Routes
	a.cfg.Storage.MaxBytes, a.cfg.Storage.MaxMessages = next.Storage.MaxBytes, next.Storage.MaxMessages
	a.cfg.Storage.WhenFull, a.cfg.Storage.TTL = next.Storage.WhenFull, next.Storage.TTL
	a.cfg.Plugins.MaxConcurrent = next.Plugins.MaxConcurrent
	a.cfg.Log.Level, a.cfg.Log.Components = next.Log.Level, next.Log.Components
	a.log.Info("configuration reloaded", "changed", live)
	return live, nil
}

// routesOf splits the routes into the outbox's and the router's.
func routesOf(cfg []RouteConfig) ([]storage.Route, []router.Rule) {
	routes := make([]storage.Route, len(cfg))
	rules := make([]router.Rule, len(cfg))
	for i, r := range cfg {
		routes[i] = storage.Route{Name: r.Name, Priority: r.Priority, TTL: time.Duration(r.TTL)}
		rules[i] = router.Rule{Route: r.Name, Match: r.Match}
	}
	return routes, rules
}

// limitsOf is the outbox's limits in s.
func limitsOf(s StorageConfig) storage.Limits {
	l := storage.Limits{MaxBytes: int64(s.MaxBytes), MaxMessages: s.MaxMessages, TTL: time.Duration(s.TTL), WhenFull: storage.DropOldest}
	if s.WhenFull == "reject_new" {
		l.WhenFull = storage.RejectNew
	}
	return l
}

// match is the current router's Match.
func (a *Agent) match(topic string) (string, bool) { return a.router.Load().Match(topic) }
