package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
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

// TestReloadUsers: a changed users_file applies live: the old password
// no longer logs in, the new one does, and the reload says so.
func TestReloadUsers(t *testing.T) {
	mosqtest.Require(t, "mosquitto", "mosquitto_pub")
	dir := t.TempDir()
	usersFile := dir + "/users.yaml"
	write := func(pw string) {
		t.Helper()
		users := "users:\n  - username: dev1\n    password_hash: '" + hashWith(t, pw) + "'\n    acl: {publish: ['devices/%u/#']}\n"
		if err := os.WriteFile(usersFile, []byte(users), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("first-password")
	cfg := "uplink:\n  backoff_min: 50ms\n  backoff_max: 500ms\nbroker:\n  users_file: " + usersFile + "\n"
	a := startAgentConfig(t, cfg, "mqtt://127.0.0.1:1")
	host, port, _ := strings.Cut(a.addr, ":")
	pub := func(pw string) error {
		t.Helper()
		out, err := exec.Command("mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-u", "dev1", "-P", pw,
			"-t", "devices/dev1/x", "-m", "x").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := pub("first-password"); err != nil {
		t.Fatalf("the first password before the reload: %v", err)
	}
	write("second-password")
	before := strings.Count(a.stderr.String(), "configuration reloaded")
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if strings.Count(a.stderr.String(), "configuration reloaded") == before {
			return fmt.Errorf("no reload in the log")
		}
		return nil
	})
	if !strings.Contains(a.stderr.String(), "changed=[broker.users]") {
		t.Errorf("the reload does not say the users changed:\n%s", a.stderr.String())
	}
	if err := pub("first-password"); err == nil {
		t.Error("the old password still logs in after the reload")
	}
	if err := pub("second-password"); err != nil {
		t.Errorf("the new password: %v", err)
	}
}
