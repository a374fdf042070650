package sandbox

import (
	"context"
	goruntime "runtime"
	"testing"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// guest is a module the benchmarks run, by the name of its sub-benchmark.
type guest struct {
	name string
	wasm func(testing.TB) []byte
}

var (
	goTestGuest = guest{"go", func(t testing.TB) []byte { return wasmtest.BuildGo(t, "testdata/goguest") }}
	goExample   = guest{"go", func(t testing.TB) []byte { return wasmtest.BuildGo(t, "../../examples/handler-go") }}
	asExample   = guest{"assemblyscript", func(t testing.TB) []byte { return wasmtest.BuildAS(t, "../../examples/handler-as") }}
	watEcho     = guest{"wat", func(t testing.TB) []byte { return wasmtest.Wat(t, "testdata/wat/echo.wat") }}
)

// BenchmarkCall256 is a direct call (no broker) of an echo handler with a
// 256-byte request, through the whole host path: metadata encoding, the
// instance pool, the deadline, req_meta/req_payload/resp_write.
func BenchmarkCall256(b *testing.B) {
	for _, c := range []guest{goExample, asExample, watEcho} {
		b.Run(c.name, func(b *testing.B) { call256(b, c, Config{Limits: Limits{Instances: 1}}) })
	}
}

// BenchmarkCall256Unterminated is BenchmarkCall256 with the modules
// compiled without wazero's termination checks (WithCloseOnContextDone):
// what the checks cost, which the agent never runs without.
func BenchmarkCall256Unterminated(b *testing.B) {
	for _, c := range []guest{goExample, asExample, watEcho} {
		b.Run(c.name, func(b *testing.B) { call256(b, c, Config{Limits: Limits{Instances: 1}, noTermination: true}) })
	}
}

func call256(b *testing.B, c guest, cfg Config) {
	p := load(b, engine(b), c.wasm(b), cfg)
	req := &Request{Meta: abi.Meta{Kind: abi.KindMethod, Name: "echo", Flags: abi.FlagResponseExpected}, Payload: make([]byte, 256)}
	b.ReportAllocs()
	for b.Loop() {
		if r := p.Call(context.Background(), req); r.Status != 200 {
			b.Fatalf("status %d, %v", r.Status, r.Err)
		}
	}
}

// BenchmarkLoadWarm is the load of a plugin (decoding and validating the
// module, its compiled code from the cache, the checks, the first instance
// with _initialize) once the cache is warm, as after a restart: the Go and
// the AssemblyScript examples.
func BenchmarkLoadWarm(b *testing.B) {
	for _, c := range []guest{goExample, asExample} {
		b.Run(c.name, func(b *testing.B) {
			wasm := c.wasm(b)
			e, err := NewEngine(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close(context.Background())
			warm, err := e.Load(context.Background(), wasm, Config{Name: "warm"})
			if err != nil {
				b.Fatal(err)
			}
			_ = warm.Close(context.Background())
			for b.Loop() {
				p, err := e.Load(context.Background(), wasm, Config{Name: "bench"})
				if err != nil {
					b.Fatal(err)
				}
				_ = p.Close(context.Background())
			}
			b.ReportMetric(float64(len(wasm))/(1<<20), "module-MiB")
		})
	}
}

// BenchmarkInstanceMemory reports what one pooled instance of a guest
// costs: its linear memory and the Go heap the host holds for it, over 8
// instances made at once.
func BenchmarkInstanceMemory(b *testing.B) {
	for _, c := range []guest{goTestGuest, watEcho} {
		b.Run(c.name, func(b *testing.B) {
			const n = 8
			var linear, heap float64
			for b.Loop() {
				p := load(b, engine(b), c.wasm(b), Config{Limits: Limits{Instances: n + 1}})
				goruntime.GC()
				var before, after goruntime.MemStats
				goruntime.ReadMemStats(&before)
				var insts []*instance
				for range n {
					inst, err := p.newInstance(context.Background())
					if err != nil {
						b.Fatal(err)
					}
					insts = append(insts, inst)
				}
				goruntime.GC()
				goruntime.ReadMemStats(&after)
				var lin int
				for _, inst := range insts {
					lin += len(inst.mem.buf)
					_ = inst.mod.Close(context.Background())
				}
				linear = float64(lin) / n / (1 << 20)
				heap = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n / (1 << 20)
				_ = p.Close(context.Background())
			}
			b.ReportMetric(linear, "linear-MiB/instance")
			b.ReportMetric(heap, "heap-MiB/instance")
		})
	}
}
