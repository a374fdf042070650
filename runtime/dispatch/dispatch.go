// Package dispatch turns requests into calls of the plugin that serves
// them, and their results into responses, with a bound on the requests
// served at once. Requests come from the hub (through a dialect, Serve) and
// from local clients: MQTT 5 request/response on the local broker, which
// works whether or not the uplink is connected (Local).
//
// A local client publishes to outpost/methods/{name} (or
// outpost/commands/{name}) with a Response Topic and Correlation Data; the
// response comes back on the Response Topic with the same Correlation Data,
// the handler's payload, content type and properties, and the status as the
// user property "status".
package dispatch

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

// Topic filters of local requests.
const (
	MethodsFilter  = "outpost/methods/+"
	CommandsFilter = "outpost/commands/+"
)

// StatusProperty is the user property that carries a response's status.
const StatusProperty = "status"

// Caller serves a request (plugins.Registry).
type Caller interface {
	Call(ctx context.Context, req *sandbox.Request) *sandbox.Response
}

// Request is a local request as the broker received it.
type Request struct {
	Topic         string
	Payload       []byte
	ContentType   string
	ResponseTopic string
	Correlation   []byte
	Expiry        time.Duration // MQTT 5 Message Expiry: the caller's deadline
	Props         []abi.Property
	QoS           byte
}

// Reply is a response to publish on the local broker.
type Reply struct {
	Topic       string
	Payload     []byte
	ContentType string
	Correlation []byte
	Props       []abi.Property
	QoS         byte
}

// Call is a request from any transport: the metadata and payload a handler
// receives.
type Call struct {
	Meta    abi.Meta
	Payload []byte
}

// job is one request waiting for, or held by, a worker.
type job struct {
	call Call
	bad  *sandbox.Response // the answer when the request is not one a handler can serve
	done func(*sandbox.Response)
}

// Dispatcher serves requests, at most a bounded number at once. Its
// methods are safe for concurrent use; Close it when done.
type Dispatcher struct {
	caller Caller
	reply  func(Reply) error
	log    *slog.Logger
	// inflight counts the requests held; limit bounds it (SetLimit
	// changes it while the dispatcher runs).
	inflight atomic.Int64
	limit    atomic.Int64
	work     chan job      // to a worker waiting for one; unbuffered
	quit     chan struct{} // closed by Close
	idle     time.Duration // workerIdle; tests change it
	mu       sync.Mutex    // orders wg.Add after Close's check
	closed   bool
	wg       sync.WaitGroup
}

// workerIdle is how long a worker waits for another request before it
// ends. Workers outlive their request because a new goroutine grows its
// stack again for each response it publishes (mochi's path is deep):
// about a fifth of the CPU under load (see docs/DECISIONS.md).
const workerIdle = 5 * time.Second

// New returns a dispatcher that calls caller and publishes local replies
// with reply, serving up to concurrent requests at once (beyond that they
// are answered 429).
func New(caller Caller, reply func(Reply) error, concurrent int, log *slog.Logger) *Dispatcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dispatcher{caller: caller, reply: reply, log: log, work: make(chan job), quit: make(chan struct{}), idle: workerIdle}
	d.limit.Store(int64(concurrent))
	return d
}

// SetLimit changes the bound on the requests served at once; requests
// already held are served.
func (d *Dispatcher) SetLimit(concurrent int) { d.limit.Store(int64(concurrent)) }

// Local serves a local request in the background and publishes the
// response on its response topic. It does not block.
func (d *Dispatcher) Local(r Request) {
	j := job{done: func(resp *sandbox.Response) { d.respond(r, resp) }}
	kind, name, err := parseTopic(r.Topic)
	if err != nil {
		j.bad = &sandbox.Response{Status: abi.StatusBadRequest, Payload: []byte(err.Error()),
			Props: []abi.Property{{Key: "outpost-error", Value: "bad_request"}}}
	}
	j.call.Meta = abi.Meta{Kind: kind, Name: name, Deadline: r.Expiry, ContentType: r.ContentType, Props: r.Props,
		RequestID: string(r.Correlation)}
	if r.ResponseTopic != "" {
		j.call.Meta.Flags |= abi.FlagResponseExpected
	}
	j.call.Payload = r.Payload
	d.start(j)
}

// Serve serves c in the background and gives the response to done, on
// another goroutine. It does not block, except that beyond the bound done
// gets 429, and after Close 503, on the caller's goroutine.
func (d *Dispatcher) Serve(c Call, done func(*sandbox.Response)) {
	d.start(job{call: c, done: done})
}

