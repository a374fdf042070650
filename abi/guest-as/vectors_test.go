// Package guestas holds the tests of the AssemblyScript SDK, run through
// the real host.
package guestas

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

type vector struct {
	Name    string          `json:"name"`
	Meta    json.RawMessage `json:"meta"`
	Encodes *bool           `json:"encodes"`
	Error   string          `json:"error"`
	Hex     string          `json:"hex"`
}

// TestDecoderVectors: the AssemblyScript SDK decodes every golden vector
// of abi/testdata as the Go codec does, and refuses the invalid ones.
func TestDecoderVectors(t *testing.T) {
	wasm := wasmtest.BuildAS(t, "test")
	e, err := sandbox.NewEngine("")
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close(context.Background())
	p, err := e.Load(context.Background(), wasm, sandbox.Config{Name: "as-vectors"})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(context.Background())
	b, err := os.ReadFile("../testdata/meta_vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(b, &vs); err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		t.Run(v.Name, func(t *testing.T) {
			env, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			r := p.Call(context.Background(), &sandbox.Request{Meta: abi.Meta{Kind: abi.KindMethod, Name: "decode"}, Payload: env})
			if v.Meta == nil {
				if r.Status != 400 || !strings.Contains(string(r.Payload), v.Error) {
					t.Fatalf("status %d, %s; want 400 with %q", r.Status, r.Payload, v.Error)
				}
				return
			}
			if r.Status != 200 {
				t.Fatalf("status %d, %s, %v", r.Status, r.Payload, r.Err)
			}
			var got, want map[string]any
			if err := json.Unmarshal(r.Payload, &got); err != nil {
				t.Fatalf("%s: %v", r.Payload, err)
			}
			if err := json.Unmarshal(v.Meta, &want); err != nil {
				t.Fatal(err)
			}
			if want["props"] == nil {
				want["props"] = []any{}
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("decoded\n%v\nwant\n%v", got, want)
			}
		})
	}
}
