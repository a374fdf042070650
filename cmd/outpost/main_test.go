package main

// Black-box tests of the outpost binary: it is built once, run as a child
// process against a real Mosquitto upstream, and killed with SIGKILL.

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/runtime"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outpost-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "outpost")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building outpost: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agentProc is the agent running as a child process. Restarts keep the
// port and the data directory.
type agentProc struct {
	t      *testing.T
	args   []string
	addr   string
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	stderr *lockedBuffer
}

// lockedBuffer is the agent's stderr, read while the agent writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startAgent(t *testing.T, upstream string, extra ...string) *agentProc {
	t.Helper()
	return startAgentConfig(t, "uplink:\n  backoff_min: 50ms\n  backoff_max: 500ms\n", upstream, extra...)
}

// startAgentConfig starts the agent with the configuration file config.
func startAgentConfig(t *testing.T, config, upstream string, extra ...string) *agentProc {
	t.Helper()
	port, err := mosqtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "outpost.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProc{t: t, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
	p.args = append([]string{"run", "--config", cfg, "--listen", p.addr, "--data", filepath.Join(dir, "data"),
		"--device-id", "gw", "--log-format", "text", "--upstream", upstream}, extra...)
	p.start()
	t.Cleanup(func() {
		if p.cmd != nil {
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", p.stderr.String())
		}
	})
	return p
}

func (p *agentProc) start() {
	p.t.Helper()
	p.cmd = exec.Command(binary, p.args...)
	if p.stderr == nil {
		p.stderr = &lockedBuffer{}
	}
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	exited := make(chan struct{})
	p.exited = exited
	cmd := p.cmd
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	err := mosqtest.Eventually(15*time.Second, 20*time.Millisecond, func() error {
		select {
		case <-exited:
			return errors.New("agent exited")
		default:
		}
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			return err
		}
		c.Close()
		return nil
	})
	if err != nil {
		p.t.Fatalf("agent not ready: %v\n%s", err, p.stderr.String())
	}
}

// kill sends SIGKILL and reaps the process.
func (p *agentProc) kill() {
	p.t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		p.t.Fatal(err)
	}
	<-p.exited
}

func waitFor(t *testing.T, timeout time.Duration, fn func() error) {
	t.Helper()
	if err := mosqtest.Eventually(timeout, 50*time.Millisecond, fn); err != nil {
		t.Fatal(err)
	}
}

func waitAll(t *testing.T, col *mqtttest.Collector, want []string, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, func() error {
		missing := 0
		for _, p := range want {
			if !col.Has(p) {
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of %d acknowledged messages have not arrived upstream", missing, len(want))
		}
		return nil
	})
}

// TestCrashMidStream kills the agent with SIGKILL while publishers are
// mid-stream and the uplink forwards; every acknowledged message must arrive
// after the restart.
func TestCrashMidStream(t *testing.T) {
	mosqtest.Require(t, "mosquitto")
	up := mosqtest.StartT(t, mosqtest.Options{Persistence: true})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/gw/crash/#")
	a := startAgent(t, up.URL())

	var pub mqtttest.Publisher
	done := make(chan error, 1)
	go func() { done <- pub.Run(a.addr, "crash/a", 50_000, 8) }()
	waitFor(t, 60*time.Second, func() error {
		if pub.Acked() < 5000 {
			return fmt.Errorf("%d acknowledged", pub.Acked())
		}
		return nil
	})
	a.kill()
	if err := <-done; err == nil {
		t.Fatal("the publishers finished before the kill: nothing was mid-stream")
	}
	acked := pub.AckedPayloads()
	a.start()
	waitAll(t, col, acked, 120*time.Second)
	d, dups := col.Counts()
	t.Logf("killed -9 mid-stream after %d acknowledged; %d distinct arrived, %d duplicates", len(acked), d, dups)
}

