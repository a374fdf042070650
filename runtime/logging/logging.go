// Package logging builds the agent's slog logger: text on a terminal and
// JSON otherwise, a level per component that can change while the agent
// runs, and secrets redacted from every record, whatever logs it.
package logging

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
)

// Redacted replaces a secret in the logs.
const Redacted = "<redacted>"

// Options configure a logger.
type Options struct {
	Format string // auto (text on a terminal, else JSON), text, json
	Level  string // debug, info, warn, error: the default level
	// Components are levels by component (the "component" attribute of a
	// record, such as uplink, broker, plugins), over Level.
	Components map[string]string
	// Secrets are values that never appear in a record: any attribute or
	// message that holds one has it replaced by Redacted. Empty values and
	// values shorter than 4 bytes are ignored (they would match too much).
	Secrets []string
	// Terminal reports whether the output is a terminal, for Format auto;
	// nil = stderr is one.
	Terminal func() bool
}

// ParseLevel parses debug, info, warn or error.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	switch s {
	case "debug", "info", "warn", "error":
		err := l.UnmarshalText([]byte(s))
		return l, err
	}
	return 0, fmt.Errorf("log level %q is not one of debug, info, warn, error", s)
}

// Logger is a logger whose levels can change while it is used.
type Logger struct {
	*slog.Logger
	levels *levels
}

// New returns a logger writing to w.
func New(w io.Writer, o Options) (*Logger, error) {
	lv := &levels{}
	if err := lv.set(o.Level, o.Components); err != nil {
		return nil, err
	}
	format := o.Format
	if format == "auto" || format == "" {
		format = "json"
		term := o.Terminal
		if term == nil {
			term = stderrIsTerminal
		}
		if term() {
			format = "text"
		}
	}
	sc := newScrubber(o.Secrets)
	ho := &slog.HandlerOptions{Level: slog.LevelDebug, ReplaceAttr: sc.replaceAttr}
	var inner slog.Handler
	switch format {
	case "text":
		inner = slog.NewTextHandler(w, ho)
	case "json":
		inner = slog.NewJSONHandler(w, ho)
	default:
		return nil, fmt.Errorf("log format %q is not one of auto, text, json", o.Format)
	}
	return &Logger{Logger: slog.New(&handler{inner: inner, levels: lv, scrub: sc}), levels: lv}, nil
}

// SetLevels changes the default level and the levels by component; the
// records logged from then on follow them.
func (l *Logger) SetLevels(level string, components map[string]string) error {
	return l.levels.set(level, components)
}

func stderrIsTerminal() bool {
	fi, err := os.Stderr.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// levels are the default level and those by component, swapped whole
// by set: a log call reads them without a lock.
type levels struct{ p atomic.Pointer[levelSet] }

type levelSet struct {
	def    slog.Level
	comps  map[string]slog.Level
	lowest slog.Level // the lowest of def and comps
}

func (lv *levels) set(level string, components map[string]string) error {
	def, err := ParseLevel(level)
	if err != nil {
		return err
	}
	ls := &levelSet{def: def, comps: make(map[string]slog.Level, len(components)), lowest: def}
	for c, s := range components {
		l, err := ParseLevel(s)
		if err != nil {
			return fmt.Errorf("component %s: %w", c, err)
		}
		ls.comps[c] = l
		ls.lowest = min(ls.lowest, l)
	}
	lv.p.Store(ls)
	return nil
}

// lowest reports whether l passes the lowest of the levels.
func (lv *levels) lowest(l slog.Level) bool { return l >= lv.p.Load().lowest }

func (lv *levels) enabled(component string, l slog.Level) bool {
	ls := lv.p.Load()
	if c, ok := ls.comps[component]; ok && component != "" {
		return l >= c
	}
	return l >= ls.def
}

// handler applies the component's level and scrubs the message (attributes
// are scrubbed by the inner handler's ReplaceAttr).
type handler struct {
	inner     slog.Handler
	levels    *levels
	scrub     *scrubber
	component string
}

// Enabled: a logger without a component may log a record that names one
// (logger.Info(msg, "component", c)), so it admits the lowest level of all,
// and Handle decides.
func (h *handler) Enabled(_ context.Context, l slog.Level) bool {
	if h.component == "" {
		return h.levels.lowest(l)
	}
	return h.levels.enabled(h.component, l)
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	c := h.component
	if rc := recordComponent(r); rc != "" {
		c = rc
	}
	if !h.levels.enabled(c, r.Level) {
		return nil
	}
	if h.scrub.any() {
		if m := h.scrub.string(r.Message); m != r.Message {
			r2 := slog.NewRecord(r.Time, r.Level, m, r.PC)
			r.Attrs(func(a slog.Attr) bool { r2.AddAttrs(a); return true })
			r = r2
		}
	}
	return h.inner.Handle(ctx, r)
}

// recordComponent is a component given on the record itself.
func recordComponent(r slog.Record) string {
	var c string
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "component" {
			c = a.Value.String()
			return false
		}
		return true
	})
	return c
}

