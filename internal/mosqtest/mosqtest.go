// Package mosqtest runs a real Mosquitto broker on a free loopback port, for
// tests and for the benchmark harness.
package mosqtest

import (
	"bufio"
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
	"syscall"
	"testing"
	"time"
)

// Require fails the test when a tool is missing and CI=true, and skips it
// otherwise, saying how to install it.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := LookPath(tool); err != nil {
			msg := fmt.Sprintf("%s is missing: install with: apt-get install -y mosquitto mosquitto-clients (or run make test)", tool)
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

// LookPath finds a tool on PATH or in /usr/sbin, where Debian puts mosquitto.
func LookPath(tool string) (string, error) {
	if p, err := exec.LookPath(tool); err == nil {
		return p, nil
	}
	p := filepath.Join("/usr/sbin", tool)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("mosqtest: %s not found", tool)
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Eventually calls fn every interval until it returns nil or timeout passes,
// and then returns fn's last error.
func Eventually(timeout, every time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		time.Sleep(every)
	}
}

// Options configure a broker.
type Options struct {
	Port             int    // 0 = a free port
	Persistence      bool   // save sessions and queued messages in DataDir
	AutosaveInterval int    // seconds; 0 = Mosquitto's default (1800)
	Extra            string // configuration lines appended as they are, e.g. a bridge
	DataDir          string // default: a new temporary directory
}

// Broker is one Mosquitto process. Its methods are not safe for concurrent
// use.
type Broker struct {
	opts    Options
	port    int
	dir     string
	ownDir  bool
	conf    string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// Start writes a configuration and starts Mosquitto, returning once the port
// accepts connections.
func Start(opts Options) (*Broker, error) {
	b := &Broker{opts: opts, port: opts.Port, dir: opts.DataDir}
	if b.dir == "" {
		d, err := os.MkdirTemp("", "mosqtest")
		if err != nil {
			return nil, err
		}
		b.dir, b.ownDir = d, true
	}
	if b.port == 0 {
		p, err := FreePort()
		if err != nil {
			return nil, err
		}
		b.port = p
	}
	b.conf = filepath.Join(b.dir, "mosquitto.conf")
	b.logPath = filepath.Join(b.dir, "mosquitto.log")
	var c strings.Builder
	fmt.Fprintf(&c, "listener %d 127.0.0.1\nallow_anonymous true\n", b.port)
	// Mosquitto started as root drops to the user mosquitto unless told not to.
	c.WriteString("user root\n")
	fmt.Fprintf(&c, "log_dest file %s\nlog_type error\nlog_type warning\nlog_type notice\n", b.logPath)
	c.WriteString("max_queued_messages 0\nmax_queued_bytes 0\nqueue_qos0_messages true\nmax_inflight_messages 1000\n")
	if opts.Persistence {
		fmt.Fprintf(&c, "persistence true\npersistence_location %s/\n", b.dir)
		if opts.AutosaveInterval > 0 {
			fmt.Fprintf(&c, "autosave_interval %d\n", opts.AutosaveInterval)
		}
	}
	if opts.Extra != "" {
		c.WriteString(opts.Extra + "\n")
	}
	if err := os.WriteFile(b.conf, []byte(c.String()), 0o600); err != nil {
		return nil, err
	}
	if err := b.start(); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// StartT starts a broker for a test (see Require) and closes it with the test.
func StartT(t testing.TB, opts Options) *Broker {
	t.Helper()
	Require(t, "mosquitto")
	b, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

func (b *Broker) start() error {
	bin, err := LookPath("mosquitto")
	if err != nil {
		return err
	}
	var lastErr error
	// The port may linger briefly after a restart: retry.
	for attempt := 0; attempt < 50; attempt++ {
		cmd := exec.Command(bin, "-c", b.conf)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("mosqtest: start: %w", err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		err := Eventually(10*time.Second, 10*time.Millisecond, func() error {
			select {
			case <-done:
				return errExited
			default:
			}
			c, err := net.Dial("tcp", b.Addr())
			if err != nil {
				return err
			}
			c.Close()
			return nil
		})
		if err == nil {
			b.mu.Lock()
			b.cmd, b.done = cmd, done
			b.mu.Unlock()
			return nil
		}
		_ = cmd.Process.Kill()
		<-done
		lastErr = fmt.Errorf("mosqtest: mosquitto did not start: %w\n%s%s", err, out.String(), b.LogTail(20))
		if !errors.Is(err, errExited) {
			return lastErr
		}
		time.Sleep(100 * time.Millisecond)
	}
	return lastErr
}

var errExited = errors.New("mosquitto exited")

// Addr returns "127.0.0.1:PORT".
func (b *Broker) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port)) }

// Port returns the broker's port.
func (b *Broker) Port() int { return b.port }

// URL returns "mqtt://127.0.0.1:PORT".
func (b *Broker) URL() string { return "mqtt://" + b.Addr() }

// Pid returns the process id, or 0 when stopped.
func (b *Broker) Pid() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return 0
	}
	return b.cmd.Process.Pid
}

