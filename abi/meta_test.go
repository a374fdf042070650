package abi

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the hex of the valid vectors in testdata/meta_vectors.json from their fields")

// vector is one golden vector, shared with the guest SDKs of other
// languages: testdata/meta_vectors.json.
type vector struct {
	Name string `json:"name"`
	// Meta is set for a valid envelope; Error (a substring of the
	// decoder's error) for an invalid one.
	Meta *struct {
		Kind        uint8       `json:"kind"`
		Flags       uint16      `json:"flags"`
		DeadlineMS  uint32      `json:"deadline_ms"`
		Name        string      `json:"name"`
		RequestID   string      `json:"request_id"`
		ContentType string      `json:"content_type"`
		Props       [][2]string `json:"props"`
	} `json:"meta,omitempty"`
	// Encodes is false for a valid envelope that decodes but that this
	// version does not write (a later version's trailing fields).
	Encodes *bool  `json:"encodes,omitempty"`
	Error   string `json:"error,omitempty"`
	Hex     string `json:"hex"`
}

func (v *vector) meta() Meta {
	m := Meta{Kind: Kind(v.Meta.Kind), Flags: Flags(v.Meta.Flags), Deadline: time.Duration(v.Meta.DeadlineMS) * time.Millisecond,
		Name: v.Meta.Name, RequestID: v.Meta.RequestID, ContentType: v.Meta.ContentType}
	for _, p := range v.Meta.Props {
		m.Props = append(m.Props, Property{p[0], p[1]})
	}
	return m
}

func loadVectors(t *testing.T) []vector {
	t.Helper()
	b, err := os.ReadFile("testdata/meta_vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(b, &vs); err != nil {
		t.Fatalf("meta_vectors.json: %v", err)
	}
	if len(vs) == 0 {
		t.Fatal("meta_vectors.json holds no vectors")
	}
	return vs
}

