// Package router maps the topic of a local PUBLISH to the outbox route that
// stores it. Routes are checked in order; the first whose filter matches wins.
// A topic that matches no route stays local: it is delivered to local
// subscribers and never forwarded.
package router

import (
	"fmt"
	"strings"
)

// Rule sends every topic matching one of Match to Route.
type Rule struct {
	Route string
	Match []string // MQTT topic filters: "+" matches one level, a final "#" any number
}

// Router is an immutable, ordered list of rules. It is safe for concurrent use.
type Router struct {
	rules []compiled
}

type compiled struct {
	route  string
	levels [][]string
}

// New validates the rules and returns a Router.
func New(rules []Rule) (*Router, error) {
	r := &Router{}
	for i, rule := range rules {
		if rule.Route == "" {
			return nil, fmt.Errorf("router: rule %d: empty route name", i)
		}
		if len(rule.Match) == 0 {
			return nil, fmt.Errorf("router: route %q: no topic filter to match", rule.Route)
		}
		c := compiled{route: rule.Route}
		for _, f := range rule.Match {
			if err := ValidFilter(f); err != nil {
				return nil, fmt.Errorf("router: route %q: %w", rule.Route, err)
			}
			c.levels = append(c.levels, strings.Split(f, "/"))
		}
		r.rules = append(r.rules, c)
	}
	return r, nil
}

// Match returns the route for topic, or false when no rule matches.
func (r *Router) Match(topic string) (string, bool) {
	for _, rule := range r.rules {
		for _, f := range rule.levels {
			if matches(f, topic) {
				return rule.route, true
			}
		}
	}
	return "", false
}

// ValidFilter reports whether f is a well-formed MQTT topic filter.
func ValidFilter(f string) error {
	if f == "" {
		return fmt.Errorf("filter is empty")
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return fmt.Errorf("filter %q: '#' must be the last level", f)
		case l != "#" && l != "+" && strings.ContainsAny(l, "#+"):
			return fmt.Errorf("filter %q: wildcards must fill a whole level", f)
		}
	}
	return nil
}

// matches applies the MQTT matching rules, including that wildcards at the
// first level do not match topics starting with '$' [MQTT-4.7.2-1].
func matches(filter []string, topic string) bool {
	if strings.HasPrefix(topic, "$") && (filter[0] == "#" || filter[0] == "+") {
		return false
	}
	for i, f := range filter {
		if f == "#" {
			return true
		}
		var level string
		var more bool
		level, topic, more = strings.Cut(topic, "/")
		if f != "+" && f != level {
			return false
		}
		if !more {
			// topic is exhausted: it matches if the filter ends here, or
			// continues only with "#" (which also matches the parent level).
			rest := filter[i+1:]
			return len(rest) == 0 || (len(rest) == 1 && rest[0] == "#")
		}
	}
	return false
}
