package sandbox

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/internal/wasmtest"
)

// TestInspect: Inspect reports a module's exports, imports and
// capabilities without running it, and names the problem Load would refuse
// it for, even with every capability granted.
func TestInspect(t *testing.T) {
	e := engine(t)
	info, err := e.Inspect(context.Background(), wasmtest.BuildGo(t, "testdata/capguest"))
	if err != nil {
		t.Fatal(err)
	}
	if info.Problem != "" || !info.HasInit && !info.HasIdle || !slices.Contains(info.Exports, "outpost_handle") ||
		!slices.Equal(info.Capabilities, []string{"outpost_kv_v1", "outpost_mqtt_v1"}) ||
		!slices.Contains(info.Imports, "outpost_kv_v1.kv_get") || len(info.SHA256) != 64 || info.MemoryPages == 0 {
		t.Fatalf("capguest: %+v", info)
	}
	wat := func(name string) []byte { return wasmtest.Wat(t, "testdata/wat/"+name+".wat") }
	for _, c := range []struct{ fixture, problem string }{
		{"echo", ""},
		{"kvimport", ""}, // granted here
		{"nohandle", "does not export outpost_handle"},
		{"badsig", "exports outpost_handle(i32) -> (i64), want outpost_handle(i32, i32) -> (i32)"},
		{"unknownimport", "imports outpost_v1.req_metadata, which this host (ABI v1) does not provide"},
		{"badimportsig", "imports outpost_v1.req_meta as (i32) -> (i32), want (i32, i32) -> (i32)"},
	} {
		info, err := e.Inspect(context.Background(), wat(c.fixture))
		if err != nil {
			t.Fatalf("%s: %v", c.fixture, err)
		}
		if c.problem == "" && info.Problem != "" || !strings.Contains(info.Problem, c.problem) {
			t.Errorf("%s: problem %q, want %q", c.fixture, info.Problem, c.problem)
		}
	}
	if _, err := e.Inspect(context.Background(), []byte("#!/bin/sh\nrm -rf /\n")); err == nil || !strings.Contains(err.Error(), "not a WebAssembly module") {
		t.Fatalf("a shell script: %v", err)
	}
	if _, err := e.Inspect(context.Background(), append(wat("echo")[:20:20], 0xff)); err == nil || !strings.Contains(err.Error(), "invalid module") {
		t.Fatalf("a truncated module: %v", err)
	}
}
