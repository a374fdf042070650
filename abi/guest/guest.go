// Package guest is the Go SDK for Outpost handlers (ABI v1, abi/ABI.md).
// A handler module registers its handlers in init and has an empty main:
//
//	func init() {
//		guest.Method("getDiagnostics", func(r *guest.Request) guest.Response {
//			return guest.JSON(200, map[string]any{"uptime_s": 42})
//		})
//	}
//
//	func main() {}
//
// Build it as a WASI reactor:
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o handler.wasm .
//
// The SDK exports outpost_abi_v1, outpost_handle, outpost_init and
// outpost_idle; the last lets the Go runtime collect between requests, off
// the request path, so the module's memory stays flat.
package guest

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/outpost-edge/outpost/abi"
)

// Handler serves one request.
type Handler func(r *Request) Response

// handlers are the registered handlers. A module has a handful: a scan
// costs a wasm guest less than a map's hashing.
var handlers []registered

type registered struct {
	kind abi.Kind
	name string
	h    Handler
}

func lookup(k abi.Kind, name string) Handler {
	for i := range handlers {
		if r := &handlers[i]; r.kind == k && r.name == name {
			return r.h
		}
	}
	return nil
}

// Method registers h for the direct method name.
func Method(name string, h Handler) { register(abi.KindMethod, name, h) }

// Command registers h for the command name.
func Command(name string, h Handler) { register(abi.KindCommand, name, h) }

// DMAction registers h for the device-management action name.
func DMAction(name string, h Handler) { register(abi.KindDMAction, name, h) }

func register(k abi.Kind, name string, h Handler) {
	if h == nil {
		panic(fmt.Sprintf("guest: %s %q registered with a nil handler", k, name))
	}
	if lookup(k, name) != nil {
		panic(fmt.Sprintf("guest: %s %q registered twice", k, name))
	}
	handlers = append(handlers, registered{k, name, h})
}

// OnInit registers fn to run once per instance before its first request,
// with the plugin's configuration (opaque bytes, JSON by convention). An
// error rejects the instance.
func OnInit(fn func(config []byte) error) { initFn = fn }

var initFn func([]byte) error

// Request is one request. Its payload is read from the host on demand.
type Request struct {
	abi.Meta
	payloadLen int
	read       int    // payload bytes read through Read
	payload    []byte // the whole payload, once Payload was called
}

// Redelivered reports whether the transport delivered this request before.
func (r *Request) Redelivered() bool { return r.Flags&abi.FlagRedelivery != 0 }

// Prop returns the value of the first property named key, or "".
func (r *Request) Prop(key string) string {
	for _, p := range r.Props {
		if p.Key == key {
			return p.Value
		}
	}
	return ""
}

// PayloadLen is the size of the payload in bytes.
func (r *Request) PayloadLen() int { return r.payloadLen }

// Payload returns the whole payload, reading it from the host the first
// time.
func (r *Request) Payload() []byte {
	if r.payload == nil && r.payloadLen > 0 {
		buf := make([]byte, r.payloadLen)
		n := readPayload(buf, 0)
		r.payload = buf[:n]
	}
	return r.payload
}

// Read reads the payload in chunks, for payloads too large to hold at once.
func (r *Request) Read(p []byte) (int, error) {
	if r.read >= r.payloadLen {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	n := readPayload(p, r.read)
	if n == 0 {
		return 0, io.EOF
	}
	r.read += n
	return n, nil
}

// JSON decodes the payload into v.
func (r *Request) JSON(v any) error {
	if err := json.Unmarshal(r.Payload(), v); err != nil {
		return fmt.Errorf("request payload: %w", err)
	}
	return nil
}

// Response is a handler's answer.
type Response struct {
	Status      abi.Status
	Body        []byte
	ContentType string
	Props       []abi.Property
}

// Status is a response with a status and no payload.
func Status(s abi.Status) Response { return Response{Status: s} }

// Text is a text/plain response.
func Text(s abi.Status, text string) Response {
	return Response{Status: s, Body: []byte(text), ContentType: "text/plain; charset=utf-8"}
}

// JSON is an application/json response with v encoded; if v does not
// encode, it is a 500 response that says why.
func JSON(s abi.Status, v any) Response {
	b, err := json.Marshal(v)
	if err != nil {
		return Error(500, fmt.Errorf("encoding the response: %w", err))
	}
	return Response{Status: s, Body: b, ContentType: "application/json"}
}

// Error is a JSON response {"error": err.Error()}.
func Error(s abi.Status, err error) Response {
	b, _ := json.Marshal(map[string]string{"error": err.Error()})
	return Response{Status: s, Body: b, ContentType: "application/json"}
}

// With returns r with a property added.
func (r Response) With(key, value string) Response {
	r.Props = append(r.Props[:len(r.Props):len(r.Props)], abi.Property{Key: key, Value: value})
	return r
}

// serve decodes the request, runs its handler and writes the response
// through w. It is what outpost_handle runs; tests run it with a fake host.
// The request's strings are substrings of meta, made once per request:
// allocations are what a request costs most in a Go guest.
func serve(meta string, payloadLen int, w responseWriter) abi.Status {
	m, err := abi.DecodeMetaString(meta)
	if err != nil {
		logf(abi.LogError, "bad request metadata: %v", err)
		return w.send(Error(400, err))
	}
	h := lookup(m.Kind, m.Name)
	if h == nil {
		return w.send(Error(501, fmt.Errorf("no handler for %s %q", m.Kind, m.Name)))
	}
	r := &Request{Meta: m, payloadLen: payloadLen}
	resp := h(r)
	if !resp.Status.Valid() {
		// The host would discard the instance for it; say why instead.
		logf(abi.LogError, "%s %q returned status %d", m.Kind, m.Name, resp.Status)
		resp = Error(500, fmt.Errorf("the handler returned status %d, not a status", resp.Status))
	}
	return w.send(resp)
}

// responseWriter sends a response to the host.
type responseWriter interface {
	send(Response) abi.Status
}

// Log logs msg at level (abi.LogTrace to abi.LogError), tagged by the host
// with the plugin and the request.
func Log(level int, msg string) { hostLog(level, msg) }

// Logf formats and logs, if the host would log at level.
func Logf(level int, format string, args ...any) { logf(level, format, args...) }

func logf(level int, format string, args ...any) {
	if logEnabled(level) {
		hostLog(level, fmt.Sprintf(format, args...))
	}
}
