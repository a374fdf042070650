// Package dispatch turns requests from local clients into calls of the
// plugin that serves them, and their results into responses: MQTT 5
// request/response on the local broker, which works whether or not the
// uplink is connected.
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

// Dispatcher serves local requests, at most a bounded number at once. Its
// methods are safe for concurrent use; Close it when done.
type Dispatcher struct {
	caller Caller
	reply  func(Reply) error
	log    *slog.Logger
	slots  chan struct{}
	work   chan Request  // to a worker waiting for one; unbuffered
	quit   chan struct{} // closed by Close
	idle   time.Duration // workerIdle; tests change it
	mu     sync.Mutex    // orders wg.Add after Close's check
	closed bool
	wg     sync.WaitGroup
}

// workerIdle is how long a worker waits for another request before it
// ends. Workers outlive their request because a new goroutine grows its
// stack again for each response it publishes (mochi's path is deep):
// about a fifth of the CPU under load (see docs/DECISIONS.md).
const workerIdle = 5 * time.Second

// New returns a dispatcher that calls caller and publishes replies with
// reply, serving up to concurrent requests at once (beyond that they are
// answered 429).
func New(caller Caller, reply func(Reply) error, concurrent int, log *slog.Logger) *Dispatcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Dispatcher{caller: caller, reply: reply, log: log, slots: make(chan struct{}, concurrent),
		work: make(chan Request), quit: make(chan struct{}), idle: workerIdle}
}

// Local serves r in the background. It does not block.
func (d *Dispatcher) Local(r Request) {
	select {
	case d.slots <- struct{}{}:
	default:
		d.respond(r, &sandbox.Response{Status: abi.StatusTooManyRequests, Payload: []byte("too many requests in progress"),
			Props: []abi.Property{{Key: "outpost-error", Value: sandbox.FailRejected}}})
		return
	}
	select {
	case d.work <- r: // an idle worker takes it
		return
	default:
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		<-d.slots
		d.respond(r, &sandbox.Response{Status: abi.StatusUnavailable, Payload: []byte("the agent is stopping"),
			Props: []abi.Property{{Key: "outpost-error", Value: sandbox.FailRejected}}})
		return
	}
	d.wg.Add(1)
	d.mu.Unlock()
	go d.worker(r)
}

// worker serves r, then the requests handed to it, until it has waited
// d.idle for one or the dispatcher closes. One starts only when none is
// idle, so there are about as many as the most requests served at once.
func (d *Dispatcher) worker(r Request) {
	defer d.wg.Done()
	idle := time.NewTimer(d.idle)
	defer idle.Stop()
	for {
		resp := d.call(r)
		// The slot is free before the response leaves: a client that
		// sends its next request on it must not find the bound reached.
		<-d.slots
		d.respond(r, resp)
		idle.Reset(d.idle)
		select {
		case r = <-d.work:
		case <-idle.C:
			return
		case <-d.quit:
			return
		}
	}
}

// call serves r: the handler's response, or the dispatcher's when r is not
// a request it can serve.
func (d *Dispatcher) call(r Request) *sandbox.Response {
	kind, name, err := parseTopic(r.Topic)
	if err != nil {
		return &sandbox.Response{Status: abi.StatusBadRequest, Payload: []byte(err.Error()),
			Props: []abi.Property{{Key: "outpost-error", Value: "bad_request"}}}
	}
	m := abi.Meta{Kind: kind, Name: name, Deadline: r.Expiry, ContentType: r.ContentType, Props: r.Props,
		RequestID: string(r.Correlation)}
	if r.ResponseTopic != "" {
		m.Flags |= abi.FlagResponseExpected
	}
	start := time.Now()
	// Not a cancellable context: the sandbox would register each call with
	// it, which costs every call; a shutdown ends calls through the
	// registry (plugins.Registry.Close) instead.
	resp := d.caller.Call(context.Background(), &sandbox.Request{Meta: m, Payload: r.Payload})
	if resp.Err != nil {
		d.log.Warn("local request failed", "kind", kind, "name", name, "status", int(resp.Status), "error", resp.Err, "took", time.Since(start))
	} else {
		d.log.Debug("local request served", "kind", kind, "name", name, "status", int(resp.Status), "took", time.Since(start))
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
