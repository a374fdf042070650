package azure

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/mqtttest"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/twin"
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// fakeServer answers requests with a function of the call, and records
// the calls.
type fakeServer struct {
	mu    sync.Mutex
	calls []dispatch.Call
	fn    func(c dispatch.Call) *sandbox.Response
}

func (f *fakeServer) Serve(c dispatch.Call, done func(*sandbox.Response)) {
	f.mu.Lock()
	f.calls = append(f.calls, c)
	fn := f.fn
	f.mu.Unlock()
	go done(fn(c))
}

func (f *fakeServer) Calls() []dispatch.Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]dispatch.Call(nil), f.calls...)
}

var testKey = []byte("0123456789abcdef0123456789abcdef")

type rig struct {
	d   *Dialect
	u   *uplink.Uplink
	ob  *storage.Outbox
	tw  *twin.Twin
	srv *fakeServer
	c   *mqtttest.RawConn
	cp  *packets.Connect
}

// newRig starts the dialect on a real uplink and outbox against a scripted
// server, and returns after the CONNECT (answered with Azure's CONNACK).
func newRig(t *testing.T, dir string, fn func(dispatch.Call) *sandbox.Response) *rig {
	t.Helper()
	raw := mqtttest.NewRawServer(t)
	ob, err := storage.Open(storage.Options{Dir: dir, Routes: []storage.Route{{Name: "telemetry"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	journal, _ := ob.State("azure-journal")
	tst, _ := ob.State("twin")
	tw, err := twin.Open(tst)
	if err != nil {
		t.Fatal(err)
	}
	srv := &fakeServer{fn: fn}
	d, err := New(Options{Host: "hub.example", DeviceID: "dev1", Key: testKey, SendHost: true, Journal: journal,
		Twin: tw, Server: srv, Agent: "outpost/test", RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	target, _ := url.Parse(raw.URL())
	u, err := uplink.New(uplink.Options{URL: target, ClientID: d.ClientID(), Source: ob,
		Topic: d.TelemetryTopic, UserProps: d.TelemetryProps, NoRequestProps: true, Credentials: d.Credentials,
		Subscriptions: d.Subscriptions(), OnMessage: d.OnMessage, OnConnect: d.OnConnect,
		OnConnectionDown: d.OnConnectionDown, Refusal: d.Refusal, OnServerDisconnect: d.OnServerDisconnect})
	if err != nil {
		t.Fatal(err)
	}
	d.Attach(u)
	if err := u.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = u.Close(ctx)
		d.Close(ctx)
	})
	c := raw.Accept()
	rm, mq := uint16(16), byte(1)
	cp := c.Handshake(&packets.Properties{ReceiveMaximum: &rm, MaximumQOS: &mq, RetainAvailable: new(byte),
		MaximumPacketSize: ptr[uint32](MaxPacket)})
	return &rig{d: d, u: u, ob: ob, tw: tw, srv: srv, c: c, cp: cp}
}

func ptr[T any](v T) *T { return &v }

func userProp(ps []packets.User, key string) (string, bool) {
	for _, p := range ps {
		if p.Key == key {
			return p.Value, true
		}
	}
	return "", false
}

// subscribe reads the SUBSCRIBE, grants it, and answers the full twin read
// that follows with doc.
func (r *rig) subscribe(t *testing.T, doc string) {
	t.Helper()
	sub := mqtttest.Expect[*packets.Subscribe](r.c)
	r.c.Send(&packets.Suback{PacketID: sub.PacketID, Reasons: []byte{0, 1, 0}, Properties: &packets.Properties{}})
	get := mqtttest.Expect[*packets.Publish](r.c)
	if get.Topic != TopicTwinGet || get.QoS != 0 || len(get.Payload) != 0 || len(get.Properties.CorrelationData) == 0 ||
		len(get.Properties.CorrelationData) > MaxCorrelation || len(get.Properties.User) != 0 {
		t.Fatalf("twin get: topic %q qos %d payload %q correlation %x props %v", get.Topic, get.QoS, get.Payload,
			get.Properties.CorrelationData, get.Properties.User)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Payload: []byte(doc),
		Properties: &packets.Properties{CorrelationData: get.Properties.CorrelationData}})
}

func TestConnectSAS(t *testing.T) {
	r := newRig(t, t.TempDir(), nil)
	cp := r.cp
	if cp.ClientID != "dev1" || cp.UsernameFlag || cp.PasswordFlag {
		t.Errorf("client id %q, username flag %v, password flag %v", cp.ClientID, cp.UsernameFlag, cp.PasswordFlag)
	}
	p := cp.Properties
	if p.AuthMethod != "SAS" {
		t.Errorf("Authentication Method %q, want SAS", p.AuthMethod)
	}
	if p.RequestProblemInfo != nil && *p.RequestProblemInfo == 0 {
		t.Error("Request Problem Information = 0: the hub would leave status out of its acknowledgements")
	}
	want := map[string]string{"api-version": "2020-10-01-preview", "host": "hub.example", "client-agent": "outpost/test"}
	for k, v := range want {
		if got, _ := userProp(p.User, k); got != v {
			t.Errorf("user property %s = %q, want %q", k, got, v)
		}
	}
	if _, ok := userProp(p.User, "sas-policy"); ok {
		t.Error("sas-policy sent for a device key")
	}
	atS, _ := userProp(p.User, "sas-at")
	expS, _ := userProp(p.User, "sas-expiry")
	at, err1 := strconv.ParseInt(atS, 10, 64)
	exp, err2 := strconv.ParseInt(expS, 10, 64)
	if err1 != nil || err2 != nil || exp-at != time.Hour.Milliseconds() || time.Since(time.UnixMilli(at)) > time.Minute {
		t.Fatalf("sas-at %q sas-expiry %q: want ms since the epoch, one hour apart, now", atS, expS)
	}
	sig := Sign(testKey, "hub.example", "dev1", "", time.UnixMilli(at), time.UnixMilli(exp))
	if !bytes.Equal(p.AuthData, sig) {
		t.Errorf("Authentication Data %x, want HMAC-SHA256 %x", p.AuthData, sig)
	}
}

func TestMethodWire(t *testing.T) {
	r := newRig(t, t.TempDir(), func(c dispatch.Call) *sandbox.Response {
		if c.Meta.Name == "missing" {
			return &sandbox.Response{Status: abi.StatusNotImplemented, Payload: []byte("no handler")}
		}
		return &sandbox.Response{Status: 200, Payload: append([]byte("echo:"), c.Payload...), ContentType: "text/plain",
			Props: []abi.Property{{Key: "not-app", Value: "x"}, {Key: "@app", Value: "y"}}}
	})
	r.subscribe(t, `{"desired":{"$version":1},"reported":{"$version":1}}`)
	corr := []byte{0, 0xff, 2}
	r.c.Send(&packets.Publish{Topic: "$iothub/methods/echo", Payload: []byte("hi"),
		Properties: &packets.Properties{CorrelationData: corr, User: []packets.User{{Key: "@caller", Value: "ops"}}}})
	resp := mqtttest.Expect[*packets.Publish](r.c)
	if resp.Topic != TopicResponses || resp.QoS != 0 || resp.Retain || !bytes.Equal(resp.Properties.CorrelationData, corr) ||
		string(resp.Payload) != "echo:hi" {
		t.Fatalf("response: topic %q qos %d retain %v correlation %x payload %q", resp.Topic, resp.QoS, resp.Retain,
			resp.Properties.CorrelationData, resp.Payload)
	}
	if code, _ := userProp(resp.Properties.User, PropResponseCode); code != "200" {
		t.Errorf("response-code %q, want 200", code)
	}
	if _, ok := userProp(resp.Properties.User, "not-app"); ok {
		t.Error("a handler property without @ reached the hub, which refuses it")
	}
	if v, _ := userProp(resp.Properties.User, "@app"); v != "y" {
		t.Error("the handler's application property is missing")
	}
	calls := r.srv.Calls()
	if len(calls) != 1 || calls[0].Meta.Kind != abi.KindMethod || calls[0].Meta.Name != "echo" ||
		calls[0].Meta.Deadline != 30*time.Second || calls[0].Meta.Props[0] != (abi.Property{Key: "@caller", Value: "ops"}) {
		t.Fatalf("calls %+v", calls)
	}

	r.c.Send(&packets.Publish{Topic: "$iothub/methods/missing", Properties: &packets.Properties{CorrelationData: []byte{9}}})
	resp = mqtttest.Expect[*packets.Publish](r.c)
	if code, _ := userProp(resp.Properties.User, PropResponseCode); code != "501" || !bytes.Equal(resp.Properties.CorrelationData, []byte{9}) {
		t.Errorf("unknown method: response-code %q correlation %x", code, resp.Properties.CorrelationData)
	}
}

func TestCommandAcks(t *testing.T) {
	r := newRig(t, t.TempDir(), func(c dispatch.Call) *sandbox.Response {
		switch string(c.Payload) {
		case "ok":
			return &sandbox.Response{Status: 200}
		case "busy":
			return &sandbox.Response{Status: abi.StatusUnavailable}
		}
		return &sandbox.Response{Status: abi.StatusBadRequest}
	})
	r.subscribe(t, `{"desired":{"$version":1},"reported":{"$version":1}}`)
	cmd := func(id uint16, seq, count int, payload string, props ...packets.User) {
		r.c.Send(&packets.Publish{Topic: TopicCommands, QoS: 1, PacketID: id, Payload: []byte(payload),
			Properties: &packets.Properties{ContentType: "text/plain", User: append([]packets.User{
				{Key: PropSequenceNo, Value: strconv.Itoa(seq)}, {Key: PropEnqueuedTime, Value: "1600987195320"},
				{Key: PropDeliveryCount, Value: strconv.Itoa(count)}}, props...)}})
	}
	expectAck := func(id uint16, reason byte, status string) {
		t.Helper()
		a := mqtttest.Expect[*packets.Puback](r.c)
		got, _ := userProp(a.Properties.User, PropStatus)
		if a.PacketID != id || a.ReasonCode != reason || got != status {
			t.Fatalf("PUBACK id %d reason %d status %q; want %d, %d, %q", a.PacketID, a.ReasonCode, got, id, reason, status)
		}
	}
	cmd(1, 10, 1, "ok", packets.User{Key: CommandProperty, Value: "setpoint"})
	expectAck(1, 0, "")
	cmd(2, 11, 1, "busy")
	expectAck(2, 131, "0603") // abandon
	cmd(3, 11, 2, "ok")       // the abandoned one again: it runs
	expectAck(3, 0, "")
	cmd(4, 12, 1, "bad")
	expectAck(4, 131, "0100") // reject
	cmd(5, 10, 2, "ok")       // completed before: acknowledged, not run again
	expectAck(5, 0, "")
	cmd(6, 0, 1, "ok", packets.User{Key: PropSequenceNo, Value: "x"}) // the first sequence-no counts: 0 is valid
	expectAck(6, 0, "")

	calls := r.srv.Calls()
	if len(calls) != 5 {
		t.Fatalf("%d handler calls, want 5 (the redelivered completed command must not run): %+v", len(calls), calls)
	}
	if c := calls[0]; c.Meta.Kind != abi.KindCommand || c.Meta.Name != "setpoint" || c.Meta.RequestID != "10" || c.Meta.ContentType != "text/plain" {
		t.Errorf("first command call %+v", c.Meta)
	}
	if c := calls[1]; c.Meta.Name != "c2d" || c.Meta.Flags&abi.FlagRedelivery != 0 {
		t.Errorf("command without @command: %+v", c.Meta)
	}
	if c := calls[2]; c.Meta.Flags&abi.FlagRedelivery == 0 {
		t.Errorf("a delivery-count of 2 is not flagged as a redelivery: %+v", c.Meta)
	}
}

func TestCommandWithoutSequenceRejected(t *testing.T) {
	r := newRig(t, t.TempDir(), func(dispatch.Call) *sandbox.Response { return &sandbox.Response{Status: 200} })
	r.subscribe(t, `{}`)
	r.c.Send(&packets.Publish{Topic: TopicCommands, QoS: 1, PacketID: 1, Properties: &packets.Properties{}})
	a := mqtttest.Expect[*packets.Puback](r.c)
	if st, _ := userProp(a.Properties.User, PropStatus); a.ReasonCode != 131 || st != "0100" {
		t.Fatalf("PUBACK reason %d status %q, want a reject", a.ReasonCode, st)
	}
	if n := len(r.srv.Calls()); n != 0 {
		t.Fatalf("%d calls for a malformed command", n)
	}
}

func TestTelemetryWire(t *testing.T) {
	r := newRig(t, t.TempDir(), nil)
	r.subscribe(t, `{}`)
	m := &storage.Message{Route: "telemetry", Topic: "plant/line1/temp", QoS: 1, Retain: true, Payload: []byte(`{"t":21}`),
		ContentType: "application/json", ResponseTopic: "x/y", CorrelationData: bytes.Repeat([]byte{1}, 40),
		UserProps: []storage.Property{{Key: "unit", Value: "C"}, {Key: "@site", Value: "hall3"},
			{Key: "content-encoding", Value: "utf-8"}, {Key: "message-id", Value: "local-1"}}}
	if err := r.ob.Append(m); err != nil {
		t.Fatal(err)
	}
	p := mqtttest.Expect[*packets.Publish](r.c)
	if p.Topic != TopicTelemetry || p.QoS != 1 || p.Retain || string(p.Payload) != `{"t":21}` || p.Properties.ContentType != "application/json" {
		t.Fatalf("telemetry: topic %q qos %d retain %v payload %q content type %q", p.Topic, p.QoS, p.Retain, p.Payload, p.Properties.ContentType)
	}
	if p.Properties.ResponseTopic != "" || len(p.Properties.CorrelationData) != 0 {
		t.Errorf("telemetry carries Response Topic %q / Correlation Data %x", p.Properties.ResponseTopic, p.Properties.CorrelationData)
	}
	got := map[string]string{}
	for _, u := range p.Properties.User {
		got[u.Key] = u.Value
	}
	id := r.ob.MessageID(m.Seq)
	want := map[string]string{"@unit": "C", "@site": "hall3", "content-encoding": "utf-8", "@message-id": "local-1", "@topic": m.Topic,
		"message-id": id, "creation-time": strconv.FormatInt(m.Created.UnixMilli(), 10)}
	if len(got) != len(want) {
		t.Errorf("user properties %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("user property %s = %q, want %q", k, got[k], v)
		}
	}
	r.c.Send(&packets.Puback{PacketID: p.PacketID, Properties: &packets.Properties{}})

	// A bad request is dropped, a throttled one sent again.
	for _, payload := range []string{"bad", "throttled"} {
		if err := r.ob.Append(&storage.Message{Route: "telemetry", Topic: "t", QoS: 1, Payload: []byte(payload)}); err != nil {
			t.Fatal(err)
		}
	}
	p = mqtttest.Expect[*packets.Publish](r.c)
	r.c.Send(&packets.Puback{PacketID: p.PacketID, ReasonCode: 131, Properties: &packets.Properties{User: []packets.User{{Key: "status", Value: "0100"}}}})
	p = mqtttest.Expect[*packets.Publish](r.c)
	if string(p.Payload) != "throttled" {
		t.Fatalf("sent %q", p.Payload)
	}
	r.c.Send(&packets.Puback{PacketID: p.PacketID, ReasonCode: 151, Properties: &packets.Properties{User: []packets.User{{Key: "status", Value: "0501"}}}})
	deadline := time.Now().Add(5 * time.Second)
	for r.u.Stats().Rejected != 1 || r.u.Stats().Refused != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v: want the bad request dropped and the throttled message kept", r.u.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	waitFor(t, func() bool { return r.ob.Stats().Messages == 1 }) // the throttled message only
}

func TestTwinWire(t *testing.T) {
	r := newRig(t, t.TempDir(), nil)
	r.subscribe(t, `{"desired":{"rate":5,"$version":3},"reported":{"fw":"1.0","$version":8}}`)
	waitFor(t, func() bool { return r.tw.Desired().Version == 3 })

	// Desired patches in order; a gap reads the whole twin.
	r.c.Send(&packets.Publish{Topic: TopicTwinDesired, Payload: []byte(`{"rate":6}`),
		Properties: &packets.Properties{User: []packets.User{{Key: PropVersion, Value: "4"}}}})
	waitFor(t, func() bool { return r.tw.Desired().Version == 4 })
	r.c.Send(&packets.Publish{Topic: TopicTwinDesired, Payload: []byte(`{"rate":8}`),
		Properties: &packets.Properties{User: []packets.User{{Key: PropVersion, Value: "6"}}}})
	get := mqtttest.Expect[*packets.Publish](r.c)
	if get.Topic != TopicTwinGet {
		t.Fatalf("after a version gap: %q, want a twin get", get.Topic)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Payload: []byte(`{"desired":{"rate":8,"$version":6},"reported":{"fw":"1.0","$version":8}}`),
		Properties: &packets.Properties{CorrelationData: get.Properties.CorrelationData}})
	waitFor(t, func() bool { d := r.tw.Desired(); return d.Version == 6 && jsonOf(d.Props) == `{"rate":8}` })

	// A reported patch with if-version; a precondition failure reads again
	// and retries with the new version.
	if _, err := r.tw.Report([]byte(`{"fw":"2.0"}`)); err != nil {
		t.Fatal(err)
	}
	p := mqtttest.Expect[*packets.Publish](r.c)
	if v, _ := userProp(p.Properties.User, PropIfVersion); p.Topic != TopicTwinReported || p.QoS != 0 || string(p.Payload) != `{"fw":"2.0"}` || v != "8" {
		t.Fatalf("reported patch: topic %q qos %d payload %q if-version %q", p.Topic, p.QoS, p.Payload, v)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Properties: &packets.Properties{CorrelationData: p.Properties.CorrelationData,
		User: []packets.User{{Key: PropStatus, Value: "0104"}, {Key: PropReason, Value: "version mismatch"}}}})
	get = mqtttest.Expect[*packets.Publish](r.c)
	if get.Topic != TopicTwinGet {
		t.Fatalf("after a precondition failure: %q, want a twin get", get.Topic)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Payload: []byte(`{"desired":{"rate":8,"$version":6},"reported":{"fw":"1.5","$version":9}}`),
		Properties: &packets.Properties{CorrelationData: get.Properties.CorrelationData}})
	p = mqtttest.Expect[*packets.Publish](r.c)
	if v, _ := userProp(p.Properties.User, PropIfVersion); p.Topic != TopicTwinReported || v != "9" {
		t.Fatalf("retried patch: topic %q if-version %q", p.Topic, v)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Properties: &packets.Properties{CorrelationData: p.Properties.CorrelationData,
		User: []packets.User{{Key: PropVersion, Value: "10"}}}})
	waitFor(t, func() bool {
		rep := r.tw.Reported()
		return rep.Version == 10 && len(r.tw.Pending()) == 0 && rep.Props["fw"] == "2.0"
	})
}

