package watson

import (
	"context"
	"encoding/json"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/dm"
	"github.com/outpost-edge/outpost/runtime/uplink"
	"github.com/outpost-edge/outpost/storage"
)

// fakeServer answers DM and command handlers by name and records calls.
type fakeServer struct {
	mu    sync.Mutex
	calls []dispatch.Call
	fn    func(c dispatch.Call) *sandbox.Response
}

func (f *fakeServer) Serve(c dispatch.Call, done func(*sandbox.Response)) {
	f.mu.Lock()
	f.calls = append(f.calls, c)
	f.mu.Unlock()
	go done(f.fn(c))
}

func (f *fakeServer) named(name string) []dispatch.Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []dispatch.Call
	for _, c := range f.calls {
		if c.Meta.Name == name {
			out = append(out, c)
		}
	}
	return out
}

// fakeActions records the operator commands run.
type fakeActions struct {
	mu  sync.Mutex
	ran []string
}

func (a *fakeActions) Has(string) bool { return true }
func (a *fakeActions) Run(_ context.Context, action string, env map[string]string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ran = append(a.ran, action+" "+env["OUTPOST_FIRMWARE_VERSION"])
	return nil
}
func (a *fakeActions) list() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return strings.Join(a.ran, ",")
}

type wrig struct {
	t      *testing.T
	broker *mosqtest.Broker
	sub    *mosqtest.Sub
	d      *Dialect
	u      *uplink.Uplink
	ob     *storage.Outbox
	srv    *fakeServer
	acts   *fakeActions
	local  *[]string
}

// handlers of the rig: firmware.download fails by the URI's wording.
func rigHandlers(c dispatch.Call) *sandbox.Response {
	switch c.Meta.Name {
	case ActionFirmwareGet:
		var r dm.Request
		_ = json.Unmarshal(c.Payload, &r)
		switch {
		case strings.Contains(r.URI, "missing"):
			return &sandbox.Response{Status: 404, Payload: []byte("404 from the server")}
		case strings.Contains(r.URI, "tampered"):
			return &sandbox.Response{Status: 422, Payload: []byte("sha256 mismatch")}
		}
		return &sandbox.Response{Status: 200}
	case ActionFirmwareUpdate, ActionReboot, ActionFactoryReset:
		return &sandbox.Response{Status: 202}
	case CustomAction("example-bundle-v1", "blink"):
		return &sandbox.Response{Status: 200}
	}
	return &sandbox.Response{Status: abi.StatusNotImplemented, Payload: []byte("no handler")}
}

