package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
)

// TestNoSecretsInLogs: the agent, at debug level, with every dialect's
// credentials configured and used (an Azure SAS key against outpost hub,
// a Watson token, a password in the uplink's URL and in uplink.password),
// never writes a secret to its log, in text or JSON; nor does `outpost
// config print`.
func TestNoSecretsInLogs(t *testing.T) {
	mosqtest.Require(t, "mosquitto")
	const (
		rawKey   = "azure-secret-device-key-0042"
		token    = "watson-secret-token-0042"
		password = "uplink-secret-password-0042"
		urlPass  = "url-secret-password-0042"
	)
	key := base64.StdEncoding.EncodeToString([]byte(rawKey))
	secrets := []string{rawKey, key, token, password, urlPass}

	hp := startHubProc(t, "--api", "off", "--log-level", "debug", "--device-key", "gw="+key, "--token", token)
	hubAddr, hubErr := hp.mqtt, hp.stderr
	up := mosqtest.StartT(t, mosqtest.Options{})

	cases := []struct {
		name, config, upstream, connected string
	}{
		{"azure", "uplink:\n  dialect: azure\n  azure:\n    host: outpost-hub.local\n    sas_lifetime: 10s\n    shared_access_key: " + key + "\n",
			"mqtt://" + hubAddr, "uplink connected"},
		{"watson", "uplink:\n  dialect: watson\n  watson:\n    org: outpst\n    type: gw-type\n    token: " + token + "\n",
			"mqtt://" + hubAddr, "uplink connected"},
		{"generic", "uplink:\n  password: " + password + "\n  username: u\n",
			"mqtt://u:" + urlPass + "@" + up.Addr(), "uplink connected"},
		{"generic-refused", "uplink:\n  username: u\n", "mqtt://u:" + urlPass + "@127.0.0.1:1", "uplink connect failed"},
		{"refused", "uplink:\n  dialect: azure\n  azure:\n    host: wrong-host\n    shared_access_key: " + key + "\n",
			"mqtt://" + hubAddr, "uplink connect failed"},
	}
	for _, format := range []string{"json", "text"} {
		for _, c := range cases {
			t.Run(format+"/"+c.name, func(t *testing.T) {
				if strings.HasPrefix(c.name, "generic") {
					// A password in the URL and in uplink.password are
					// one too many: keep the URL's.
					c.config = "uplink:\n  username: u\n"
				}
				a := startAgentConfig(t, "log:\n  level: debug\n  format: "+format+"\n"+c.config, c.upstream)
				waitFor(t, 20*time.Second, func() error {
					if !strings.Contains(a.stderr.String(), c.connected) {
						return fmt.Errorf("no %q yet", c.connected)
					}
					return nil
				})
				if c.name == "azure" {
					// A re-authentication signs again (at 4/5 of 10s).
					waitFor(t, 20*time.Second, func() error {
						if !strings.Contains(a.stderr.String(), "re-authenticated") {
							return fmt.Errorf("no re-authentication yet")
						}
						return nil
					})
				}
				if err := a.cmd.Process.Signal(syscall.SIGINT); err != nil {
					t.Fatal(err)
				}
				<-a.exited
				a.cmd = nil
				log := a.stderr.String()
				for _, s := range secrets {
					if strings.Contains(log, s) {
						t.Errorf("the log shows the secret %q:\n%s", s, log)
					}
				}
			})
		}
	}
	for _, s := range secrets {
		if strings.Contains(hubErr.String(), s) {
			t.Errorf("the hub's log shows the secret %q", s)
		}
	}

	// config print.
	p := filepath.Join(t.TempDir(), "c.yaml")
	cfg := "uplink:\n  dialect: azure\n  url: mqtt://u:" + urlPass + "@hub:8883\n  azure:\n    shared_access_key: " + key + "\n"
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := cli(t, "config", "print", p)
	if code != 0 {
		t.Fatalf("config print: %d %s", code, stderr)
	}
	for _, s := range secrets {
		if strings.Contains(stdout, s) {
			t.Errorf("config print shows %q:\n%s", s, stdout)
		}
	}
	if !strings.Contains(stdout, "<redacted>") {
		t.Errorf("config print does not say what it redacted:\n%s", stdout)
	}
}
