package uplink

import (
	"context"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/storage"
)

// BenchmarkDrain measures this side of a backlog drain: b.N messages of
// 200 bytes are stored, then forwarded to a real Mosquitto on loopback, with
// a QoS 1 subscriber (mosquitto_sub) as in make bench, until every one is
// acknowledged and deleted from the outbox. Besides the time it
// reports the process's CPU time per message (user and system, from
// getrusage), which leaves out Mosquitto's: on a machine where the agent and
// the upstream share the cores, the agent's CPU is what limits the drain.
func BenchmarkDrain(b *testing.B) {
	mosqtest.Require(b, "mosquitto", "mosquitto_sub")
	up := mosqtest.StartT(b, mosqtest.Options{})
	sub := exec.Command("mosquitto_sub", "-p", strconv.Itoa(up.Port()), "-q", "1", "-t", "outpost/#", "-C", strconv.Itoa(b.N))
	if err := sub.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = sub.Process.Kill(); _ = sub.Wait() }()
	ob, err := storage.Open(storage.Options{Dir: b.TempDir(), Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		b.Fatal(err)
	}
	defer ob.Close()
	payload := []byte(strings.Repeat("x", 200))
	for range b.N {
		if err := ob.Append(&storage.Message{Route: "r", Topic: "plant/line1/temp", QoS: 1, Payload: payload}); err != nil {
			b.Fatal(err)
		}
	}
	target, err := url.Parse(up.URL())
	if err != nil {
		b.Fatal(err)
	}
	u, err := New(Options{
		URL:      target,
		ClientID: "bench-drain",
		Source:   ob,
		Topic:    func(m *storage.Message) string { return "outpost/bench/" + m.Topic },
	})
	if err != nil {
		b.Fatal(err)
	}
	before := cpuTime(b)
	b.ResetTimer()
	if err := u.Start(); err != nil {
		b.Fatal(err)
	}
	for ob.Stats().Messages > 0 {
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	cpu := cpuTime(b) - before
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
	if st := u.Stats(); st.Forwarded != int64(b.N) {
		b.Fatalf("forwarded %d, want %d", st.Forwarded, b.N)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := u.Close(ctx); err != nil {
		b.Fatal(err)
	}
}

// cpuTime is the user and system CPU time this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
