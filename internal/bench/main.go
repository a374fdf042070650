// Command bench measures Outpost beside the setup users pick today, a
// Mosquitto bridge with persistence, in the same run and on the same
// workload, and prints one Markdown table. Run it with `make bench`.
//
// Everything runs on 127.0.0.1; every wait is bounded; every child process
// is stopped on exit.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
)

var (
	agentBin   = flag.String("agent", "bin/outpost", "path to the outpost binary")
	n          = flag.Int("n", 50_000, "messages per case")
	size       = flag.Int("size", 200, "payload bytes")
	payload    = flag.String("payload", "text", "payload padding: text (repeated, compresses well) or random (printable random characters, compresses little, like varied telemetry)")
	publishers = flag.Int("publishers", 50, "publishers in the concurrent case")
	backlog    = flag.Int("backlog", 0, "only measure Outpost's RSS with this many messages queued (e.g. 1000000)")
	durability = flag.String("durability", "process", "Outpost durability: process or fsync")
	compress   = flag.String("compression", "snappy", "Outpost storage.compression: snappy or none")
)

func main() {
	flag.Parse()
	if *payload != "text" && *payload != "random" {
		fmt.Fprintf(os.Stderr, "bench: -payload %q: want text or random\n", *payload)
		os.Exit(2)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		cleanup()
		os.Exit(1)
	}
	cleanup()
}

// Every child process, so that an error path still stops them.
var (
	childMu  sync.Mutex
	children []func()
)

func onExit(f func()) {
	childMu.Lock()
	children = append(children, f)
	childMu.Unlock()
}

func cleanup() {
	childMu.Lock()
	defer childMu.Unlock()
	for i := len(children) - 1; i >= 0; i-- {
		children[i]()
	}
	children = nil
}

// edge is the system under test: Outpost or the Mosquitto bridge.
type edge interface {
	name() string
	start() error // start (or restart after kill) on the same port and data
	kill() error  // SIGKILL
	stop() error
	addr() string
	pid() int
	upstreamFilter() string
}

type outpostEdge struct {
	port       int
	dir        string
	up         string
	logLevel   string // default warn
	durability string // default the -durability flag
	cmd        *exec.Cmd
}

func (e *outpostEdge) name() string           { return "outpost" }
func (e *outpostEdge) addr() string           { return net.JoinHostPort("127.0.0.1", strconv.Itoa(e.port)) }
func (e *outpostEdge) upstreamFilter() string { return "outpost/bench/#" }
func (e *outpostEdge) pid() int {
	if e.cmd == nil {
		return 0
	}
	return e.cmd.Process.Pid
}

func (e *outpostEdge) start() error {
	cfg := filepath.Join(e.dir, "outpost.yaml")
	level := e.logLevel
	if level == "" {
		level = "warn"
	}
	conf := "storage: {max_bytes: 0, compression: " + *compress + "}\nuplink: {backoff_min: 100ms, backoff_max: 1s}\nlog: {level: " + level + "}\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return err
	}
	e.cmd = exec.Command(*agentBin, "run", "--config", cfg, "--listen", e.addr(), "--data", filepath.Join(e.dir, "data"),
		"--upstream", e.up, "--device-id", "bench", "--durability", cmp.Or(e.durability, *durability), "--log-format", "text")
	logf, err := os.Create(filepath.Join(e.dir, "outpost.log"))
	if err != nil {
		return err
	}
	e.cmd.Stderr = logf
	if err := e.cmd.Start(); err != nil {
		return err
	}
	cmd := e.cmd
	onExit(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return waitPort(e.addr())
}

func (e *outpostEdge) kill() error {
	_ = e.cmd.Process.Kill()
	_ = e.cmd.Wait()
	return nil
}

func (e *outpostEdge) stop() error {
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	_ = e.cmd.Wait()
	return nil
}

type bridgeEdge struct {
	b    *mosqtest.Broker
	opts mosqtest.Options
}