func (h *handler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	for _, a := range as {
		if a.Key == "component" {
			c.component = a.Value.String()
		}
	}
	c.inner = h.inner.WithAttrs(as)
	return &c
}

func (h *handler) WithGroup(name string) slog.Handler {
	c := *h
	c.inner = h.inner.WithGroup(name)
	return &c
}

// secretKeys are attribute keys whose values are secrets whatever they
// hold.
var secretKeys = []string{"password", "passwd", "token", "secret", "shared_access_key", "sas_key", "auth_data",
	"authorization", "signature", "private_key", "password_hash", "credential"}

// scrubber redacts secret values and the values of secret keys.
type scrubber struct {
	secrets  []string
	replacer *strings.Replacer
}

func newScrubber(secrets []string) *scrubber {
	s := &scrubber{}
	var pairs []string
	for _, v := range secrets {
		if len(v) >= 4 {
			s.secrets = append(s.secrets, v)
			pairs = append(pairs, v, Redacted)
		}
	}
	if len(pairs) > 0 {
		s.replacer = strings.NewReplacer(pairs...)
	}
	return s
}

func (s *scrubber) any() bool { return s.replacer != nil }

func (s *scrubber) string(v string) string {
	if s.replacer == nil {
		return v
	}
	return s.replacer.Replace(v)
}

func secretKey(k string) bool {
	k = strings.ToLower(k)
	for _, sk := range secretKeys {
		if strings.Contains(k, sk) {
			return true
		}
	}
	return false
}

func (s *scrubber) replaceAttr(groups []string, a slog.Attr) slog.Attr {
	if secretKey(a.Key) {
		return slog.String(a.Key, Redacted)
	}
	for _, g := range groups {
		if secretKey(g) {
			// An attribute of a group named like a secret
			// (slog.Group("password", ...)).
			return slog.String(a.Key, Redacted)
		}
	}
	switch a.Value.Kind() {
	case slog.KindString:
		if v := s.string(a.Value.String()); v != a.Value.String() {
			return slog.String(a.Key, v)
		}
	case slog.KindAny:
		switch v := a.Value.Any().(type) {
		case *url.URL:
			return slog.String(a.Key, s.string(v.Redacted()))
		case []byte:
			return slog.String(a.Key, s.string(string(v)))
		case json.RawMessage:
			return slog.String(a.Key, s.string(string(v)))
		case error:
			return slog.String(a.Key, s.string(v.Error()))
		case fmt.Stringer:
			return slog.String(a.Key, s.string(v.String()))
		default:
			if s.replacer != nil {
				str := fmt.Sprint(v)
				if r := s.string(str); r != str {
					return slog.String(a.Key, r)
				}
			}
		}
	}
	return a
}
