package rollout

import (
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/abi"
)

// TestParseParams reads both shapes: a method's JSON object and a Watson
// custom action's fields; anything else is refused with what is wanted.
func TestParseParams(t *testing.T) {
	for _, tc := range []struct {
		name    string
		kind    abi.Kind
		payload string
		want    Params
		err     string
	}{
		{"empty", abi.KindMethod, "", Params{}, ""},
		{"method", abi.KindMethod, `{"name":"p","uri":"http://h/m.wasm","sha256":"ab"}`, Params{Name: "p", URI: "http://h/m.wasm", SHA256: "ab"}, ""},
		{"fields", abi.KindDMAction, `{"fields":[{"field":"name","value":"p"},{"field":"manifestUri","value":"https://h/m.yaml"}]}`,
			Params{Name: "p", ManifestURI: "https://h/m.yaml"}, ""},
		{"fields on a method", abi.KindMethod, `{"fields":[]}`, Params{}, `unknown parameter "fields"`},
		{"not an object", abi.KindMethod, `[1]`, Params{}, "not a JSON object"},
		{"not a string", abi.KindMethod, `{"name":1}`, Params{}, "parameter name: want a string"},
		{"unknown", abi.KindDMAction, `{"fields":[{"field":"url","value":"x"}]}`, Params{}, `unknown parameter "url"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseParams(tc.kind, []byte(tc.payload))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v %v, want %+v", got, err, tc.want)
			}
		})
	}
}

// TestCheckInstall names each missing or bad parameter of an install.
func TestCheckInstall(t *testing.T) {
	sum := strings.Repeat("ab", 32)
	ok := Params{Name: "p", URI: "https://h/m.wasm", SHA256: sum, Manifest: "name: p"}
	if err := ok.checkInstall(); err != nil {
		t.Fatal(err)
	}
	err := Params{Name: "p", URI: "file:///m.wasm", SHA256: "xyz", Manifest: "m", ManifestURI: "https://h/m"}.checkInstall()
	for _, w := range []string{"uri:", "sha256:", "manifest: want either"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v does not name %q", err, w)
		}
	}
}

// FuzzParseParams: no payload makes the parser panic.
func FuzzParseParams(f *testing.F) {
	f.Add([]byte(`{"fields":[{"field":"name","value":"p"}]}`))
	f.Add([]byte(`{"name":"p","sha256":"00"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ParseParams(abi.KindDMAction, b)
		_, _ = ParseParams(abi.KindMethod, b)
	})
}