func newBridge(upPort int) (*bridgeEdge, error) {
	port, err := mosqtest.FreePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "bench-bridge")
	if err != nil {
		return nil, err
	}
	onExit(func() { os.RemoveAll(dir) })
	return &bridgeEdge{opts: mosqtest.Options{
		Port: port, Persistence: true, DataDir: dir,
		Extra: fmt.Sprintf(`connection upstream
address 127.0.0.1:%d
topic bench/# out 1 "" outpost/bridge/
cleansession false
bridge_protocol_version mqttv50
restart_timeout 1
`, upPort),
	}}, nil
}

func (e *bridgeEdge) name() string           { return "mosquitto bridge" }
func (e *bridgeEdge) addr() string           { return net.JoinHostPort("127.0.0.1", strconv.Itoa(e.opts.Port)) }
func (e *bridgeEdge) upstreamFilter() string { return "outpost/bridge/#" }
func (e *bridgeEdge) pid() int {
	if e.b == nil {
		return 0
	}
	return e.b.Pid()
}

func (e *bridgeEdge) start() error {
	if e.b != nil {
		return e.b.Restart()
	}
	b, err := mosqtest.Start(e.opts)
	if err != nil {
		return err
	}
	e.b = b
	onExit(func() { _ = b.Kill() })
	return nil
}
func (e *bridgeEdge) kill() error { return e.b.Kill() }
func (e *bridgeEdge) stop() error { return e.b.Stop() }

