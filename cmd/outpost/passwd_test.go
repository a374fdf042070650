package main

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// hashWith runs 'outpost passwd' with the password on a pipe.
func hashWith(t *testing.T, password string, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"passwd"}, args...)...)
	cmd.Stdin = strings.NewReader(password + "\n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("outpost passwd: %v\n%s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "$") {
		t.Fatalf("outpost passwd printed %q, want one hash line", out)
	}
	return lines[0]
}

// connectAs logs in to addr with MQTT 5 and returns the CONNACK's reason
// code.
func connectAs(t *testing.T, addr, username, password string) byte {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := paho.NewClient(paho.ClientConfig{ClientID: username, Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := c.Connect(ctx, &paho.Connect{ClientID: username, CleanStart: true, KeepAlive: 30,
		Username: username, UsernameFlag: true, Password: []byte(password), PasswordFlag: true})
	if ack == nil {
		t.Fatalf("login as %s: no CONNACK: %v", username, err)
	}
	if err == nil {
		_ = c.Disconnect(&paho.Disconnect{})
	}
	return ack.ReasonCode
}

// TestPasswdHashLogsIn: the hashes 'outpost passwd' prints (bcrypt and
// argon2id) let the agent's broker admit the right password and refuse a
// wrong one; a password on the command line is refused.
func TestPasswdHashLogsIn(t *testing.T) {
	bc := hashWith(t, "correct horse", "--cost", "4")
	ar := hashWith(t, "battery staple", "--argon2id")
	if !strings.HasPrefix(bc, "$2a$04$") || !strings.HasPrefix(ar, "$argon2id$v=19$") {
		t.Fatalf("hashes %q and %q", bc, ar)
	}
	config := fmt.Sprintf(`broker:
  users:
    - {username: device-a, password_hash: '%s'}
    - {username: device-b, password_hash: '%s'}
  acl: {publish: ['devices/%%u/#'], subscribe: ['devices/%%u/#']}
`, bc, ar)
	p := startAgentConfig(t, config, "")
	tests := []struct {
		user, password string
		want           byte
	}{
		{"device-a", "correct horse", 0},
		{"device-b", "battery staple", 0},
		{"device-a", "battery staple", 0x86},
		{"device-b", "correct horse ", 0x86},
	}
	for _, tc := range tests {
		if got := connectAs(t, p.addr, tc.user, tc.password); got != tc.want {
			t.Errorf("login as %s with %q: CONNACK 0x%02x, want 0x%02x", tc.user, tc.password, got, tc.want)
		}
	}

	code, _, stderr := cli(t, "passwd", "hunter2")
	if code != 2 || !strings.Contains(stderr, "never taken from the command line") {
		t.Fatalf("outpost passwd hunter2: exit %d, %q; want 2 and a refusal", code, stderr)
	}
}
