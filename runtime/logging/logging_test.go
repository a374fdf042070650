package logging

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"testing"
)

func TestRedaction(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			var b bytes.Buffer
			l, err := New(&b, Options{Format: format, Level: "debug", Secrets: []string{"hunter2-pw", "c2FzLWtleQ==", "tok-123456", "ab"}})
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse("mqtt://user:urlpass99@host:1883")
			log := l.With("component", "uplink")
			log.Info("connecting with hunter2-pw in the message")
			log.Debug("attrs", "url", u, "error", errors.New("refused: token tok-123456 expired"),
				"password", "anything", "shared_access_key", "whatever", "auth_data", []byte{1, 2, 3},
				"detail", fmt.Sprintf("key=%s", "c2FzLWtleQ=="), "list", []string{"tok-123456"})
			log.WithGroup("g").With("token", "x").Info("grouped", "nested", "hunter2-pw")
			log.Info("more", slog.Group("password", "value", "grp-secret-77"), "raw", []byte("tok-123456"),
				"json", json.RawMessage(`{"k":"c2FzLWtleQ=="}`))
			out := b.String()
			for _, secret := range []string{"hunter2-pw", "urlpass99", "tok-123456", "c2FzLWtleQ==", "anything", "whatever", "grp-secret-77"} {
				if strings.Contains(out, secret) {
					t.Errorf("the log shows %q:\n%s", secret, out)
				}
			}
			if strings.Count(out, Redacted) < 8 {
				t.Errorf("want the secrets replaced by %s:\n%s", Redacted, out)
			}
			// Short "secrets" are ignored rather than redacting every "ab".
			l.Info("about")
			if !strings.Contains(b.String(), "about") {
				t.Error("a 2-byte secret redacted ordinary words")
			}
		})
	}
}

func TestComponentLevels(t *testing.T) {
	var b bytes.Buffer
	l, err := New(&b, Options{Format: "text", Level: "warn", Components: map[string]string{"uplink": "debug", "plugins": "error"}})
	if err != nil {
		t.Fatal(err)
	}
	l.With("component", "uplink").Debug("uplink debug")
	l.With("component", "plugins").Warn("plugins warn")
	l.With("component", "broker").Info("broker info")
	l.With("component", "broker").Warn("broker warn")
	l.Info("on the record", "component", "uplink")
	out := b.String()
	for msg, want := range map[string]bool{"uplink debug": true, "plugins warn": false, "broker info": false, "broker warn": true, "on the record": true} {
		if strings.Contains(out, msg) != want {
			t.Errorf("%q logged: %v, want %v\n%s", msg, !want, want, out)
		}
	}
	// Levels change live.
	if err := l.SetLevels("debug", nil); err != nil {
		t.Fatal(err)
	}
	l.With("component", "plugins").Debug("plugins debug now")
	if !strings.Contains(b.String(), "plugins debug now") {
		t.Error("SetLevels did not apply to a logger made before")
	}
	if err := l.SetLevels("loud", nil); err == nil || !strings.Contains(err.Error(), `"loud"`) {
		t.Errorf("a bad level: %v", err)
	}
	if _, err := New(&b, Options{Format: "xml", Level: "info"}); err == nil {
		t.Error("format xml accepted")
	}
}

func TestAutoFormat(t *testing.T) {
	for term, want := range map[bool]string{true: "level=INFO", false: `"level":"INFO"`} {
		var b bytes.Buffer
		l, err := New(&b, Options{Format: "auto", Level: "info", Terminal: func() bool { return term }})
		if err != nil {
			t.Fatal(err)
		}
		l.Info("x")
		if !strings.Contains(b.String(), want) {
			t.Errorf("terminal %v: %q, want %s", term, b.String(), want)
		}
	}
}