func (b *Broker) signal(sig os.Signal) error {
	b.mu.Lock()
	cmd, done := b.cmd, b.done
	b.cmd, b.done = nil, nil
	b.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("mosqtest: signal: %w", err)
	}
	select {
	case <-done:
		return nil
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		return errors.New("mosqtest: mosquitto did not stop within 15s; killed")
	}
}

// Stop stops Mosquitto with SIGINT (like SIGTERM, it saves persistence) and
// waits.
func (b *Broker) Stop() error { return b.signal(os.Interrupt) }

// Kill stops Mosquitto with SIGKILL and waits.
func (b *Broker) Kill() error { return b.signal(os.Kill) }

// Reload sends SIGHUP: Mosquitto reads its configuration again, including
// the ACL and password files, without dropping connections.
func (b *Broker) Reload() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return errors.New("mosqtest: reload: not running")
	}
	if err := b.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		return fmt.Errorf("mosqtest: reload: %w", err)
	}
	return nil
}

// Restart starts Mosquitto again on the same port with the same data.
func (b *Broker) Restart() error {
	if err := b.Stop(); err != nil {
		return err
	}
	return b.start()
}

// Close stops Mosquitto and removes the directory it created.
func (b *Broker) Close() {
	_ = b.Kill()
	if b.ownDir {
		os.RemoveAll(b.dir)
	}
}

// LogTail returns the last n lines of Mosquitto's log.
func (b *Broker) LogTail(n int) string {
	data, _ := os.ReadFile(b.logPath)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Sub is a mosquitto_sub process of a test: an outside client that prints
// what the broker delivers, one line per message in its -F format.
type Sub struct {
	mu     sync.Mutex
	lines  []string
	probe  string
	cursor int // WaitNext's position in Lines
}

// Subscribe runs mosquitto_sub (MQTT 5, QoS 1, retain as published) on the
// broker at addr for filters, printing each message with format, and
// returns once the subscription delivers. It stops with the test.
func Subscribe(t testing.TB, addr, format string, filters ...string) *Sub {
	t.Helper()
	Require(t, "mosquitto_sub", "mosquitto_pub")
	host, port, _ := net.SplitHostPort(addr)
	s := &Sub{probe: fmt.Sprintf("mosqtest/probe/%d", time.Now().UnixNano())}
	args := []string{"-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "--retain-as-published", "-F", "%t\x1f" + format, "-t", s.probe}
	for _, f := range filters {
		args = append(args, "-t", f)
	}
	bin, _ := LookPath("mosquitto_sub")
	cmd := exec.Command(bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.mu.Lock()
			s.lines = append(s.lines, sc.Text())
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		_ = cmd.Wait()
	})
	pub, _ := LookPath("mosquitto_pub")
	err = Eventually(10*time.Second, 100*time.Millisecond, func() error {
		if out, err := exec.Command(pub, "-h", host, "-p", port, "-t", s.probe, "-m", "probe").CombinedOutput(); err != nil {
			return fmt.Errorf("mosquitto_pub: %v %s", err, out)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, l := range s.lines {
			if strings.HasPrefix(l, s.probe+"\x1f") {
				return nil
			}
		}
		return errors.New("the probe did not arrive")
	})
	if err != nil {
		t.Fatalf("mosquitto_sub not subscribed: %v (stderr: %s)", err, stderr.String())
	}
	return s
}

// Lines returns the lines printed so far, without the probes, each as
// "topic|" and the line in the Subscribe format.
func (s *Sub) Lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, l := range s.lines {
		topic, rest, _ := strings.Cut(l, "\x1f")
		if topic != s.probe {
			out = append(out, topic+"|"+rest)
		}
	}
	return out
}

// Wait returns the first line that contains substr,
// waiting at most timeout.
func (s *Sub) Wait(t testing.TB, timeout time.Duration, substr string) string {
	t.Helper()
	var found string
	err := Eventually(timeout, 10*time.Millisecond, func() error {
		for _, l := range s.Lines() {
			if strings.Contains(l, substr) {
				found = l
				return nil
			}
		}
		return errors.New("no such line")
	})
	if err != nil {
		t.Fatalf("mosquitto_sub printed no line with %q within %s; it printed:\n%s", substr, timeout, strings.Join(s.Lines(), "\n"))
	}
	return found
}

// WaitNext is Wait for a line after the one WaitNext returned last: the
// lines are taken in order, each once.
func (s *Sub) WaitNext(t testing.TB, timeout time.Duration, substr string) string {
	t.Helper()
	var found string
	err := Eventually(timeout, 10*time.Millisecond, func() error {
		lines := s.Lines()
		s.mu.Lock()
		defer s.mu.Unlock()
		for i := s.cursor; i < len(lines); i++ {
			if strings.Contains(lines[i], substr) {
				found, s.cursor = lines[i], i+1
				return nil
			}
		}
		return errors.New("no such line")
	})
	if err != nil {
		t.Fatalf("mosquitto_sub printed no new line with %q within %s; it printed:\n%s", substr, timeout, strings.Join(s.Lines(), "\n"))
	}
	return found
}
