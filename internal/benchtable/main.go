// Command benchtable reads the output of the handler benchmarks (go test
// -bench, on stdin) and prints them as one table: the wasm guests beside
// the same handler in native Go, as make bench shows them. Lines that are
// not benchmark results pass through to stderr, unless -quiet.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// results are benchmark values by name (without the -GOMAXPROCS suffix),
// then unit. A benchmark run more than once keeps its last line.
type results map[string]map[string]float64

var suffix = regexp.MustCompile(`-\d+$`)

// parse reads benchmark lines: "BenchmarkName-2  N  V unit  V unit ...".
func parse(r io.Reader, other io.Writer) (results, error) {
	res := results{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") || len(f)%2 != 0 {
			fmt.Fprintln(other, sc.Text())
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			fmt.Fprintln(other, sc.Text())
			continue
		}
		name := suffix.ReplaceAllString(f[0], "")
		m := map[string]float64{}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return nil, fmt.Errorf("%s: value %q: %w", name, f[i], err)
			}
			m[f[i+1]] = v
		}
		res[name] = m
	}
	return res, sc.Err()
}

// cell formats the value of unit in benchmark name, scaled, or "-".
func (r results) cell(name, unit string, scale float64, prec int) string {
	v, ok := r[name][unit]
	if !ok {
		return "-"
	}
	return strconv.FormatFloat(v*scale, 'f', prec, 64)
}

type row struct {
	metric     string
	bench      string // with %s for the guest
	unit       string
	scale      float64
	prec       int
	guests     [4]string // go, assemblyscript, wat, native: sub-benchmark names, "" for none
	comparable bool      // the wasm Go cell is compared with the native one
}

var rows = []row{
	{"local round trip through the broker, p50 (µs)", "BenchmarkLocalRoundTrip/%s", "p50-µs", 1, 0, [4]string{"wasm-go", "wasm-as", "", "native"}, true},
	{"local round trip through the broker, p99 (µs)", "BenchmarkLocalRoundTrip/%s", "p99-µs", 1, 0, [4]string{"wasm-go", "wasm-as", "", "native"}, true},
	{"calls/s through the broker, 64 in flight", "BenchmarkLocalThroughput/%s", "calls/s", 1, 0, [4]string{"wasm-go", "wasm-as", "", "native"}, true},
	{"direct call of the echo, 256 B (µs)", "BenchmarkCall256/%s", "ns/op", 1e-3, 1, [4]string{"go", "assemblyscript", "wat", ""}, false},
	{"the same without wazero's termination checks (µs)", "BenchmarkCall256Unterminated/%s", "ns/op", 1e-3, 1, [4]string{"go", "assemblyscript", "wat", ""}, false},
	{"load with a warm compilation cache (ms)", "BenchmarkLoadWarm/%s", "ns/op", 1e-6, 1, [4]string{"go", "assemblyscript", "", ""}, false},
	{"module size (MiB)", "BenchmarkLoadWarm/%s", "module-MiB", 1, 2, [4]string{"go", "assemblyscript", "", ""}, false},
	{"linear memory per pooled instance (MiB)", "BenchmarkInstanceMemory/%s", "linear-MiB/instance", 1, 2, [4]string{"go", "", "wat", ""}, false},
	{"host heap per pooled instance (MiB)", "BenchmarkInstanceMemory/%s", "heap-MiB/instance", 1, 2, [4]string{"go", "", "wat", ""}, false},
}

func write(w io.Writer, r results) {
	fmt.Fprintln(w, "| handler metric | wasm Go | wasm AssemblyScript | wasm .wat (host floor) | native Go (peer) | wasm Go - native |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|")
	for _, row := range rows {
		cells := make([]string, 4)
		for i, g := range row.guests {
			cells[i] = "-"
			if g != "" {
				cells[i] = r.cell(fmt.Sprintf(row.bench, g), row.unit, row.scale, row.prec)
			}
		}
		diff := ""
		if row.comparable {
			w, okW := r[fmt.Sprintf(row.bench, row.guests[0])][row.unit]
			n, okN := r[fmt.Sprintf(row.bench, row.guests[3])][row.unit]
			if okW && okN {
				diff = fmt.Sprintf("%+.0f", (w-n)*row.scale)
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", row.metric, cells[0], cells[1], cells[2], cells[3], diff)
	}
}

// writeDialects prints the hub dialects' tables: the method round trip
// through the hub emulator (wasm beside native), and telemetry in each
// dialect beside the generic one.
func writeDialects(w io.Writer, r results) {
	if _, ok := r["BenchmarkHubMethodRoundTrip/native"]; !ok {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| method round trip: hub emulator -> agent (azure) -> handler -> hub, 256 B | wasm Go | native Go (peer) | wasm Go - native |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	for _, q := range []struct{ name, unit string }{{"p50 (µs)", "p50-µs"}, {"p99 (µs)", "p99-µs"}} {
		wv, okW := r["BenchmarkHubMethodRoundTrip/wasm-go"][q.unit]
		nv, okN := r["BenchmarkHubMethodRoundTrip/native"][q.unit]
		diff := ""
		if okW && okN {
			diff = fmt.Sprintf("%+.0f", wv-nv)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", q.name, r.cell("BenchmarkHubMethodRoundTrip/wasm-go", q.unit, 1, 0),
			r.cell("BenchmarkHubMethodRoundTrip/native", q.unit, 1, 0), diff)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| telemetry drained to the hub emulator, 200 B, QoS 1 | generic (peer) | azure | watson |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	g := r.cell("BenchmarkDialectTelemetry/generic", "msg/s", 1, 0)
	fmt.Fprintf(w, "| msg/s | %s | %s | %s |\n", g, r.cell("BenchmarkDialectTelemetry/azure", "msg/s", 1, 0),
		r.cell("BenchmarkDialectTelemetry/watson", "msg/s", 1, 0))
	if gv, ok := r["BenchmarkDialectTelemetry/generic"]["msg/s"]; ok && gv > 0 {
		ratio := func(d string) string {
			v, ok := r["BenchmarkDialectTelemetry/"+d]["msg/s"]
			if !ok {
				return "-"
			}
			return fmt.Sprintf("%.2fx", v/gv)
		}
		fmt.Fprintf(w, "| against generic | 1.00x | %s | %s |\n", ratio("azure"), ratio("watson"))
	}
}

func main() {
	quiet := flag.Bool("quiet", false, "do not pass the lines that are not results to stderr")
	flag.Parse()
	var other io.Writer = os.Stderr
	if *quiet {
		other = io.Discard
	}
	r, err := parse(os.Stdin, other)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
	write(os.Stdout, r)
	writeDialects(os.Stdout, r)
}
