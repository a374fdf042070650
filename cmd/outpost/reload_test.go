package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
)

// TestReloadOnSIGHUP: SIGHUP applies a changed route while a local client
// stays connected; an invalid file, or one that changes what cannot
// change live, is refused with a message that says why, and the running
// configuration stays.
func TestReloadOnSIGHUP(t *testing.T) {
	mosqtest.Require(t, "mosquitto")
	up := mosqtest.StartT(t, mosqtest.Options{})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/gw/#")
	base := "uplink:\n  backoff_min: 50ms\n  backoff_max: 500ms\n"
	v1 := base + "routes:\n  - {name: plant, match: [plant/#]}\n"
	a := startAgentConfig(t, v1, up.URL())
	cfgPath := a.args[2]

	c := mqtttest.Client(t, a.addr, "line-controller")
	publish := func(topic, payload string) {
		t.Helper()
		// The same connection throughout: a PUBACK means it is still up.
		if _, err := c.Publish(context.Background(), &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)}); err != nil {
			t.Fatalf("publish %s on the client connected before the reloads: %v", topic, err)
		}
	}
	hup := func(config, wantLog string) {
		t.Helper()
		if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
		before := strings.Count(a.stderr.String(), wantLog)
		if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, func() error {
			if strings.Count(a.stderr.String(), wantLog) == before {
				return fmt.Errorf("no %q in the log after SIGHUP", wantLog)
			}
			return nil
		})
	}

	publish("plant/a", "plant-1")
	publish("other/a", "other-before") // no route: local only
	waitFor(t, 10*time.Second, func() error {
		if !col.Has("plant-1") {
			return fmt.Errorf("plant-1 not forwarded")
		}
		return nil
	})

	hup(v1+"  - {name: other, match: [other/#], priority: 5}\n", "configuration reloaded")
	if !strings.Contains(a.stderr.String(), "changed=[routes]") {
		t.Errorf("the reload does not say what changed:\n%s", a.stderr.String())
	}
	publish("other/a", "other-after")
	waitFor(t, 10*time.Second, func() error {
		if !col.Has("other-after") {
			return fmt.Errorf("other-after not forwarded after the reload")
		}
		return nil
	})
	if col.Has("other-before") {
		t.Error("a message published before its route existed was forwarded")
	}

	// An invalid file: refused, the running routes stay.
	hup(base+"routes:\n  - {name: broken}\n", "reload refused, the configuration is not valid")
	if !strings.Contains(a.stderr.String(), "routes[0].match") {
		t.Errorf("the refusal does not name the bad key:\n%s", a.stderr.String())
	}
	publish("other/a", "other-still")

	// A key that needs a restart: refused by name.
	hup(v1+"broker:\n  max_packet_size: 2048\n", "reload refused; the running configuration stays")
	if !strings.Contains(a.stderr.String(), "broker.max_packet_size cannot change while the agent runs") {
		t.Errorf("the refusal does not name broker.max_packet_size:\n%s", a.stderr.String())
	}
	publish("other/a", "other-last")
	waitFor(t, 10*time.Second, func() error {
		if !col.Has("other-still") || !col.Has("other-last") {
			return fmt.Errorf("the route added by the first reload stopped forwarding after refused ones")
		}
		return nil
	})
}

// TestReloadSeesUsers: a changed password hash, inline or in users_file,
// is not "nothing changed": the reload is refused, naming broker.users.
func TestReloadSeesUsers(t *testing.T) {
	mosqtest.Require(t, "mosquitto")
	dir := t.TempDir()
	usersFile := dir + "/users.yaml"
	hash := func(pw string) string { t.Helper(); return hashWith(t, pw) }
	write := func(pw string) {
		t.Helper()
		if err := os.WriteFile(usersFile, []byte("users:\n  - username: dev1\n    password_hash: '"+hash(pw)+"'\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("first-password")
	cfg := "uplink:\n  backoff_min: 50ms\n  backoff_max: 500ms\nbroker:\n  users_file: " + usersFile + "\n"
	a := startAgentConfig(t, cfg, "mqtt://127.0.0.1:1")
	write("second-password")
	before := strings.Count(a.stderr.String(), "broker.users cannot change")
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if strings.Count(a.stderr.String(), "broker.users cannot change") == before {
			return fmt.Errorf("no refusal naming broker.users after a changed users_file")
		}
		return nil
	})
}
