package rollout

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
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

// stubRegistry's Rollback waits until release is closed, after saying so
// on entered; its other methods answer at once.
type stubRegistry struct {
	entered chan string
	release chan struct{}
}

func (s *stubRegistry) Install(context.Context, []byte, []byte, []byte) (plugins.Info, error) {
	return plugins.Info{}, errors.New("not used")
}
func (s *stubRegistry) Rollback(_ context.Context, name string) (plugins.Info, error) {
	s.entered <- name
	<-s.release
	return plugins.Info{Name: name, Version: "1.0.0"}, nil
}
func (s *stubRegistry) Remove(context.Context, string) error { return nil }
func (s *stubRegistry) List() []plugins.Info                 { return nil }

// nextServer records the calls passed on.
type nextServer struct{ names chan string }

func (n nextServer) Serve(c dispatch.Call, done func(*sandbox.Response)) {
	n.names <- c.Meta.Name
	done(&sandbox.Response{Status: abi.StatusOK})
}

// TestServeRouting: other requests pass to the dispatcher; a Watson
// rollout action for another device (a gateway's child) is 404; a second
// operation while one runs is 409; Close answers later requests 503.
func TestServeRouting(t *testing.T) {
	reg := &stubRegistry{entered: make(chan string, 1), release: make(chan struct{})}
	next := nextServer{names: make(chan string, 1)}
	r, err := New(Options{Registry: reg, Next: next, DeviceType: "gw", DeviceID: "g1"})
	if err != nil {
		t.Fatal(err)
	}
	serve := func(m abi.Meta, payload string) chan *sandbox.Response {
		ch := make(chan *sandbox.Response, 1)
		r.Serve(dispatch.Call{Meta: m, Payload: []byte(payload)}, func(resp *sandbox.Response) { ch <- resp })
		return ch
	}
	if resp := <-serve(abi.Meta{Kind: abi.KindMethod, Name: "echo"}, ""); resp.Status != 200 || <-next.names != "echo" {
		t.Fatalf("another method: %+v", resp)
	}
	child := abi.Meta{Kind: abi.KindDMAction, Name: "custom:" + Bundle + ":remove",
		Props: []abi.Property{{Key: "device-type", Value: "sensor"}, {Key: "device-id", Value: "s1"}}}
	if resp := <-serve(child, `{"fields":[{"field":"name","value":"p"}]}`); resp.Status != 404 || !strings.Contains(string(resp.Payload), "gw:g1") {
		t.Fatalf("a child's action: %d %s", resp.Status, resp.Payload)
	}
	first := serve(abi.Meta{Kind: abi.KindMethod, Name: MethodRollback}, `{"name":"p"}`)
	if got := <-reg.entered; got != "p" {
		t.Fatalf("rollback of %q", got)
	}
	self := abi.Meta{Kind: abi.KindDMAction, Name: "custom:" + Bundle + ":remove",
		Props: []abi.Property{{Key: "device-type", Value: "gw"}, {Key: "device-id", Value: "g1"}}}
	if resp := <-serve(self, `{"fields":[{"field":"name","value":"p"}]}`); resp.Status != 409 {
		t.Fatalf("a second operation while one runs: %d %s", resp.Status, resp.Payload)
	}
	close(reg.release)
	if resp := <-first; resp.Status != 200 || !strings.Contains(string(resp.Payload), `"version":"1.0.0"`) {
		t.Fatalf("rollback: %d %s", resp.Status, resp.Payload)
	}
	if resp := <-serve(self, `{"fields":[{"field":"name","value":"p"}]}`); resp.Status != 200 || string(resp.Payload) != "removed p" {
		t.Fatalf("remove: %d %s", resp.Status, resp.Payload)
	}
	r.Close(context.Background())
	if resp := <-serve(self, `{"fields":[{"field":"name","value":"p"}]}`); resp.Status != 503 {
		t.Fatalf("after Close: %d %s", resp.Status, resp.Payload)
	}
}
