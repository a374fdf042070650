package guest

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/abi"
)

type captured struct{ resp Response }

func (c *captured) send(r Response) abi.Status { c.resp = r; return r.Status }

func encode(t *testing.T, m abi.Meta) string {
	t.Helper()
	b, err := abi.AppendMeta(nil, &m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// isolate gives the test an empty set of handlers and puts the package's
// back after it, so that tests can run twice in one process (-count).
func isolate(t *testing.T) {
	saved := handlers
	handlers = nil
	t.Cleanup(func() { handlers = saved })
}

func TestRegisterNilPanics(t *testing.T) {
	isolate(t)
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), `method "x" registered with a nil handler`) {
			t.Fatalf("recovered %v", r)
		}
	}()
	Method("x", nil)
}

// TestServeRoutes: a request goes to the handler registered for its kind
// and name, with its metadata; unknown names get 501, bad metadata 400.
func TestServeRoutes(t *testing.T) {
	isolate(t)
	Method("getDiagnostics", func(r *Request) Response {
		return JSON(200, map[string]any{"name": r.Name, "prop": r.Prop("x"), "redelivered": r.Redelivered()})
	})
	Command("getDiagnostics", func(r *Request) Response { return Text(202, "command") })
	var c captured
	st := serve(encode(t, abi.Meta{Kind: abi.KindMethod, Name: "getDiagnostics", Flags: abi.FlagRedelivery,
		Props: []abi.Property{{Key: "x", Value: "1"}}}), 0, &c)
	var got map[string]any
	if err := json.Unmarshal(c.resp.Body, &got); err != nil || st != 200 || c.resp.ContentType != "application/json" {
		t.Fatalf("status %d, body %s, content type %q, %v", st, c.resp.Body, c.resp.ContentType, err)
	}
	if got["name"] != "getDiagnostics" || got["prop"] != "1" || got["redelivered"] != true {
		t.Fatalf("handler saw %v", got)
	}
	if st := serve(encode(t, abi.Meta{Kind: abi.KindCommand, Name: "getDiagnostics"}), 0, &c); st != 202 || string(c.resp.Body) != "command" {
		t.Fatalf("the command of the same name: status %d, body %q", st, c.resp.Body)
	}
	if st := serve(encode(t, abi.Meta{Kind: abi.KindDMAction, Name: "getDiagnostics"}), 0, &c); st != 501 || !strings.Contains(string(c.resp.Body), `no handler for dm_action \"getDiagnostics\"`) {
		t.Fatalf("unknown: status %d, body %s", st, c.resp.Body)
	}
	if st := serve("\x00\x01\x02", 0, &c); st != 400 || !strings.Contains(string(c.resp.Body), "truncated") {
		t.Fatalf("bad metadata: status %d, body %s", st, c.resp.Body)
	}
}

func TestRegisterTwicePanics(t *testing.T) {
	isolate(t)
	DMAction("twice", func(*Request) Response { return Status(200) })
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), `dm_action "twice" registered twice`) {
			t.Fatalf("recovered %v", r)
		}
	}()
	DMAction("twice", func(*Request) Response { return Status(200) })
}

func TestResponses(t *testing.T) {
	r := Error(422, errors.New(`bad "thing"`)).With("k", "v")
	if r.Status != 422 || string(r.Body) != `{"error":"bad \"thing\""}` || r.Props[0] != (abi.Property{Key: "k", Value: "v"}) {
		t.Fatalf("%+v", r)
	}
	if r := JSON(200, func() {}); r.Status != 500 || !strings.Contains(string(r.Body), "encoding the response") {
		t.Fatalf("unencodable: %+v", r)
	}
	base := Status(200).With("a", "1")
	x, y := base.With("b", "2"), base.With("c", "3")
	if len(x.Props) != 2 || x.Props[1].Key != "b" || y.Props[1].Key != "c" {
		t.Fatalf("With shares properties: %v %v", x.Props, y.Props)
	}
}

// TestInvalidStatusBecomes500: a handler that returns no valid status gets
// a 500 that says so, not a response the host would refuse.
func TestInvalidStatusBecomes500(t *testing.T) {
	isolate(t)
	Method("zero", func(*Request) Response { return Response{} })
	var c captured
	if st := serve(encode(t, abi.Meta{Kind: abi.KindMethod, Name: "zero"}), 0, &c); st != 500 || !strings.Contains(string(c.resp.Body), "returned status 0") {
		t.Fatalf("status %d, body %s", st, c.resp.Body)
	}
}