func waitPort(addr string) error {
	return mosqtest.Eventually(15*time.Second, 10*time.Millisecond, func() error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// counter counts the distinct messages that arrive upstream, by their
// sequence number, with a mosquitto_sub subscribed at QoS 0 (so that its own
// acknowledgements do not limit the figures) and its output read here. It
// keeps a session in the upstream (clean session off, upstream persistence
// on, queue_qos0_messages), and after an upstream restart the bench starts a
// new mosquitto_sub at once (reconnect), so that the subscriber is back
// before the edge system is and no burst of queued messages inflates a rate.
//
// A C client, not a Go one in this process: the Go paho client the bench used
// before took more CPU than the upstream broker itself (1.3-1.5 s for a
// 50,000-message drain, against 1.0 s), on a machine the systems under test
// share with it.
type counter struct {
	host, port, filter, id string

	mu             sync.Mutex
	seen           map[string]int
	distinct, dups int // kept as messages arrive: counts is polled often
	first, last    time.Time
	probes         int // probe messages seen (see newCounter)

	cmd  *exec.Cmd
	done chan struct{} // closed when the reader of cmd's output returns
}

func newCounter(upURL, filter string) (*counter, error) {
	u, err := url.Parse(upURL)
	if err != nil {
		return nil, err
	}
	c := &counter{host: u.Hostname(), port: u.Port(), filter: filter, seen: map[string]int{},
		id: fmt.Sprintf("bench-counter-%d", time.Now().UnixNano())}
	if err := c.start(); err != nil {
		return nil, err
	}
	onExit(c.close)
	// Subscribed once a probe published to the filter comes back.
	probe := strings.TrimSuffix(filter, "#") + "probe"
	err = mosqtest.Eventually(10*time.Second, 100*time.Millisecond, func() error {
		c.mu.Lock()
		seen := c.probes
		c.mu.Unlock()
		if seen > 0 {
			return nil
		}
		out, err := exec.Command("mosquitto_pub", "-h", c.host, "-p", c.port, "-t", probe, "-m", "probe").CombinedOutput()
		if err != nil {
			return fmt.Errorf("probe: %v: %s", err, out)
		}
		return errors.New("no probe yet")
	})
	if err != nil {
		c.close()
		return nil, fmt.Errorf("upstream counter did not subscribe: %w", err)
	}
	return c, nil
}

func (c *counter) start() error {
	c.cmd = exec.Command("mosquitto_sub", "-h", c.host, "-p", c.port, "-V", "mqttv5", "-i", c.id,
		"-c", "-x", "3600", "-q", "0", "-t", c.filter)
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("mosquitto_sub: %w", err)
	}
	c.done = make(chan struct{})
	go c.read(out, c.done)
	return nil
}

// read counts the lines mosquitto_sub prints, one per message: the payload,
// whose first 12 bytes are its sequence number.
func (c *counter) read(out io.Reader, done chan<- struct{}) {
	defer close(done)
	r := bufio.NewReaderSize(out, 1<<16)
	for {
		line, err := r.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
		now := time.Now()
		c.mu.Lock()
		if len(line) < 13 || line[12] != ' ' {
			c.probes++
			c.mu.Unlock()
			continue
		}
		key := line[:12]
		if c.first.IsZero() {
			c.first = now
		}
		c.last = now
		if c.seen[string(key)]++; c.seen[string(key)] == 1 {
			c.distinct++
		} else {
			c.dups++
		}
		c.mu.Unlock()
		// A payload longer than the buffer: skip to its end.
		for errors.Is(err, bufio.ErrBufferFull) {
			_, err = r.ReadSlice('\n')
		}
	}
}

// reconnect starts a new mosquitto_sub on the same session, right after the
// upstream restarted.
func (c *counter) reconnect() error {
	c.stopSub()
	return c.start()
}

func (c *counter) stopSub() {
	if c.cmd == nil {
		return
	}
	_ = c.cmd.Process.Kill()
	<-c.done
	_ = c.cmd.Wait()
	c.cmd = nil
}

// cpu is the CPU time the running mosquitto_sub has used.
func (c *counter) cpu() float64 {
	if c.cmd == nil {
		return 0
	}
	return cpuSeconds(c.cmd.Process.Pid)
}

func (c *counter) close() { c.stopSub() }

func (c *counter) counts() (distinct, dups int, first, last time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.distinct, c.dups, c.first, c.last
}

// waitDistinct waits until want distinct messages arrived, or until nothing
// new arrived for quiet (then it returns what it has), bounded by limit.
func (c *counter) waitDistinct(want int, quiet, limit time.Duration) int {
	deadline := time.Now().Add(limit)
	lastN, lastChange := -1, time.Now()
	for time.Now().Before(deadline) {
		d, _, _, _ := c.counts()
		if d >= want {
			return d
		}
		if d != lastN {
			lastN, lastChange = d, time.Now()
		} else if time.Since(lastChange) > quiet {
			return d
		}
		time.Sleep(10 * time.Millisecond)
	}
	d, _, _, _ := c.counts()
	return d
}

// workload writes count lines of payload size (with the sequence number in
// front, so the counter can tell messages apart) into a file.
func workload(dir string, from, count int) (string, error) {
	if count > maxPerPublisher {
		return "", fmt.Errorf("bench: %d messages for one mosquitto_pub; at most %d", count, maxPerPublisher)
	}
	p := filepath.Join(dir, fmt.Sprintf("lines-%d-%d", from, count))
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	w := bufio.NewWriter(f)
	pad := []byte(strings.Repeat("x", max(*size-13, 0)))
	rnd := rand.New(rand.NewPCG(uint64(from), uint64(count)))
	const chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	for i := from; i < from+count; i++ {
		if *payload == "random" {
			for j := range pad {
				pad[j] = chars[rnd.IntN(len(chars))]
			}
		}
		fmt.Fprintf(w, "%012d %s\n", i, pad)
	}
	if err := w.Flush(); err != nil {
		return "", err
	}
	return p, f.Close()
}

// maxPerPublisher is the most messages one mosquitto_pub -l is given:
// mosquitto_pub 2.0 stops reading its input when the acknowledgement of the
// message whose packet id equals the last one's (ids wrap at 65535) arrives
// before the end of the input, silently sending fewer.
const maxPerPublisher = 65_000

// publish runs one mosquitto_pub -l per file, all at once, and waits.
func publish(addr string, files []string) error {
	host, port, _ := net.SplitHostPort(addr)
	var wg sync.WaitGroup
	errs := make(chan error, len(files))
	for i, f := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in, err := os.Open(f)
			if err != nil {
				errs <- err
				return
			}
			defer in.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			topic := "bench/t"
			if len(files) > 1 {
				topic = fmt.Sprintf("bench/t/%d", i)
			}
			cmd := exec.CommandContext(ctx, "mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-V", "mqttv5", "-t", topic, "-l")
			cmd.Stdin = in
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("mosquitto_pub: %v: %s", err, out)
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// cpuSeconds reads the user and system CPU time a process has used so far
// from /proc/PID/stat (0 if it cannot).
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name, in parentheses, may hold spaces: count fields
	// after its closing parenthesis (utime and stime are fields 14 and 15).
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on Linux.
const clockTicks = 100

// vm reads a field (VmRSS, VmHWM) of /proc/PID/status in MiB.
func vm(pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
			return kb / 1024
		}
	}
	return 0
}