func jsonOf(v any) string { b, _ := json.Marshal(v); return string(b) }

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestCommandJournal: a command redelivered while it still runs waits for
// that run and gets its outcome (run once); a command the journal shows
// started but not finished (the agent was killed during it) is rejected
// when it comes again, not run twice.
func TestCommandJournal(t *testing.T) {
	release := make(chan struct{})
	dir := t.TempDir()
	r := newRig(t, dir, func(c dispatch.Call) *sandbox.Response {
		if string(c.Payload) == "slow" {
			<-release
		}
		return &sandbox.Response{Status: 200}
	})
	r.subscribe(t, `{}`)
	cmd := func(id uint16, seq int, payload string) {
		r.c.Send(&packets.Publish{Topic: TopicCommands, QoS: 1, PacketID: id, Payload: []byte(payload),
			Properties: &packets.Properties{User: []packets.User{{Key: PropSequenceNo, Value: strconv.Itoa(seq)},
				{Key: PropDeliveryCount, Value: "1"}}}})
	}
	cmd(1, 5, "slow")
	waitFor(t, func() bool { return len(r.srv.Calls()) == 1 })
	cmd(2, 5, "slow") // the same command again while it runs
	close(release)
	for _, id := range []uint16{1, 2} {
		a := mqtttest.Expect[*packets.Puback](r.c)
		if a.PacketID != id || a.ReasonCode != 0 {
			t.Fatalf("PUBACK id %d reason %d, want %d completed", a.PacketID, a.ReasonCode, id)
		}
	}
	if n := len(r.srv.Calls()); n != 1 {
		t.Fatalf("the command ran %d times", n)
	}

	// A journal entry left "started" by a killed agent.
	key := fmt.Sprintf("c/%s/%s/%020d", "hub.example", "dev1", 9)
	if err := r.d.o.Journal.Put(key, []byte{byte(outcomeStarted)}, time.Hour); err != nil {
		t.Fatal(err)
	}
	cmd(3, 9, "fast")
	a := mqtttest.Expect[*packets.Puback](r.c)
	if st, _ := userProp(a.Properties.User, PropStatus); a.ReasonCode != 131 || st != "0100" {
		t.Fatalf("a command that was running when the agent stopped: reason %d status %q, want a reject", a.ReasonCode, st)
	}
	if n := len(r.srv.Calls()); n != 1 {
		t.Fatalf("the command cut by a crash ran again (%d calls)", n)
	}
}