// TestMetaVectors: every valid vector encodes to its bytes and decodes to
// its fields; every invalid one is refused with the error it names.
func TestMetaVectors(t *testing.T) {
	vs := loadVectors(t)
	changed := false
	for i := range vs {
		v := &vs[i]
		t.Run(v.Name, func(t *testing.T) {
			if v.Meta == nil {
				b, err := hex.DecodeString(v.Hex)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := DecodeMeta(b); err == nil || !strings.Contains(err.Error(), v.Error) {
					t.Fatalf("decode: %v, want an error containing %q", err, v.Error)
				}
				if _, err := DecodeMetaString(string(b)); err == nil || !strings.Contains(err.Error(), v.Error) {
					t.Fatalf("decode from a string: %v, want an error containing %q", err, v.Error)
				}
				return
			}
			want := v.meta()
			if v.Encodes == nil || *v.Encodes {
				enc, err := AppendMeta(nil, &want)
				if err != nil {
					t.Fatal(err)
				}
				if *update && hex.EncodeToString(enc) != v.Hex {
					v.Hex, changed = hex.EncodeToString(enc), true
				}
				if got := hex.EncodeToString(enc); got != v.Hex {
					t.Fatalf("encodes to\n%s\nwant\n%s", got, v.Hex)
				}
			}
			b, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			got, err := DecodeMeta(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("decodes to %+v, want %+v", got, want)
			}
			got, err = DecodeMetaString(string(b))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("decodes from a string to %+v, want %+v", got, want)
			}
		})
	}
	if changed {
		out, err := json.MarshalIndent(vs, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile("testdata/meta_vectors.json", append(out, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Log("rewrote testdata/meta_vectors.json")
	}
}

// TestMetaLayout checks the layout of ABI.md's example byte by byte,
// independently of the vectors file.
func TestMetaLayout(t *testing.T) {
	m := Meta{Kind: KindMethod, Flags: FlagResponseExpected, Deadline: 30 * time.Second,
		Name: "reboot", RequestID: "r1", ContentType: "application/json", Props: []Property{{"a", "b"}}}
	got, err := AppendMeta(nil, &m)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{
		1,          // meta version
		2,          // kind: method
		0x01, 0x00, // flags: response expected
		0x30, 0x75, 0x00, 0x00, // deadline 30000 ms
		6, 0, 'r', 'e', 'b', 'o', 'o', 't',
		2, 0, 'r', '1',
		16, 0, 'a', 'p', 'p', 'l', 'i', 'c', 'a', 't', 'i', 'o', 'n', '/', 'j', 's', 'o', 'n',
		1, 0, // one property
		1, 0, 'a', 1, 0, 'b',
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got  % x\nwant % x", got, want)
	}
}

// TestAppendMetaRefuses: what cannot be encoded is refused with an error
// that names it, and dst is left as it was.
func TestAppendMetaRefuses(t *testing.T) {
	long := strings.Repeat("x", MaxString+1)
	many := make([]Property, MaxProps+1)
	big := make([]Property, 2)
	for i := range big {
		big[i] = Property{"k", strings.Repeat("v", 40<<10)}
	}
	for _, c := range []struct {
		m    Meta
		want string
	}{
		{Meta{Name: long}, "name is 65536 bytes"},
		{Meta{RequestID: long}, "request id is 65536 bytes"},
		{Meta{ContentType: long}, "content type is 65536 bytes"},
		{Meta{Props: []Property{{"k", "v"}, {long, "v"}}}, "property 1 key"},
		{Meta{Props: []Property{{"k", long}}}, "property 0 value"},
		{Meta{Props: many}, "65536 properties"},
		{Meta{Props: big}, "over the size limit"},
		{Meta{Deadline: -time.Millisecond}, "deadline"},
		{Meta{Deadline: 1 << 32 * time.Millisecond}, "deadline"},
	} {
		dst := []byte("keep")
		out, err := AppendMeta(dst, &c.m)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("error %v, want one containing %q", err, c.want)
		}
		if string(out) != "keep" {
			t.Errorf("dst became %q after a refused append", out[:min(len(out), 16)])
		}
	}
}

func TestDecodeMetaTooBig(t *testing.T) {
	_, err := DecodeMeta(make([]byte, MaxMetaSize+1))
	if !errors.Is(err, ErrMetaTooBig) {
		t.Fatalf("error %v, want ErrMetaTooBig", err)
	}
}

// TestDecodeMetaDoesNotAlias: the decoded strings stay valid when the
// buffer is reused, as a guest does with its request buffer.
func TestDecodeMetaDoesNotAlias(t *testing.T) {
	b, err := AppendMeta(nil, &Meta{Kind: KindCommand, Name: "n", Props: []Property{{"k", "v"}}})
	if err != nil {
		t.Fatal(err)
	}
	m, err := DecodeMeta(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 'z'
	}
	if m.Name != "n" || m.Props[0] != (Property{"k", "v"}) {
		t.Fatalf("decoded fields changed with the buffer: %+v", m)
	}
}

// FuzzDecodeMeta: no input panics the decoder, both decoders agree, and
// whatever they accept encodes and decodes back to the same metadata.
func FuzzDecodeMeta(f *testing.F) {
	for _, m := range []Meta{
		{},
		{Kind: KindMethod, Flags: 3, Deadline: time.Second, Name: "m", RequestID: "r", ContentType: "c", Props: []Property{{"k", "v"}, {"", ""}}},
	} {
		b, err := AppendMeta(nil, &m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{1, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		ms, errs := DecodeMetaString(string(b))
		if (err == nil) != (errs == nil) || err != nil && err.Error() != errs.Error() {
			t.Fatalf("DecodeMeta: %v, DecodeMetaString: %v", err, errs)
		}
		if err != nil {
			return
		}
		if !reflect.DeepEqual(m, ms) {
			t.Fatalf("DecodeMeta: %+v, DecodeMetaString: %+v", m, ms)
		}
		enc, err := AppendMeta(nil, &m)
		if err != nil {
			t.Fatalf("decoded metadata does not encode: %v", err)
		}
		m2, err := DecodeMeta(enc)
		if err != nil {
			t.Fatalf("re-encoded metadata does not decode: %v", err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("unstable: %+v vs %+v", m, m2)
		}
	})
}

func TestParseKind(t *testing.T) {
	for _, k := range []Kind{KindCommand, KindMethod, KindDMAction} {
		if got, ok := ParseKind(k.String()); !ok || got != k {
			t.Errorf("ParseKind(%q) = %v, %v", k.String(), got, ok)
		}
	}
	if _, ok := ParseKind("kind(9)"); ok {
		t.Error("ParseKind accepted an unknown kind")
	}
}