type result struct {
	live1, liveN, drain float64 // msg/s
	acked1, ackedN      float64 // msg/s acknowledged to the publishers
	lost, dups          int
	rss                 float64 // MiB
	// CPU seconds used during the backlog drain by the edge process, the
	// upstream Mosquitto and the bench's counter (this process).
	cpuEdge, cpuUp, cpuCounter float64
}

type makeEdge func(upURL string, upPort int) (edge, error)

// fresh starts an upstream, an edge system connected to it, and a counter
// of what arrives upstream.
func fresh(mk makeEdge) (*mosqtest.Broker, edge, *counter, error) {
	up, err := mosqtest.Start(mosqtest.Options{Persistence: true})
	if err != nil {
		return nil, nil, nil, err
	}
	onExit(up.Close)
	e, err := mk(up.URL(), up.Port())
	if err != nil {
		return nil, nil, nil, err
	}
	if err := e.start(); err != nil {
		return nil, nil, nil, fmt.Errorf("%s: %w", e.name(), err)
	}
	c, err := newCounter(up.URL(), e.upstreamFilter())
	if err != nil {
		return nil, nil, nil, err
	}
	return up, e, c, nil
}

// measureLive publishes files through a fresh edge system and returns the
// rate from the first publish to the last arrival upstream, and the rate at
// which the edge acknowledged the publishes.
func measureLive(mk makeEdge, files []string) (live, acked float64, err error) {
	up, e, c, err := fresh(mk)
	if err != nil {
		return 0, 0, err
	}
	defer up.Close()
	defer e.kill()
	defer c.close()
	// The edge has connected upstream once the first message goes through.
	start := time.Now()
	if err := publish(e.addr(), files); err != nil {
		return 0, 0, err
	}
	acked = float64(*n) / time.Since(start).Seconds()
	got := c.waitDistinct(*n, 10*time.Second, 5*time.Minute)
	if got < *n {
		return 0, 0, fmt.Errorf("%s: live: only %d of %d arrived", e.name(), got, *n)
	}
	_, _, _, last := c.counts()
	return float64(*n) / last.Sub(start).Seconds(), acked, nil
}

// measure runs every case against one edge system, each on a fresh
// upstream and fresh data.
func measure(mk makeEdge, files1, filesN []string) (result, error) {
	var r result
	var err error
	if r.live1, r.acked1, err = measureLive(mk, files1); err != nil {
		return r, err
	}
	if r.liveN, r.ackedN, err = measureLive(mk, filesN); err != nil {
		return r, err
	}

	// Backlog drain, then loss on kill -9, each from a fresh start.
	up, e, c, err := fresh(mk)
	if err != nil {
		return r, err
	}
	if err := up.Stop(); err != nil {
		return r, err
	}
	if err := publish(e.addr(), files1); err != nil {
		return r, err
	}
	r.rss = vm(e.pid(), "VmHWM")
	edge0, self0 := cpuSeconds(e.pid()), cpuSeconds(os.Getpid())
	if err := up.Restart(); err != nil {
		return r, err
	}
	if err := c.reconnect(); err != nil {
		return r, err
	}
	if got := c.waitDistinct(*n, 10*time.Second, 5*time.Minute); got < *n {
		return r, fmt.Errorf("%s: drain: only %d of %d arrived", e.name(), got, *n)
	}
	r.cpuEdge, r.cpuUp, r.cpuCounter = cpuSeconds(e.pid())-edge0, cpuSeconds(up.Pid()), c.cpu()+cpuSeconds(os.Getpid())-self0
	_, _, first, last := c.counts()
	r.drain = float64(*n-1) / last.Sub(first).Seconds()
	r.rss = max(r.rss, vm(e.pid(), "VmHWM"))
	e.kill()
	c.close()
	up.Close()

	up, e, c, err = fresh(mk)
	if err != nil {
		return r, err
	}
	defer up.Close()
	if err := up.Stop(); err != nil {
		return r, err
	}
	if err := publish(e.addr(), files1); err != nil { // every message acknowledged
		return r, err
	}
	_ = e.kill()
	if err := e.start(); err != nil {
		return r, fmt.Errorf("%s: restart after kill: %w", e.name(), err)
	}
	if err := up.Restart(); err != nil {
		return r, err
	}
	if err := c.reconnect(); err != nil {
		return r, err
	}
	got := c.waitDistinct(*n, 5*time.Second, 3*time.Minute)
	_, r.dups, _, _ = c.counts()
	r.lost = *n - got
	e.kill()
	c.close()
	return r, nil
}

