package runtime

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/runtime/dialect/azure"
	"github.com/outpost-edge/outpost/runtime/dialect/generic"
	"github.com/outpost-edge/outpost/runtime/dialect/watson"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// benchHub starts the emulator for a benchmark.
func benchHub(b *testing.B) *hub.Hub {
	h, err := hub.New(hub.Options{Listen: "127.0.0.1:0", API: "off", DefaultKey: hubKey, DefaultToken: "tok"})
	if err != nil {
		b.Fatal(err)
	}
	if err := h.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = h.Close() })
	return h
}

// benchDevice is the agent's uplink side without its local broker: an
// outbox, a dialect and the uplink, against the hub, with requests served
// by caller. It returns once connected.
func benchDevice(b *testing.B, h *hub.Hub, dialect string, caller dispatch.Caller) (*storage.Outbox, *uplink.Uplink) {
	ob, err := storage.Open(storage.Options{Dir: b.TempDir(), Routes: []storage.Route{{Name: "telemetry"}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = ob.Close() })
	d := dispatch.New(caller, func(dispatch.Reply) error { return nil }, DefaultConfig().Plugins.MaxConcurrent, nil)
	b.Cleanup(func() { d.Close(context.Background()) })
	target, _ := url.Parse("mqtt://" + h.Addr())
	opts := uplink.Options{URL: target, Source: ob, Logger: slog.New(slog.DiscardHandler)}
	var attach func(*uplink.Uplink)
	switch dialect {
	case "azure":
		journal, _ := ob.State("journal")
		az, err := azure.New(azure.Options{Host: "outpost-hub.local", DeviceID: "bench", Key: hubKey, SendHost: true,
			Journal: journal, Server: d})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { az.Close(context.Background()) })
		opts.ClientID, opts.Credentials, opts.Topic, opts.UserProps = az.ClientID(), az.Credentials, az.TelemetryTopic, az.TelemetryProps
		opts.NoRequestProps, opts.NoRetain, opts.Subscriptions = true, true, az.Subscriptions()
		opts.OnMessage, opts.OnConnect, opts.Refusal = az.OnMessage, az.OnConnect, az.Refusal
		attach = func(u *uplink.Uplink) { az.Attach(u) }
	case "watson":
		st, _ := ob.State("dm")
		w, err := watson.New(watson.Options{Org: "outpst", Type: "gw", ID: "bench", Token: "tok", State: st, Server: d})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { w.Close(context.Background()) })
		opts.ClientID, opts.Credentials, opts.Topic = w.ClientID(), w.Credentials, w.TelemetryTopic
		opts.NoRetain, opts.MaxPayload, opts.Subscriptions = true, watson.MaxPayload, w.Subscriptions()
		opts.OnMessage, opts.OnConnect = w.OnMessage, w.OnConnect
		attach = func(u *uplink.Uplink) { w.Attach(u) }
	default:
		g := generic.New("outpost/{device_id}/", "bench")
		opts.ClientID = "outpost-bench"
		opts.Topic = func(m *storage.Message) string { return g.TelemetryTopic(m.Topic) }
	}
	u, err := uplink.New(opts)
	if err != nil {
		b.Fatal(err)
	}
	if attach != nil {
		attach(u)
	}
	if err := u.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = u.Close(ctx)
	})
	deadline := time.Now().Add(10 * time.Second)
	for !u.Stats().Connected {
		if time.Now().After(deadline) {
			b.Fatal("not connected to the hub")
		}
		time.Sleep(time.Millisecond)
	}
	return ob, u
}

// BenchmarkHubMethodRoundTrip is a direct method invoked from the hub
// emulator, one at a time: hub -> agent (azure dialect) -> handler ->
// hub, with 256 bytes, for the Go example handler as wasm and the same
// handler in native Go. It reports p50 and p99.
func BenchmarkHubMethodRoundTrip(b *testing.B) {
	b.Run("wasm-go", func(b *testing.B) { hubRoundTrip(b, wasmEcho(b, "handler-go")) })
	b.Run("native", func(b *testing.B) { hubRoundTrip(b, nativeEcho{}) })
}

func hubRoundTrip(b *testing.B, caller dispatch.Caller) {
	h := benchHub(b)
	benchDevice(b, h, "azure", caller)
	payload := make([]byte, 256)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		r, err := h.Invoke(ctx, "bench", "echo", payload, 10*time.Second)
		if err != nil || r.Status != 200 || len(r.Payload) != 256 {
			b.Fatalf("invoke: %+v %v", r, err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkDialectTelemetry drains b.N stored messages of 200 bytes to the
// hub emulator in each dialect: the same broker, the same outbox, only the
// topic and property mapping differ. It reports messages per second from
// the connection to the last acknowledgement.
func BenchmarkDialectTelemetry(b *testing.B) {
	for _, d := range []string{"generic", "azure", "watson"} {
		b.Run(d, func(b *testing.B) { dialectDrain(b, d) })
	}
}

func dialectDrain(b *testing.B, dialect string) {
	h := benchHub(b)
	ob, u := benchDevice(b, h, dialect, nativeEcho{})
	_ = u
	// The device is connected; the messages go in now and leave as fast as
	// the hub acknowledges them.
	payload := []byte(fmt.Sprintf("%0200d", 0))
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		m := &storage.Message{Route: "telemetry", Topic: "plant/line1/temp", QoS: 1, Payload: payload, ContentType: "application/json",
			UserProps: []storage.Property{{Key: "seq", Value: fmt.Sprint(i)}}}
		if err := ob.AppendAsync(m, func(uint64, error) {}); err != nil {
			b.Fatal(err)
		}
	}
	deadline := time.Now().Add(2 * time.Minute)
	for u.Stats().Forwarded < int64(b.N) {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d forwarded", u.Stats().Forwarded, b.N)
		}
		time.Sleep(time.Millisecond)
	}
	el := time.Since(start)
	b.StopTimer()
	if st := h.Stats(); st.Disconnects != 0 {
		b.Fatalf("the hub disconnected the device %d times", st.Disconnects)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "msg/s")
}
