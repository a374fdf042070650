package broker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/outpost-edge/outpost/runtime/router"
)

// ACL lists the topic filters a client may publish to and subscribe to.
// A filter may contain %u (the client's username) and %c (its client id);
// a filter whose substituted value is empty or contains '/', '+' or '#'
// matches nothing, so that a username or client id cannot widen it.
type ACL struct {
	// Publish are the filters of the topics the client may publish to.
	Publish []string
	// Subscribe are the filters the client may subscribe to (a
	// subscription must lie within one of them) and the topics it may
	// receive.
	Subscribe []string
}

// CheckACLFilter reports whether f is a valid ACL filter: an MQTT topic
// filter in which % appears only as %u or %c.
func CheckACLFilter(f string) error {
	if f == "" {
		return errors.New("broker: empty ACL filter")
	}
	rest := f
	for {
		i := strings.IndexByte(rest, '%')
		if i < 0 {
			break
		}
		if i+1 >= len(rest) || (rest[i+1] != 'u' && rest[i+1] != 'c') {
			return fmt.Errorf("broker: ACL filter %q: %% must be followed by u (username) or c (client id)", f)
		}
		rest = rest[i+2:]
	}
	if err := router.ValidFilter(strings.NewReplacer("%u", "x", "%c", "x").Replace(f)); err != nil {
		return fmt.Errorf("broker: ACL filter %q is not a valid MQTT topic filter: %w", f, err)
	}
	return nil
}

// pattern is a checked ACL filter.
type pattern struct {
	filter       string
	user, client bool // contains %u, %c
}

// aclRules is a compiled ACL. A nil *aclRules allows everything.
type aclRules struct {
	publish, subscribe []pattern
}

func compileACL(acls ...ACL) (*aclRules, error) {
	r := &aclRules{}
	var errs []error
	add := func(dst *[]pattern, filters []string) {
		for _, f := range filters {
			if err := CheckACLFilter(f); err != nil {
				errs = append(errs, err)
				continue
			}
			*dst = append(*dst, pattern{filter: f, user: strings.Contains(f, "%u"), client: strings.Contains(f, "%c")})
		}
	}
	for _, a := range acls {
		add(&r.publish, a.Publish)
		add(&r.subscribe, a.Subscribe)
	}
	return r, errors.Join(errs...)
}

// expand substitutes the identity into p; false when a substituted value
// would be empty or a topic level separator or wildcard.
func (p pattern) expand(user, client string) (string, bool) {
	if !p.user && !p.client {
		return p.filter, true
	}
	if (p.user && !safeLevel(user)) || (p.client && !safeLevel(client)) {
		return "", false
	}
	return strings.NewReplacer("%u", user, "%c", client).Replace(p.filter), true
}

// safeLevel reports whether s may stand for one topic level in a filter:
// not empty, no '/', '+' or '#', and not beginning with '$' (a client id
// "$SYS" would turn "%c/#" into "$SYS/#").
func safeLevel(s string) bool {
	return s != "" && !strings.ContainsAny(s, "/+#") && !strings.HasPrefix(s, "$")
}

// allowPublish reports whether the rules let the identity publish to topic.
func (r *aclRules) allowPublish(user, client, topic string) bool {
	if r == nil {
		return true
	}
	for _, p := range r.publish {
		if f, ok := p.expand(user, client); ok && topicMatches(f, topic) {
			return true
		}
	}
	return false
}

// allowSubscribe reports whether the rules let the identity subscribe to
// filter (which must lie within an allowed filter) or, for a topic name,
// receive it. A shared subscription ($share/group/filter, the prefix in any
// case, as mochi takes it) is checked by its filter.
func (r *aclRules) allowSubscribe(user, client, filter string) bool {
	if r == nil {
		return true
	}
	if len(filter) >= len("$share/") && strings.EqualFold(filter[:len("$share/")], "$share/") {
		_, f, found := strings.Cut(filter[len("$share/"):], "/")
		if !found {
			return false
		}
		filter = f
	}
	for _, p := range r.subscribe {
		if f, ok := p.expand(user, client); ok && filterCovers(f, filter) {
			return true
		}
	}
	return false
}

// topicMatches reports whether topic matches filter, as MQTT matches a
// subscription: wildcards at the first level do not match topics that
// begin with '$'.
func topicMatches(filter, topic string) bool {
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(filter, "+") || strings.HasPrefix(filter, "#")) {
		return false
	}
	for {
		fl, frest, fmore := strings.Cut(filter, "/")
		if fl == "#" {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		if !fmore || !tmore {
			// "a/#" also matches "a" [MQTT-4.7.1-2].
			return fmore == tmore || (fmore && frest == "#")
		}
		filter, topic = frest, trest
	}
}

// filterCovers reports whether every topic that sub matches is matched by
// allowed. A topic name (no wildcards) is covered when it matches.
func filterCovers(allowed, sub string) bool {
	if strings.HasPrefix(sub, "$") != strings.HasPrefix(allowed, "$") &&
		(strings.HasPrefix(allowed, "+") || strings.HasPrefix(allowed, "#")) {
		// A first-level wildcard in allowed does not reach '$' topics.
		return false
	}
	if strings.HasPrefix(sub, "+") || strings.HasPrefix(sub, "#") {
		// sub reaches non-'$' topics only; allowed must be a wildcard
		// there too (a literal first level cannot cover it).
		if !strings.HasPrefix(allowed, "+") && !strings.HasPrefix(allowed, "#") {
			return false
		}
	}
	for {
		al, arest, amore := strings.Cut(allowed, "/")
		if al == "#" {
			return true
		}
		sl, srest, smore := strings.Cut(sub, "/")
		switch {
		case sl == "#":
			return false // allowed is narrower below this level
		case al == "+":
		case sl == "+" || al != sl:
			return false
		}
		if !amore || !smore {
			if !amore && !smore {
				return true
			}
			// sub = "a", allowed = "a/#": covered; sub = "a/#", allowed =
			// "a": not covered.
			return amore && arest == "#"
		}
		allowed, sub = arest, srest
	}
}
