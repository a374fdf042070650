package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
)

// TestWalkthrough runs what `make run` runs (its command line read with
// make -n run), on free ports and in a scratch directory, then performs
// each step of the walkthrough the agent prints, running the printed
// commands as they are, and checks what each step claims. Ctrl-C then
// stops the agent and the hub.
func TestWalkthrough(t *testing.T) {
	mosqtest.Require(t, "mosquitto_pub", "mosquitto_rr")

	// The command line of make run.
	mk, err := exec.Command("make", "-s", "-n", "-C", "../..", "run").Output()
	if err != nil {
		t.Fatalf("make -n run: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(mk)), "\n")
	runLine := strings.Fields(lines[len(lines)-1])
	if len(runLine) < 2 || runLine[0] != "bin/outpost" || runLine[1] != "run" {
		t.Fatalf("make run's last command is %q; want bin/outpost run ...", lines[len(lines)-1])
	}
	var args []string
	var installed []string
	for i := 1; i < len(runLine); i++ {
		if runLine[i] == "--install" && i+1 < len(runLine) {
			// The plugins make run installs, built here from their sources.
			src := strings.TrimSuffix(runLine[i+1], "/build")
			installed = append(installed, src)
			args = append(args, "--install", pluginDir(t, filepath.Join("../..", src)))
			i++
			continue
		}
		args = append(args, runLine[i])
	}
	if !slices.Contains(args, "--hub") || !slices.Contains(args, "--hints") || len(installed) != 3 {
		t.Fatalf("make run does not run the hub with hints and the three handlers: %q", runLine)
	}
	// Free ports instead of the fixed ones (a later flag wins).
	args = append(args, "--listen", "127.0.0.1:0", "--hub-listen", "127.0.0.1:0", "--hub-api", "127.0.0.1:0",
		"--admin-http", "127.0.0.1:0", "--log-format", "json")

	dir := t.TempDir()
	agent := exec.Command(binary, args...)
	agent.Dir = dir
	stdout, err := agent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr lockedBuffer
	agent.Stderr = &stderr
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- agent.Wait() }()
	t.Cleanup(func() {
		_ = agent.Process.Kill()
		<-exited
	})

	// The hints, up to their last line.
	var hints []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		hints = append(hints, sc.Text())
		if strings.HasPrefix(sc.Text(), "Ctrl-C stops") {
			break
		}
	}
	text := strings.Join(hints, "\n")
	if !strings.Contains(text, "Ctrl-C stops") {
		t.Fatalf("no hints; stderr:\n%s", stderr.String())
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	var cmds []string
	for _, l := range hints {
		if strings.HasPrefix(l, "       ") {
			cmds = append(cmds, strings.Replace(strings.TrimSpace(l), "bin/outpost", binary, 1))
		}
	}
	t.Logf("hints:\n%s", text)
	for _, h := range []string{"method:echo", "dm_action:firmware.update", "method:getDiagnostics"} {
		if !strings.Contains(text, h) {
			t.Errorf("the hints do not list handler %s", h)
		}
	}
	step := func(prefix string) string {
		t.Helper()
		for i, c := range cmds {
			if strings.Contains(c, prefix) {
				cmds = append(cmds[:i:i], cmds[i+1:]...)
				return c
			}
		}
		t.Fatalf("no hint runs %q:\n%s", prefix, text)
		return ""
	}
	sh := func(c string) (string, error) {
		t.Helper()
		cmd := exec.Command("sh", "-c", c)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	mustSh := func(c string) string {
		t.Helper()
		out, err := sh(c)
		if err != nil {
			t.Fatalf("%s: %v\n%s\nagent:\n%s", c, err, out, stderr.String())
		}
		return out
	}

	// 1. Telemetry, followed at the hub.
	follow := exec.Command("sh", "-c", step("hub telemetry --follow"))
	follow.Dir = dir
	fout, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	followDone := make(chan struct{})
	var mu sync.Mutex
	var events []string
	go func() {
		defer close(followDone)
		s := bufio.NewScanner(fout)
		for s.Scan() {
			mu.Lock()
			events = append(events, s.Text())
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { _ = follow.Process.Kill(); _ = follow.Wait() })
	seen := func(re string) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, e := range events {
			if regexp.MustCompile(re).MatchString(e) {
				n++
			}
		}
		return n
	}
	// The follower may connect after the first publish: publish until one
	// is seen.
	pub := step("-t plant/line1/temp -m 21.5")
	waitFor(t, 20*time.Second, func() error {
		mustSh(pub)
		if seen(`"payload":"21.5"`) == 0 {
			return fmt.Errorf("the hub's telemetry --follow has not shown 21.5")
		}
		return nil
	})

	// 3. A method from the cloud, served by the wasm handler.
	if out := mustSh(step("hub invoke")); !strings.Contains(out, "status 200") || !strings.Contains(out, "hello") {
		t.Errorf("hub invoke: %q, want status 200 and hello", out)
	}
	// 4. The same locally over MQTT 5.
	if out := mustSh(step("mosquitto_rr")); !strings.Contains(out, "hi") || !strings.Contains(out, "200") {
		t.Errorf("mosquitto_rr: %q, want status 200 and hi", out)
	}

	// 5. An outage: the readings wait in the backlog, then drain.
	mustSh(step("hub offline"))
	mustSh(step("seq 1 100 | mosquitto_pub"))
	status := step("status")
	waitFor(t, 20*time.Second, func() error {
		out, err := sh(status)
		if err != nil || !regexp.MustCompile(`backlog\s+100 messages`).MatchString(out) || !strings.Contains(out, "DOWN") {
			return fmt.Errorf("status during the outage: %v\n%s", err, out)
		}
		return nil
	})
	if n := seen(`plant/line1/count`); n != 0 {
		t.Errorf("%d readings reached the hub during the outage", n)
	}
	mustSh(step("hub online"))
	status2 := step("status")
	waitFor(t, 30*time.Second, func() error {
		out, err := sh(status2)
		if err != nil || !regexp.MustCompile(`backlog\s+0 messages`).MatchString(out) || !strings.Contains(out, "connected") {
			return fmt.Errorf("status after the outage: %v\n%s", err, out)
		}
		return nil
	})
	waitFor(t, 10*time.Second, func() error {
		for i := 1; i <= 100; i++ {
			if seen(fmt.Sprintf(`"payload":"%d"`, i)) == 0 {
				return fmt.Errorf("reading %d has not reached the hub", i)
			}
		}
		return nil
	})

	// The metrics say the same.
	m := regexp.MustCompile(`metrics\s+(http://\S+)`).FindStringSubmatch(text)
	if m == nil {
		t.Fatal("the hints give no metrics address")
	}
	resp, err := http.Get(m[1])
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, re := range []string{`outpost_uplink_connected 1`, `outpost_uplink_forwarded_total 1\d\d`, `outpost_outbox_messages\{route="telemetry"\} 0`,
		`outpost_plugin_calls_total\{plugin="example-go",version="[^"]+"\} [1-9]`, `outpost_uplink_offline_seconds_total [0-9.e+-]+`} {
		if !regexp.MustCompile(re).Match(body) {
			t.Errorf("metrics lack %s", re)
		}
	}

	// 6. A firmware update from the cloud.
	if out := mustSh(step("hub firmware-update")); !strings.Contains(out, `"result": "success"`) {
		t.Errorf("firmware-update: %s", out)
	}
	if out := mustSh(step("cat ")); strings.TrimSpace(out) != "1.1.0" {
		t.Errorf("installed version %q, want 1.1.0", out)
	}
	if len(cmds) > 0 {
		t.Errorf("hints not tried by this test: %q", cmds)
	}

	// Ctrl-C stops the agent and the hub: the follower's stream ends.
	if err := agent.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Errorf("the agent exited with %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the agent did not stop on SIGINT\n%s", stderr.String())
	}
	select {
	case <-followDone:
	case <-time.After(10 * time.Second):
		t.Error("telemetry --follow still runs after the hub stopped")
	}
	if !strings.Contains(stderr.String(), `"msg":"outpost stopped","backlog":0`) {
		t.Errorf("no clean stop in the log:\n%s", stderr.String())
	}
}