func run() error {
	if _, err := os.Stat(*agentBin); err != nil {
		return fmt.Errorf("agent binary: %w (run make build)", err)
	}
	for _, tool := range []string{"mosquitto", "mosquitto_pub"} {
		if _, err := mosqtest.LookPath(tool); err != nil {
			return fmt.Errorf("%w: apt-get install -y mosquitto mosquitto-clients", err)
		}
	}
	dir, err := os.MkdirTemp("", "outpost-bench")
	if err != nil {
		return err
	}
	onExit(func() { os.RemoveAll(dir) })

	if *backlog > 0 {
		return backlogRSS(dir)
	}

	files1 := []string{}
	f, err := workload(dir, 0, *n)
	if err != nil {
		return err
	}
	files1 = append(files1, f)
	var filesN []string
	per := *n / *publishers
	for i := range *publishers {
		f, err := workload(dir, i*per, per)
		if err != nil {
			return err
		}
		filesN = append(filesN, f)
	}

	fmt.Printf("Outpost bench: %d QoS 1 messages of %d B per case, MQTT 5 publisher(s) (mosquitto_pub -l), upstream Mosquitto on 127.0.0.1.\n", *n, *size)
	fmt.Printf("Machine: %d cores, %s. %s. Outpost durability: %s.\n\n", runtime.NumCPU(), cpuModel(), mosquittoVersion(), *durability)

	outpost := func(durability string) makeEdge {
		return func(upURL string, _ int) (edge, error) {
			port, err := mosqtest.FreePort()
			if err != nil {
				return nil, err
			}
			d, err := os.MkdirTemp(dir, "outpost")
			if err != nil {
				return nil, err
			}
			return &outpostEdge{port: port, dir: d, up: upURL, durability: durability}, nil
		}
	}
	op, err := measure(outpost(""), files1, filesN)
	if err != nil {
		return err
	}
	// fsync mode, 50 publishers: every acknowledged message is on disk.
	var fsyncN, fsyncAcked float64
	if *durability != "fsync" {
		if fsyncN, fsyncAcked, err = measureLive(outpost("fsync"), filesN); err != nil {
			return err
		}
	}
	br, err := measure(func(_ string, upPort int) (edge, error) { return newBridge(upPort) }, files1, filesN)
	if err != nil {
		return err
	}
	ratio := func(a, b float64) string {
		if b == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	fmt.Println("| metric | outpost | mosquitto bridge | ratio |")
	fmt.Println("|---|---:|---:|---:|")
	fmt.Printf("| live forwarding, 1 publisher (msg/s) | %.0f | %.0f | %s |\n", op.live1, br.live1, ratio(op.live1, br.live1))
	fmt.Printf("| live forwarding, %d publishers (msg/s) | %.0f | %.0f | %s |\n", *publishers, op.liveN, br.liveN, ratio(op.liveN, br.liveN))
	fmt.Printf("| local publishes acknowledged, 1 publisher (msg/s) | %.0f | %.0f | %s |\n", op.acked1, br.acked1, ratio(op.acked1, br.acked1))
	fmt.Printf("| local publishes acknowledged, %d publishers (msg/s) | %.0f | %.0f | %s |\n", *publishers, op.ackedN, br.ackedN, ratio(op.ackedN, br.ackedN))
	if fsyncN > 0 {
		fmt.Printf("| fsync mode, %d publishers: acknowledged (msg/s) | %.0f | %.0f (no disk) | %s |\n", *publishers, fsyncAcked, br.ackedN, ratio(fsyncAcked, br.ackedN))
		fmt.Printf("| fsync mode, %d publishers: live forwarding (msg/s) | %.0f | %.0f (no disk) | %s |\n", *publishers, fsyncN, br.liveN, ratio(fsyncN, br.liveN))
	}
	fmt.Printf("| backlog drain (msg/s, first to last arrival) | %.0f | %.0f | %s |\n", op.drain, br.drain, ratio(op.drain, br.drain))
	fmt.Printf("| CPU during the drain: edge / upstream / counter (s) | %.2f / %.2f / %.2f | %.2f / %.2f / %.2f | |\n",
		op.cpuEdge, op.cpuUp, op.cpuCounter, br.cpuEdge, br.cpuUp, br.cpuCounter)
	fmt.Printf("| acknowledged messages lost on kill -9 (of %d) | %d | %d | |\n", *n, op.lost, br.lost)
	fmt.Printf("| duplicates after kill -9 and restart | %d | %d | |\n", op.dups, br.dups)
	fmt.Printf("| peak RSS of the edge process with the backlog (MiB) | %.1f | %.1f | |\n", op.rss, br.rss)
	return nil
}

// backlogRSS queues count messages in Outpost (upstream down) and reports
// its RSS.
func backlogRSS(dir string) error {
	up, err := mosqtest.Start(mosqtest.Options{})
	if err != nil {
		return err
	}
	onExit(up.Close)
	if err := up.Stop(); err != nil {
		return err
	}
	port, err := mosqtest.FreePort()
	if err != nil {
		return err
	}
	e := &outpostEdge{port: port, dir: dir, up: up.URL(), logLevel: "info"}
	if err := e.start(); err != nil {
		return err
	}
	const chunk = 50_000
	start := time.Now()
	for from := 0; from < *backlog; from += chunk {
		f, err := workload(dir, from, min(chunk, *backlog-from))
		if err != nil {
			return err
		}
		if err := publish(e.addr(), []string{f}); err != nil {
			return err
		}
		os.Remove(f)
		fmt.Printf("%d queued, RSS %.1f MiB (anonymous %.1f, files %.1f)\n", from+min(chunk, *backlog-from),
			vm(e.pid(), "VmRSS"), vm(e.pid(), "RssAnon"), vm(e.pid(), "RssFile"))
	}
	fmt.Printf("\n%d messages of %d B (%s payloads) queued in %s: RSS %.1f MiB (anonymous %.1f, memory-mapped files %.1f), peak RSS %.1f MiB, data dir %s\n",
		*backlog, *size, *payload, time.Since(start).Round(time.Second), vm(e.pid(), "VmRSS"), vm(e.pid(), "RssAnon"), vm(e.pid(), "RssFile"),
		vm(e.pid(), "VmHWM"), du(filepath.Join(dir, "data")))
	if err := e.stop(); err != nil {
		return err
	}
	// The agent logs its backlog when it stops: check that every message
	// was queued.
	log, err := os.ReadFile(filepath.Join(dir, "outpost.log"))
	if err != nil {
		return err
	}
	m := regexp.MustCompile(`outpost stopped.* backlog=(\d+)`).FindSubmatch(log)
	if m == nil {
		return errors.New("bench: the agent did not log its backlog at shutdown")
	}
	if got, _ := strconv.Atoi(string(m[1])); got != *backlog {
		return fmt.Errorf("bench: %d messages in the backlog at shutdown, want %d", got, *backlog)
	}
	fmt.Printf("backlog at shutdown: %s messages (all of them)\n", m[1])
	return nil
}

func du(dir string) string {
	out, err := exec.Command("du", "-sh", dir).Output()
	if err != nil {
		return "?"
	}
	return strings.Fields(string(out))[0]
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range bytes.Split(b, []byte("\n")) {
		if k, v, ok := strings.Cut(string(l), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func mosquittoVersion() string {
	bin, err := mosqtest.LookPath("mosquitto")
	if err != nil {
		return "mosquitto ?"
	}
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}