// TestCrashDuringDrain kills the agent with SIGKILL while it drains a
// backlog; after the restart every acknowledged message arrives.
func TestCrashDuringDrain(t *testing.T) {
	mosqtest.Require(t, "mosquitto")
	up := mosqtest.StartT(t, mosqtest.Options{Persistence: true})
	col := mqtttest.NewCollector(t, up.URL(), "outpost/gw/drain/#")
	if err := up.Stop(); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, up.URL())
	const n = 30_000
	var pub mqtttest.Publisher
	if err := pub.Run(a.addr, "drain/a", n, 8); err != nil {
		t.Fatal(err)
	}
	if err := up.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, func() error {
		if d, _ := col.Counts(); d < 2000 {
			return fmt.Errorf("%d arrived", d)
		}
		return nil
	})
	a.kill()
	d0, _ := col.Counts()
	if d0 >= n {
		t.Fatal("the backlog drained before the kill: nothing was mid-drain")
	}
	a.start()
	waitAll(t, col, pub.AckedPayloads(), 120*time.Second)
	d, dups := col.Counts()
	t.Logf("killed -9 after %d of %d drained; %d distinct arrived, %d duplicates", d0, n, d, dups)
}

// TestRunRejectsBadInput checks that each bad flag or file stops the agent
// with exit code 2 and a message naming what is wrong.
func TestRunRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("storage:\n  durability: sometimes\n  when_full: panic\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"malformed url", []string{"run", "--upstream", "http//broker:1883"}, []string{"uplink.url", "scheme must be mqtt or mqtts"}},
		{"url without port", []string{"run", "--upstream", "mqtt://broker"}, []string{"uplink.url", "port"}},
		{"durability flag", []string{"run", "--durability", "sync"}, []string{"storage.durability", `"sync" is not one of process, fsync`}},
		{"bad listen", []string{"run", "--listen", "1883"}, []string{"broker.listeners[0].address"}},
		{"config file", []string{"run", "--config", bad}, []string{bad, "storage.durability", "storage.when_full"}},
		{"missing config", []string{"run", "--config", filepath.Join(dir, "nope.yaml")}, []string{"no such file"}},
		{"unknown command", []string{"fly"}, []string{`unknown command "fly"`}},
		{"validate", []string{"config", "validate", bad}, []string{"storage.durability"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(binary, tc.args...)
			cmd.Env = append(os.Environ(), "OUTPOST_DATA="+filepath.Join(dir, "data"))
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("exit %v, want failure; output:\n%s", err, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("output does not contain %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestConfigValidateAndPrint(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ok.yaml")
	if err := os.WriteFile(p, []byte("uplink:\n  url: mqtt://127.0.0.1:1883\n  password: s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary, "config", "validate", p).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "valid") {
		t.Fatalf("validate: %v: %s", err, out)
	}
	out, err = exec.Command(binary, "config", "print", p).CombinedOutput()
	if err != nil {
		t.Fatalf("print: %v: %s", err, out)
	}
	if strings.Contains(string(out), "s3cret") || !strings.Contains(string(out), "durability: process") {
		t.Fatalf("print leaked the password or lost the defaults:\n%s", out)
	}
}

// TestHintsCallAMethod: the hints call the echo example (else the first
// method), and none when the handlers are all commands.
func TestHintsCallAMethod(t *testing.T) {
	var b strings.Builder
	printHints(&b, runtime.DefaultConfig(), "127.0.0.1:1883", "", []string{"command:setpoint", "method:device.lock", "method:echo"}, nil)
	if !strings.Contains(b.String(), "-t outpost/methods/echo ") || strings.Contains(b.String(), "outpost/methods/command:") {
		t.Fatalf("hints:\n%s", b.String())
	}
	b.Reset()
	printHints(&b, runtime.DefaultConfig(), "127.0.0.1:1883", "", []string{"command:setpoint"}, nil)
	if strings.Contains(b.String(), "mosquitto_rr") {
		t.Fatalf("hints call a method where there is none:\n%s", b.String())
	}
}