// start hands j to an idle worker or a new one.
func (d *Dispatcher) start(j job) {
	if d.inflight.Add(1) > d.limit.Load() {
		d.inflight.Add(-1)
		j.done(&sandbox.Response{Status: abi.StatusTooManyRequests, Payload: []byte("too many requests in progress"),
			Props: []abi.Property{{Key: "outpost-error", Value: sandbox.FailRejected}}})
		return
	}
	select {
	case d.work <- j: // an idle worker takes it
		return
	default:
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		d.inflight.Add(-1)
		j.done(&sandbox.Response{Status: abi.StatusUnavailable, Payload: []byte("the agent is stopping"),
			Props: []abi.Property{{Key: "outpost-error", Value: sandbox.FailRejected}}})
		return
	}
	d.wg.Add(1)
	d.mu.Unlock()
	go d.worker(j)
}

// worker serves j, then the jobs handed to it, until it has waited d.idle
// for one or the dispatcher closes. One starts only when none is idle, so
// there are about as many as the most requests served at once.
func (d *Dispatcher) worker(j job) {
	defer d.wg.Done()
	idle := time.NewTimer(d.idle)
	defer idle.Stop()
	for {
		resp := j.bad
		if resp == nil {
			resp = d.call(j.call)
		}
		// The slot is free before the response leaves: a client that
		// sends its next request on it must not find the bound reached.
		d.inflight.Add(-1)
		j.done(resp)
		idle.Reset(d.idle)
		select {
		case j = <-d.work:
		case <-idle.C:
			return
		case <-d.quit:
			return
		}
	}
}

// call serves c with its handler.
func (d *Dispatcher) call(c Call) *sandbox.Response {
	start := time.Now()
	// Not a cancellable context: the sandbox would register each call with
	// it, which costs every call; a shutdown ends calls through the
	// registry (plugins.Registry.Close) instead.
	resp := d.caller.Call(context.Background(), &sandbox.Request{Meta: c.Meta, Payload: c.Payload})
	m := &c.Meta
	if resp.Err != nil {
		d.log.Warn("request failed", "kind", m.Kind, "name", m.Name, "status", int(resp.Status), "error", resp.Err, "took", time.Since(start))
	} else {
		d.log.Debug("request served", "kind", m.Kind, "name", m.Name, "status", int(resp.Status), "took", time.Since(start))
	}
	return resp
}

// respond publishes resp on r's response topic, if it has one.
func (d *Dispatcher) respond(r Request, resp *sandbox.Response) {
	if r.ResponseTopic == "" {
		return
	}
	props := make([]abi.Property, 0, len(resp.Props)+1)
	props = append(props, abi.Property{Key: StatusProperty, Value: strconv.Itoa(int(resp.Status))})
	props = append(props, resp.Props...)
	err := d.reply(Reply{Topic: r.ResponseTopic, Payload: resp.Payload, ContentType: resp.ContentType,
		Correlation: r.Correlation, Props: props, QoS: r.QoS})
	if err != nil {
		d.log.Warn("could not publish a response", "topic", r.ResponseTopic, "error", err)
	}
}

// parseTopic reads the kind and name of a request topic.
func parseTopic(topic string) (abi.Kind, string, error) {
	var kind abi.Kind
	var name string
	switch {
	case strings.HasPrefix(topic, "outpost/methods/"):
		kind, name = abi.KindMethod, strings.TrimPrefix(topic, "outpost/methods/")
	case strings.HasPrefix(topic, "outpost/commands/"):
		kind, name = abi.KindCommand, strings.TrimPrefix(topic, "outpost/commands/")
	default:
		return 0, "", fmt.Errorf("%q is not a request topic (outpost/methods/NAME, outpost/commands/NAME)", topic)
	}
	if name == "" || strings.Contains(name, "/") {
		return 0, "", fmt.Errorf("%q: the name must be one non-empty topic level", topic)
	}
	return kind, name, nil
}

// Close ends the workers and waits for the requests in progress, or until
// ctx ends: the calls then still running end when the caller's shutdown
// ends them (plugins.Registry.Close). Requests that arrive after Close are
// answered 503.
func (d *Dispatcher) Close(ctx context.Context) {
	d.mu.Lock()
	if !d.closed {
		d.closed = true
		close(d.quit)
	}
	d.mu.Unlock()
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}
