package main

import (
	"bytes"
	"strings"
	"testing"
)

const sample = `goos: linux
BenchmarkLocalRoundTrip/wasm-go-2         	   20000	    147943 ns/op	      6759 calls/s	       117.0 p50-µs	       401.0 p99-µs
BenchmarkLocalRoundTrip/native-2          	   20000	    140293 ns/op	      7128 calls/s	       112.0 p50-µs	       416.0 p99-µs
BenchmarkCall256/assemblyscript-2         	   20000	      6409 ns/op	     658 B/op	       6 allocs/op
BenchmarkLoadWarm/go-2         	      20	  63877932 ns/op	         3.227 module-MiB
ok  	github.com/outpost-edge/outpost/runtime	12.1s
`

func TestTable(t *testing.T) {
	var other, out bytes.Buffer
	r, err := parse(strings.NewReader(sample), &other)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(other.String(), "goos: linux") || !strings.Contains(other.String(), "ok  \tgithub.com") {
		t.Fatalf("other lines not passed through: %q", other.String())
	}
	write(&out, r)
	for _, want := range []string{
		"| local round trip through the broker, p50 (µs) | 117 | - | - | 112 | +5 |",
		"| local round trip through the broker, p99 (µs) | 401 | - | - | 416 | -15 |",
		"| direct call of the echo, 256 B (µs) | - | 6.4 | - | - |  |",
		"| load with a warm compilation cache (ms) | 63.9 | - | - | - |  |",
		"| module size (MiB) | 3.23 | - | - | - |  |",
	} {
		if !strings.Contains(out.String(), want+"\n") {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestParseRefusesABadValue(t *testing.T) {
	_, err := parse(strings.NewReader("BenchmarkX-2 10 1,5 ns/op\n"), &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), `BenchmarkX: value "1,5"`) {
		t.Fatalf("err = %v", err)
	}
}

func TestDialectTables(t *testing.T) {
	const in = `BenchmarkHubMethodRoundTrip/wasm-go-2         	    2000	    175460 ns/op	       116.0 p50-µs	      1052 p99-µs
BenchmarkHubMethodRoundTrip/native-2          	    2000	    112725 ns/op	        82.00 p50-µs	       314.0 p99-µs
BenchmarkDialectTelemetry/generic-2         	   20000	     28060 ns/op	     35638 msg/s
BenchmarkDialectTelemetry/azure-2           	   20000	     24331 ns/op	     41099 msg/s
`
	r, err := parse(strings.NewReader(in), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	writeDialects(&out, r)
	for _, want := range []string{"| p50 (µs) | 116 | 82 | +34 |", "| p99 (µs) | 1052 | 314 | +738 |",
		"| msg/s | 35638 | 41099 | - |", "| against generic | 1.00x | 1.15x | - |"} {
		if !strings.Contains(out.String(), want+"\n") {
			t.Errorf("tables lack %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	writeDialects(&out, results{})
	if out.Len() != 0 {
		t.Errorf("tables without the dialect benchmarks: %q", out.String())
	}
}
