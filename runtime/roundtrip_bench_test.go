package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/broker"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/storage"
)

// nativeEcho is the echo handler of examples/handler-go written as plain
// Go, the peer of the wasm one.
type nativeEcho struct{}

func (nativeEcho) Call(_ context.Context, req *sandbox.Request) *sandbox.Response {
	return &sandbox.Response{Status: 200, Payload: req.Payload, ContentType: req.ContentType, Props: req.Props}
}

// wasmEcho is an example handler (examples/handler-go or handler-as) in a
// registry.
func wasmEcho(b *testing.B, example string) dispatch.Caller {
	var wasm []byte
	if example == "handler-as" {
		wasm = wasmtest.BuildAS(b, "../examples/handler-as")
	} else {
		wasm = wasmtest.BuildGo(b, "../examples/handler-go")
	}
	tmpl, err := os.ReadFile("../examples/" + example + "/manifest.yaml.in")
	if err != nil {
		b.Fatal(err)
	}
	sum := sha256.Sum256(wasm)
	e, err := sandbox.NewEngine("")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = e.Close(context.Background()) })
	reg, err := plugins.Open(context.Background(), plugins.Options{Dir: b.TempDir(), Engine: e, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { reg.Close(context.Background()) })
	man := strings.ReplaceAll(string(tmpl), "@SHA256@", hex.EncodeToString(sum[:]))
	if _, err := reg.Install(context.Background(), []byte(man), wasm, nil); err != nil {
		b.Fatal(err)
	}
	return reg
}

// BenchmarkLocalRoundTrip is a local MQTT 5 request to outpost/methods/echo
// with 256 bytes, through the broker and the dispatcher to the handler and
// back, one at a time, with a wasm handler (the Go and the AssemblyScript
// examples) and the same handler in native Go, in the same run. It reports
// p50 and p99.
func BenchmarkLocalRoundTrip(b *testing.B) {
	b.Run("wasm-go", func(b *testing.B) { roundTrip(b, wasmEcho(b, "handler-go"), 1) })
	b.Run("wasm-as", func(b *testing.B) { roundTrip(b, wasmEcho(b, "handler-as"), 1) })
	b.Run("native", func(b *testing.B) { roundTrip(b, nativeEcho{}, 1) })
}

// BenchmarkLocalThroughput is BenchmarkLocalRoundTrip with 64 requests in
// flight from one client: calls per second through the broker.
func BenchmarkLocalThroughput(b *testing.B) {
	b.Run("wasm-go", func(b *testing.B) { roundTrip(b, wasmEcho(b, "handler-go"), 64) })
	b.Run("wasm-as", func(b *testing.B) { roundTrip(b, wasmEcho(b, "handler-as"), 64) })
	b.Run("native", func(b *testing.B) { roundTrip(b, nativeEcho{}, 64) })
}

func roundTrip(b *testing.B, caller dispatch.Caller, inFlight int) {
	br, err := broker.New(broker.Options{
		Listeners: []broker.Listener{{Address: "127.0.0.1:0"}},
		Route:     func(string) (string, bool) { return "", false },
		Store:     func(*storage.Message, func(uint64, error)) error { return nil },
	})
	if err != nil {
		b.Fatal(err)
	}
	// The agent's default bound: 64 in flight is exactly at it.
	d := dispatch.New(caller, func(r dispatch.Reply) error { return br.Respond(toBroker(r)) }, DefaultConfig().Plugins.MaxConcurrent, nil)
	if err := br.HandleRequests(dispatch.MethodsFilter, 1, func(r broker.Request) { d.Local(toDispatch(r)) }); err != nil {
		b.Fatal(err)
	}
	if err := br.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = br.Close(); d.Close(context.Background()) }()

	// The load generator is mochi's packet codec on a plain connection
	// (mqtttest.Light): it shares the two cores with what it measures, and
	// a paho client took a fifth of them.
	c, err := mqtttest.DialLight(br.Addrs()[0], "bench")
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe("bench/replies"); err != nil {
		b.Fatal(err)
	}
	var mu sync.Mutex
	sent := map[uint64]time.Time{}
	var lat []time.Duration
	done := make(chan struct{}, inFlight)
	go func() {
		for {
			pk, err := c.ReadPublish()
			if err != nil {
				return
			}
			if len(pk.Payload) != 256 || len(pk.Properties.CorrelationData) != 8 || len(pk.Properties.User) == 0 || pk.Properties.User[0].Val != "200" {
				b.Errorf("response of %d bytes, correlation %x, properties %v: %s", len(pk.Payload), pk.Properties.CorrelationData, pk.Properties.User, pk.Payload)
				continue
			}
			id := binary.BigEndian.Uint64(pk.Properties.CorrelationData)
			mu.Lock()
			lat = append(lat, time.Since(sent[id]))
			delete(sent, id)
			mu.Unlock()
			done <- struct{}{}
		}
	}()
	payload := make([]byte, 256)
	send := func(i uint64) {
		corr := binary.BigEndian.AppendUint64(nil, i)
		mu.Lock()
		sent[i] = time.Now()
		mu.Unlock()
		if err := c.Publish("outpost/methods/echo", payload, "bench/replies", corr); err != nil {
			b.Error(err)
		}
	}
	b.ResetTimer()
	n := uint64(b.N)
	var next uint64
	for ; next < min(n, uint64(inFlight)); next++ {
		send(next)
	}
	for range n {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			b.Fatalf("no response within 10s (%d sent)", next)
		}
		if next < n {
			send(next)
			next++
		}
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
}