// TestConnectX509: with no key the CONNECT names X509 and carries no
// Authentication Data, and no re-authentication is ever attempted.
func TestConnectX509(t *testing.T) {
	ob, _ := storage.Open(storage.Options{Dir: t.TempDir(), Routes: []storage.Route{{Name: "telemetry"}}})
	t.Cleanup(func() { _ = ob.Close() })
	journal, _ := ob.State("j")
	d, err := New(Options{Host: "hub.example", DeviceID: "dev1", ModuleID: "mod1", Journal: journal, Server: &fakeServer{}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Credentials()
	if err != nil || c.AuthMethod != AuthX509 || c.AuthData != nil || d.ClientID() != "dev1/mod1" {
		t.Fatalf("credentials %+v %v, client id %q", c, err, d.ClientID())
	}
	d.reauthenticate() // a no-op: nothing to sign
}

// TestBadInputFromHub: an oversized method response is answered 507, a
// response whose status is not a status fails its request, a desired
// patch without a version reads the whole twin; the connection stays up.
func TestBadInputFromHub(t *testing.T) {
	r := newRig(t, t.TempDir(), func(c dispatch.Call) *sandbox.Response {
		return &sandbox.Response{Status: 200, Payload: make([]byte, MaxMethodBytes+1)}
	})
	r.subscribe(t, `{"desired":{"$version":2},"reported":{"$version":1}}`)
	r.c.Send(&packets.Publish{Topic: "$iothub/methods/big", Properties: &packets.Properties{CorrelationData: []byte{1}}})
	resp := mqtttest.Expect[*packets.Publish](r.c)
	if code, _ := userProp(resp.Properties.User, PropResponseCode); code != "507" || len(resp.Payload) > MaxMethodBytes {
		t.Fatalf("oversized response: response-code %q, %d bytes", code, len(resp.Payload))
	}
	r.c.Send(&packets.Publish{Topic: TopicTwinDesired, Payload: []byte(`{"x":1}`), Properties: &packets.Properties{}})
	get := mqtttest.Expect[*packets.Publish](r.c)
	if get.Topic != TopicTwinGet {
		t.Fatalf("a desired patch without a version: %q, want a twin get", get.Topic)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Properties: &packets.Properties{CorrelationData: get.Properties.CorrelationData,
		User: []packets.User{{Key: PropStatus, Value: "bogus"}}}})
	// The read failed; it is tried again after a pause, and this time
	// answered.
	get = mqtttest.Expect[*packets.Publish](r.c)
	if get.Topic != TopicTwinGet {
		t.Fatalf("after a bad status: %q, want the twin get again", get.Topic)
	}
	r.c.Send(&packets.Publish{Topic: TopicResponses, Payload: []byte(`{"desired":{"x":1,"$version":3},"reported":{"$version":1}}`),
		Properties: &packets.Properties{CorrelationData: get.Properties.CorrelationData}})
	waitFor(t, func() bool { return r.tw.Desired().Version == 3 })
	if !r.u.Stats().Connected {
		t.Fatal("the connection did not stay up")
	}
}