func newWatsonRig(t *testing.T, gateway bool, children ...Identity) *wrig {
	t.Helper()
	b := mosqtest.StartT(t, mosqtest.Options{})
	sub := mosqtest.Subscribe(t, b.Addr(), "%q|%r|%C|%p", "iot-2/#", "iotdevice-1/#")
	ob, err := storage.Open(storage.Options{Dir: t.TempDir(), Routes: []storage.Route{{Name: "telemetry"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	st, _ := ob.State("dm")
	srv := &fakeServer{fn: rigHandlers}
	acts := &fakeActions{}
	var mu sync.Mutex
	local := []string{}
	d, err := New(Options{Org: "abc123", Type: "gw", ID: "gw1", Token: "secret", Gateway: gateway, Children: children,
		Manage: true, DeviceActions: true, FirmwareActions: true, Bundles: []string{"example-bundle-v1"},
		DeviceInfo: map[string]any{"serialNumber": "SN1", "model": "GW-1"}, Installed: "1.0.0",
		State: st, Server: srv, Actions: acts, RequestTimeout: 2 * time.Second,
		Local: func(topic string, payload []byte) error {
			mu.Lock()
			local = append(local, topic+" "+string(payload))
			mu.Unlock()
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	target, _ := url.Parse(b.URL())
	u, err := uplink.New(uplink.Options{URL: target, ClientID: d.ClientID(), Source: ob, Topic: d.TelemetryTopic,
		NoRetain: true, MaxPayload: MaxPayload, Credentials: d.Credentials, Subscriptions: d.Subscriptions(),
		OnMessage: d.OnMessage, OnConnect: d.OnConnect, OnConnectionDown: d.OnConnectionDown})
	if err != nil {
		t.Fatal(err)
	}
	d.Attach(u)
	if rigSetup != nil {
		rigSetup(d)
	}
	if err := u.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = u.Close(ctx)
		d.Close(ctx)
	})
	return &wrig{t: t, broker: b, sub: sub, d: d, u: u, ob: ob, srv: srv, acts: acts, local: &local}
}

// rigSetup, when set, adjusts the rig's dialect before it connects.
var rigSetup func(*Dialect)

// platform publishes as the platform would, with mosquitto_pub (QoS 1).
func (r *wrig) platform(topic, payload string) {
	r.t.Helper()
	host, port, _ := strings.Cut(r.broker.Addr(), ":")
	if out, err := exec.Command("mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload).CombinedOutput(); err != nil {
		r.t.Fatalf("mosquitto_pub: %v %s", err, out)
	}
}

// answer replies to the device's DM request seen in line (rc 200).
func (r *wrig) answer(topicPrefix, line string) {
	r.t.Helper()
	var req struct {
		ReqID string `json:"reqId"`
	}
	_, _, payload := splitLine(line)
	if err := json.Unmarshal([]byte(payload), &req); err != nil || req.ReqID == "" {
		r.t.Fatalf("request without a reqId: %s", line)
	}
	r.platform(topicPrefix+"response", `{"rc":200,"reqId":"`+req.ReqID+`"}`)
}

// splitLine splits a subscriber line "topic|qos|retain|content type|payload".
func splitLine(l string) (topic, flags, payload string) {
	p := strings.SplitN(l, "|", 5)
	if len(p) < 5 {
		return l, "", ""
	}
	return p[0], strings.Join(p[1:4], "|"), p[4]
}

// response waits for the device's response carrying reqId on the device
// form's response topic and returns it.
func (r *wrig) response(reqID string) dmResponse {
	r.t.Helper()
	return r.responseOn("iotdevice-1/response", reqID)
}

// responseOn waits for the response carrying reqId and checks its topic.
func (r *wrig) responseOn(topic, reqID string) dmResponse {
	r.t.Helper()
	line := r.sub.Wait(r.t, 10*time.Second, `"reqId":"`+reqID+`"`)
	got, flags, payload := splitLine(line)
	if got != topic || flags != "0|0|" {
		r.t.Errorf("response %s: topic %q, qos|retain|content type %q; want %q, 0|0|", reqID, got, flags, topic)
	}
	var resp dmResponse
	if err := json.Unmarshal([]byte(payload), &resp); err != nil {
		r.t.Fatalf("response %s is not JSON: %s", reqID, payload)
	}
	return resp
}

func (r *wrig) count(substr string) int {
	n := 0
	for _, l := range r.sub.Lines() {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

// waitNotify waits for the device's next notify, checks that it carries
// want, and answers it.
func (r *wrig) waitNotify(t *testing.T, want string) {
	t.Helper()
	line := r.sub.WaitNext(t, 10*time.Second, "iotdevice-1/notify|")
	if !strings.Contains(line, want) {
		t.Fatalf("the next notify is %s, want one with %s", line, want)
	}
	r.answer("iotdm-1/", line)
}

func TestDeviceEventsAndCommands(t *testing.T) {
	r := newWatsonRig(t, false)
	line := r.sub.Wait(t, 10*time.Second, `"lifetime"`)
	if !strings.HasPrefix(line, "iotdevice-1/mgmt/manage|0|0||") {
		t.Errorf("manage request %q: want iotdevice-1/mgmt/manage at QoS 0", line)
	}
	r.answer("iotdm-1/", line)
	for _, want := range []string{`"deviceActions":true`, `"firmwareActions":true`, `"example-bundle-v1":true`, `"fwVersion":"1.0.0"`, `"serialNumber":"SN1"`} {
		if !strings.Contains(line, want) {
			t.Errorf("manage request %s lacks %s", line, want)
		}
	}

	big := strings.Repeat("x", MaxPayload+1)
	for _, m := range []*storage.Message{
		{Route: "telemetry", Topic: "plant/temp", QoS: 1, Retain: true, ContentType: "application/json", Payload: []byte(`{"t":21}`)},
		{Route: "telemetry", Topic: "iot-2/evt/alarm/fmt/txt", QoS: 1, Payload: []byte("high")},
		{Route: "telemetry", Topic: "plant/big", QoS: 1, Payload: []byte(big)},
		{Route: "telemetry", Topic: "plant/after", QoS: 0, Payload: []byte("after")},
	} {
		if err := r.ob.Append(m); err != nil {
			t.Fatal(err)
		}
	}
	if l := r.sub.Wait(t, 10*time.Second, `{"t":21}`); l != `iot-2/evt/telemetry/fmt/json|1|0|application/json|{"t":21}` {
		t.Errorf("event: %q, want the route as event id, QoS 1, retain cleared, the content type", l)
	}
	if l := r.sub.Wait(t, 10*time.Second, "|high"); l != "iot-2/evt/alarm/fmt/txt|1|0||high" {
		t.Errorf("event on an event topic: %q", l)
	}
	if l := r.sub.Wait(t, 10*time.Second, "|after"); l != "iot-2/evt/telemetry/fmt/json|0|0||after" {
		t.Errorf("QoS 0 event: %q", l)
	}
	lines := strings.Join(r.sub.Lines(), "\n")
	if strings.Contains(lines, "xxxxxxxx") {
		t.Error("a payload over 131072 bytes was sent: it costs the connection")
	}
	if st := r.u.Stats(); st.Rejected != 1 {
		t.Errorf("uplink stats %+v: want the oversized event dropped", st)
	}

	r.platform("iot-2/cmd/setpoint/fmt/json", `{"v":5}`)
	waitCond(t, func() bool { return len(r.srv.named("setpoint")) == 1 })
	c := r.srv.named("setpoint")[0]
	if c.Meta.Kind != abi.KindCommand || c.Meta.ContentType != "application/json" || string(c.Payload) != `{"v":5}` {
		t.Errorf("command call %+v", c)
	}
}

func waitCond(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFirmwareStateMachine runs download and update, with their failure
// paths, as the platform drives them (PROTOCOLS.md 2.4).
func TestFirmwareStateMachine(t *testing.T) {
	r := newWatsonRig(t, false)
	r.answer("iotdm-1/", r.sub.Wait(t, 10*time.Second, `"lifetime"`))

	r.platform("iotdm-1/mgmt/initiate/firmware/update", `{"reqId":"u0"}`)
	if resp := r.response("u0"); resp.RC != 400 {
		t.Fatalf("update before download: rc %d, want 400", resp.RC)
	}
	r.platform("iotdm-1/device/update", `{"reqId":"p1","d":{"fields":[{"field":"mgmt.firmware","value":{"version":"2.0.0","name":"gw-fw","uri":"http://fw.example/gw-2.0.0.bin","verifier":"sha256:`+strings.Repeat("ab", 32)+`","state":0,"updateStatus":0}}]}}`)
	if resp := r.response("p1"); resp.RC != 204 {
		t.Fatalf("device/update: rc %d %s", resp.RC, resp.Message)
	}
	r.platform("iotdm-1/observe", `{"reqId":"o1","d":{"fields":[{"field":"mgmt.firmware"}]}}`)
	if resp := r.response("o1"); resp.RC != 200 || !strings.Contains(jsonOf(resp.D), `"state":0`) {
		t.Fatalf("observe: %+v", resp)
	}
	r.platform("iotdm-1/mgmt/initiate/firmware/download", `{"reqId":"dl1"}`)
	if resp := r.response("dl1"); resp.RC != 202 {
		t.Fatalf("download: rc %d %s", resp.RC, resp.Message)
	}
	r.waitNotify(t, `"state":1`)
	r.waitNotify(t, `"state":2`)
	r.platform("iotdm-1/cancel", `{"reqId":"c1","d":{"fields":["mgmt.firmware"]}}`) // the string form
	if resp := r.response("c1"); resp.RC != 200 {
		t.Fatalf("cancel: %+v", resp)
	}
	r.platform("iotdm-1/mgmt/initiate/firmware/download", `{"reqId":"dl2"}`)
	if resp := r.response("dl2"); resp.RC != 400 {
		t.Fatalf("download with an image waiting: rc %d, want 400", resp.RC)
	}
	r.platform("iotdm-1/observe", `{"reqId":"o2","d":{"fields":[{"field":"mgmt.firmware"}]}}`)
	if resp := r.response("o2"); !strings.Contains(jsonOf(resp.D), `"state":2`) {
		t.Fatalf("observe after the download reports the true state: %s", jsonOf(resp.D))
	}
	r.platform("iotdm-1/mgmt/initiate/firmware/update", `{"reqId":"u1"}`)
	if resp := r.response("u1"); resp.RC != 202 {
		t.Fatalf("update: rc %d %s", resp.RC, resp.Message)
	}
	r.waitNotify(t, `"state":2,"updateStatus":1`)
	r.waitNotify(t, `"state":0,"updateStatus":0`)
	if got := r.acts.list(); got != "install 2.0.0" {
		t.Errorf("operator commands run: %q, want the install", got)
	}
	if rec := r.d.self.fw.Get(); rec.Installed != "2.0.0" {
		t.Errorf("installed %q after the update", rec.Installed)
	}
	r.platform("iotdm-1/cancel", `{"reqId":"c2","d":{"data":[{"field":"mgmt.firmware"}]}}`) // the Java SDK's shape
	if resp := r.response("c2"); resp.RC != 200 {
		t.Fatalf("cancel with data: %+v", resp)
	}

	// Failure paths: a URI the server does not have, and a verifier
	// mismatch. The platform observes again first.
	for _, c := range []struct{ uri, want string }{{"http://fw.example/missing.bin", `"updateStatus":6`}, {"http://fw.example/tampered.bin", `"updateStatus":4`}} {
		id := c.want[len(c.want)-1:]
		r.platform("iotdm-1/device/update", `{"reqId":"pf`+id+`","d":{"fields":[{"field":"mgmt.firmware","value":{"version":"3.0.0","uri":"`+c.uri+`"}}]}}`)
		r.response("pf" + id)
		r.platform("iotdm-1/observe", `{"reqId":"of`+id+`","d":{"fields":["mgmt.firmware"]}}`)
		r.response("of" + id)
		r.platform("iotdm-1/mgmt/initiate/firmware/download", `{"reqId":"df`+id+`"}`)
		if resp := r.response("df" + id); resp.RC != 202 {
			t.Fatalf("download of %s: rc %d", c.uri, resp.RC)
		}
		r.waitNotify(t, `"state":1`)
		r.waitNotify(t, `"state":0,"updateStatus":`+c.want[len(c.want)-1:])
	}
	r.platform("iotdm-1/device/update", `{"reqId":"pbad","d":{"fields":[{"field":"mgmt.firmware","value":{"uri":"ftp://fw.example/x"}}]}}`)
	r.response("pbad")
	r.platform("iotdm-1/mgmt/initiate/firmware/download", `{"reqId":"dbad"}`)
	if resp := r.response("dbad"); resp.RC != 400 {
		t.Fatalf("download from an invalid URI: rc %d, want 400", resp.RC)
	}
}

func jsonOf(v any) string { b, _ := json.Marshal(v); return string(b) }

// TestDMActionsAndBadInput: reboot, factory reset and custom actions, and
// every malformed request gets the documented answer or silence.
func TestDMActionsAndBadInput(t *testing.T) {
	r := newWatsonRig(t, false)
	r.answer("iotdm-1/", r.sub.Wait(t, 10*time.Second, `"lifetime"`))

	r.platform("iotdm-1/mgmt/initiate/device/reboot", `{"reqId":"b1"}`)
	if resp := r.response("b1"); resp.RC != 202 {
		t.Fatalf("reboot: %+v", resp)
	}
	waitCond(t, func() bool { return r.acts.list() == "reboot " })
	r.platform("iotdm-1/mgmt/custom/example-bundle-v1/blink", `{"reqId":"x1","d":{"fields":[{"field":"times","value":"3"}]}}`)
	if resp := r.response("x1"); resp.RC != 200 {
		t.Fatalf("custom action: %+v", resp)
	}
	if c := r.srv.named("custom:example-bundle-v1:blink"); len(c) != 1 || !strings.Contains(string(c[0].Payload), `"times"`) {
		t.Fatalf("custom action call %+v", c)
	}
	for _, c := range []struct {
		topic, payload string
		id             string
		rc             int
	}{
		{"iotdm-1/mgmt/custom/other-bundle/blink", `{"reqId":"x2"}`, "x2", 501},
		{"iotdm-1/mgmt/initiate/device/explode", `{"reqId":"e1"}`, "e1", 501},
		{"iotdm-1/observe", `{"reqId":"e2","d":{"fields":"mgmt.firmware"}}`, "e2", 400},
		{"iotdm-1/observe", `{"reqId":"e3"}`, "e3", 400},
		{"iotdm-1/observe", `{"reqId":"e4","d":{"fields":[{"field":"nosuch"}]}}`, "e4", 404},
		{"iotdm-1/device/update", `{"reqId":"e5","d":{"fields":[{"field":"nosuch","value":1}]}}`, "e5", 404},
		{"iotdm-1/device/update", `{"reqId":"e6","d":{"fields":[{"field":"location","value":{"latitude":51.5,"longitude":-0.12}}]}}`, "e6", 204},
	} {
		r.platform(c.topic, c.payload)
		if resp := r.response(c.id); resp.RC != c.rc {
			t.Errorf("%s %s: rc %d %q, want %d", c.topic, c.payload, resp.RC, resp.Message, c.rc)
		}
	}
	// A reqId that is not a string is echoed with 400.
	r.platform("iotdm-1/observe", `{"reqId":12345,"d":{"fields":["mgmt.firmware"]}}`)
	if l := r.sub.Wait(t, 10*time.Second, `"reqId":12345`); !strings.Contains(l, `"rc":400`) {
		t.Errorf("numeric reqId: %s", l)
	}
	// Silence: no reqId, or no JSON to read one from.
	before := r.count(`"rc"`)
	r.platform("iotdm-1/mgmt/initiate/device/explode", `{}`)
	r.platform("iotdm-1/observe", `{"d":{"fields":["mgmt.firmware"]}}`)
	r.platform("iotdm-1/observe", `not json`)
	r.platform("iotdm-1/device/update", `{"d":{"fields":[{"field":"location","value":{"latitude":1,"longitude":2}}]}}`)
	r.platform("iotdm-1/observe", `{"reqId":"last","d":{"fields":["mgmt.firmware"]}}`)
	r.response("last")
	if after := r.count(`"rc"`); after != before+1 {
		t.Errorf("%d responses to the requests without a reqId, want none", after-before-1)
	}
	if st := r.u.Stats(); !st.Connected {
		t.Error("the connection did not stay up")
	}
}

// TestGatewayWire: a gateway's events for itself and its children, its
// children's commands relayed locally, and DM for a child on the typed
// topics.
func TestGatewayWire(t *testing.T) {
	child := Identity{"sensor", "s1"}
	r := newWatsonRig(t, true, child)
	gline := r.sub.Wait(t, 10*time.Second, `"serialNumber"`)
	if !strings.HasPrefix(gline, "iotdevice-1/type/gw/id/gw1/mgmt/manage|") {
		t.Errorf("the gateway's manage request: %q", gline)
	}
	r.answer("iotdm-1/type/gw/id/gw1/", gline)
	cline := ""
	waitCond(t, func() bool {
		for _, l := range r.sub.Lines() {
			if strings.Contains(l, `"lifetime"`) && !strings.Contains(l, "SN1") {
				cline = l
				return true
			}
		}
		return false
	})
	if !strings.HasPrefix(cline, "iotdevice-1/type/sensor/id/s1/mgmt/manage|") {
		t.Errorf("the child's manage request: %q", cline)
	}
	r.answer("iotdm-1/type/sensor/id/s1/", cline)

	for _, m := range []*storage.Message{
		{Route: "telemetry", Topic: "plant/temp", QoS: 1, Payload: []byte("own")},
		{Route: "telemetry", Topic: "iot-2/type/sensor/id/s1/evt/temp/fmt/txt", QoS: 1, Payload: []byte("child")},
	} {
		if err := r.ob.Append(m); err != nil {
			t.Fatal(err)
		}
	}
	if l := r.sub.Wait(t, 10*time.Second, "|own"); !strings.HasPrefix(l, "iot-2/type/gw/id/gw1/evt/telemetry/fmt/json|") {
		t.Errorf("the gateway's own event: %q", l)
	}
	if l := r.sub.Wait(t, 10*time.Second, "|child"); !strings.HasPrefix(l, "iot-2/type/sensor/id/s1/evt/temp/fmt/txt|") {
		t.Errorf("a child's event: %q", l)
	}

	r.platform("iot-2/type/sensor/id/s1/cmd/blink/fmt/txt", "3")
	r.platform("iot-2/type/gw/id/gw1/cmd/setpoint/fmt/json", `{"v":1}`)
	waitCond(t, func() bool { return len(r.srv.named("setpoint")) == 1 })
	waitCond(t, func() bool { return len(*r.local) == 1 })
	if got := (*r.local)[0]; got != "iot-2/type/sensor/id/s1/cmd/blink/fmt/txt 3" {
		t.Errorf("child command relayed as %q", got)
	}

	r.platform("iotdm-1/type/sensor/id/s1/mgmt/initiate/device/reboot", `{"reqId":"cb1"}`)
	if resp := r.responseOn("iotdevice-1/type/sensor/id/s1/response", "cb1"); resp.RC != 202 {
		t.Fatalf("child reboot: %+v", resp)
	}
	calls := r.srv.named(ActionReboot)
	if len(calls) != 1 || calls[0].Meta.Props[1].Value != "s1" {
		t.Fatalf("child reboot call %+v", calls)
	}
	// The gateway subscribes to its managed devices' DM topics only; a
	// request for another device that reached it anyway is answered 404.
	r.d.serveDM("iotdm-1/type/sensor/id/zz/mgmt/initiate/device/reboot", []byte(`{"reqId":"cb2"}`))
	if resp := r.responseOn("iotdevice-1/type/sensor/id/zz/response", "cb2"); resp.RC != 404 {
		t.Fatalf("a device not behind this gateway: rc %d, want 404", resp.RC)
	}
	if got := r.acts.list(); got != "" {
		t.Errorf("operator commands ran for a child's reboot: %q", got)
	}
}

// TestManageRenewed: manage goes out again before its lifetime ends.
func TestManageRenewed(t *testing.T) {
	// The lifetime's floor is an hour; the rig shortens both ends.
	rigSetup = func(d *Dialect) { d.o.Lifetime, d.renewBefore = 400*time.Millisecond, 200*time.Millisecond }
	defer func() { rigSetup = nil }()
	r := newWatsonRig(t, false)
	r.answer("iotdm-1/", r.sub.WaitNext(t, 10*time.Second, "iotdevice-1/mgmt/manage|"))
	r.answer("iotdm-1/", r.sub.WaitNext(t, 10*time.Second, "iotdevice-1/mgmt/manage|"))
	r.sub.WaitNext(t, 10*time.Second, "iotdevice-1/mgmt/manage|")
}
