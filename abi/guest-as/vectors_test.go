// Package guestas holds the tests of the AssemblyScript SDK, run through
// the real host.
package guestas

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
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
	p := loadTestModule(t)
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

// loadTestModule builds and loads the SDK's test module (test/assembly).
func loadTestModule(t *testing.T) *sandbox.Plugin {
	t.Helper()
	wasm := wasmtest.BuildAS(t, "test")
	e, err := sandbox.NewEngine("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	p, err := e.Load(context.Background(), wasm, sandbox.Config{Name: "as-vectors", Limits: sandbox.Limits{MaxRequest: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close(context.Background()) })
	return p
}

// TestDecoderRefusesOversize: an envelope over abi.MaxMetaSize is refused,
// as the Go codec refuses it.
func TestDecoderRefusesOversize(t *testing.T) {
	p := loadTestModule(t)
	m := abi.Meta{Kind: abi.KindMethod, Name: strings.Repeat("n", abi.MaxString), RequestID: "r"}
	env, err := abi.AppendMeta(nil, &m)
	if !errors.Is(err, abi.ErrMetaTooBig) {
		t.Fatalf("the Go codec: %v", err)
	}
	// AppendMeta refuses to write it; the bytes are what it would write.
	env = append([]byte{abi.MetaVersion, byte(abi.KindMethod), 0, 0, 0, 0, 0, 0, 0xff, 0xff}, []byte(m.Name)...)
	env = append(env, 1, 0, 'r', 0, 0, 0, 0)
	if _, err := abi.DecodeMeta(env); !errors.Is(err, abi.ErrMetaTooBig) {
		t.Fatalf("the Go decoder: %v", err)
	}
	r := p.Call(context.Background(), &sandbox.Request{Meta: abi.Meta{Kind: abi.KindMethod, Name: "decode"}, Payload: env})
	if r.Status != 400 || !strings.Contains(string(r.Payload), "over the size limit") {
		t.Fatalf("status %d, %s", r.Status, r.Payload)
	}
}

// TestWithCopies: Response.with leaves the response it is called on as it
// was, as the Go SDK's With does.
func TestWithCopies(t *testing.T) {
	p := loadTestModule(t)
	for i := range 3 {
		r := p.Call(context.Background(), &sandbox.Request{Meta: abi.Meta{Kind: abi.KindMethod, Name: "shared"}})
		if r.Status != 200 || len(r.Props) != 1 {
			t.Fatalf("call %d: status %d, properties %v", i, r.Status, r.Props)
		}
	}
}

// TestRequestIDIsBytes: a request id that is not UTF-8 (MQTT correlation
// data is binary) reaches the handler byte for byte.
func TestRequestIDIsBytes(t *testing.T) {
	p := loadTestModule(t)
	id := "\xff\x00A\x80\xc3"
	r := p.Call(context.Background(), &sandbox.Request{Meta: abi.Meta{Kind: abi.KindMethod, Name: "rid", RequestID: id}})
	if r.Status != 200 || string(r.Payload) != id {
		t.Fatalf("status %d, request id % x, want % x", r.Status, r.Payload, id)
	}
}
