package hub

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

var key = []byte("hub-test-key")

func startTestHub(t *testing.T) *Hub {
	t.Helper()
	h, err := New(Options{Listen: "127.0.0.1:0", API: "off", DefaultKey: key, DefaultToken: "tok"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// raw is a device connection written packet by packet.
type raw struct {
	t *testing.T
	c net.Conn
}

func dial(t *testing.T, h *Hub) *raw {
	t.Helper()
	c, err := net.DialTimeout("tcp", h.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &raw{t: t, c: c}
}

func (r *raw) send(p packets.Packet) {
	r.t.Helper()
	if _, err := p.WriteTo(r.c); err != nil {
		r.t.Fatal(err)
	}
}

// read returns the next packet, or nil when the hub closed the connection.
func (r *raw) read() *packets.ControlPacket {
	r.t.Helper()
	_ = r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	cp, err := packets.ReadPacket(r.c)
	if err != nil {
		if err == io.EOF || strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "closed") {
			return nil
		}
		r.t.Fatalf("read: %v", err)
	}
	return cp
}

func sign(k []byte, s string) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte(s))
	return m.Sum(nil)
}

// azureConnect sends an Azure CONNECT for dev, adjusted by mutate, and
// returns the CONNACK's reason code.
func azureConnect(t *testing.T, r *raw, dev string, mutate func(p *packets.Properties, c *packets.Connect)) byte {
	t.Helper()
	at := strconv.FormatInt(time.Now().UnixMilli(), 10)
	exp := strconv.FormatInt(time.Now().Add(time.Hour).UnixMilli(), 10)
	c := &packets.Connect{ProtocolName: "MQTT", ProtocolVersion: 5, ClientID: dev, CleanStart: true, KeepAlive: 30,
		Properties: &packets.Properties{AuthMethod: "SAS",
			AuthData: sign(key, "outpost-hub.local\n"+dev+"\n\n"+at+"\n"+exp+"\n"),
			User: []packets.User{{Key: "api-version", Value: "2020-10-01-preview"}, {Key: "sas-at", Value: at},
				{Key: "sas-expiry", Value: exp}}}}
	if mutate != nil {
		mutate(c.Properties, c)
	}
	r.send(c)
	cp := r.read()
	if cp == nil {
		return 0xff
	}
	ca, ok := cp.Content.(*packets.Connack)
	if !ok {
		t.Fatalf("answered %T to a CONNECT", cp.Content)
	}
	return ca.ReasonCode
}

func TestAzureConnectChecks(t *testing.T) {
	h := startTestHub(t)
	if rc := azureConnect(t, dial(t, h), "dev1", nil); rc != 0 {
		t.Fatalf("a good SAS: CONNACK 0x%02x", rc)
	}
	for name, mutate := range map[string]func(p *packets.Properties, c *packets.Connect){
		"bad signature":       func(p *packets.Properties, _ *packets.Connect) { p.AuthData = []byte("nope") },
		"no api-version":      func(p *packets.Properties, _ *packets.Connect) { p.User = p.User[1:] },
		"unknown method":      func(p *packets.Properties, _ *packets.Connect) { p.AuthMethod = "TOKEN" },
		"username":            func(_ *packets.Properties, c *packets.Connect) { c.UsernameFlag, c.Username = true, "u" },
		"signed for another":  func(_ *packets.Properties, c *packets.Connect) { c.ClientID = "dev2" },
		"x509 over plain TCP": func(p *packets.Properties, _ *packets.Connect) { p.AuthMethod, p.AuthData = "X509", nil },
		"expired": func(p *packets.Properties, _ *packets.Connect) {
			at, exp := strconv.FormatInt(time.Now().Add(-2*time.Hour).UnixMilli(), 10), strconv.FormatInt(time.Now().Add(-time.Hour).UnixMilli(), 10)
			p.User = []packets.User{{Key: "api-version", Value: "2020-10-01-preview"}, {Key: "sas-at", Value: at}, {Key: "sas-expiry", Value: exp}}
			p.AuthData = sign(key, "outpost-hub.local\ndev1\n\n"+at+"\n"+exp+"\n")
		},
	} {
		if rc := azureConnect(t, dial(t, h), "dev1", mutate); rc < 0x80 {
			t.Errorf("%s: CONNACK 0x%02x, want a refusal", name, rc)
		}
	}
	if st := h.Stats(); st.Refused != 7 {
		t.Errorf("refused %d connections, want 7", st.Refused)
	}
}

func userProp(p *packets.Properties, k string) string {
	for _, u := range p.User {
		if u.Key == k {
			return u.Value
		}
	}
	return ""
}

// TestAzureProtocolErrors: the hub answers a device's protocol errors as
// PROTOCOLS.md 3.2-3.5 says: Not Found and Bad Request at QoS 1, a
// DISCONNECT at QoS 0.
func TestAzureProtocolErrors(t *testing.T) {
	h := startTestHub(t)
	r := dial(t, h)
	if rc := azureConnect(t, r, "dev1", nil); rc != 0 {
		t.Fatalf("CONNACK 0x%02x", rc)
	}
	r.send(&packets.Publish{Topic: "$iothub/nothing", QoS: 1, PacketID: 1, Properties: &packets.Properties{}})
	a := r.read().Content.(*packets.Puback)
	if a.ReasonCode != 0x83 || userProp(a.Properties, "status") != "0504" {
		t.Errorf("unknown topic at QoS 1: PUBACK 0x%02x status %q, want 0x83 0504", a.ReasonCode, userProp(a.Properties, "status"))
	}
	r.send(&packets.Publish{Topic: "$iothub/telemetry", QoS: 1, PacketID: 2, Payload: []byte("x"),
		Properties: &packets.Properties{User: []packets.User{{Key: "unit", Value: "C"}}}})
	a = r.read().Content.(*packets.Puback)
	if a.ReasonCode != 0x83 || userProp(a.Properties, "status") != "0100" {
		t.Errorf("a property without @: PUBACK 0x%02x status %q, want 0x83 0100", a.ReasonCode, userProp(a.Properties, "status"))
	}
	r.send(&packets.Publish{Topic: "$iothub/telemetry", QoS: 1, PacketID: 3, Payload: []byte("ok"),
		Properties: &packets.Properties{User: []packets.User{{Key: "@unit", Value: "C"}, {Key: "message-id", Value: "m1"}}}})
	if a := r.read().Content.(*packets.Puback); a.ReasonCode != 0 {
		t.Errorf("good telemetry: PUBACK 0x%02x", a.ReasonCode)
	}
	if ev := h.Telemetry(); len(ev) != 1 || ev[0].Payload != "ok" || ev[0].Props["@unit"] != "C" {
		t.Errorf("telemetry recorded: %+v", ev)
	}
	r.send(&packets.Publish{Topic: "$iothub/twin/get", Properties: &packets.Properties{}}) // no Correlation Data
	cp := r.read()
	d, ok := cp.Content.(*packets.Disconnect)
	if !ok || d.ReasonCode != 0x83 || userProp(d.Properties, "status") != "0100" {
		t.Fatalf("a request without Correlation Data: %+v, want DISCONNECT 0x83 status 0100", cp.Content)
	}
	if st := h.Stats(); st.Disconnects != 1 {
		t.Errorf("disconnects %d, want 1", st.Disconnects)
	}

	r = dial(t, h)
	if rc := azureConnect(t, r, "dev1", nil); rc != 0 {
		t.Fatalf("CONNACK 0x%02x", rc)
	}
	r.send(&packets.Publish{Topic: "$iothub/nothing", Properties: &packets.Properties{}})
	if d, ok := r.read().Content.(*packets.Disconnect); !ok || d.ReasonCode != 0x90 {
		t.Fatalf("unknown topic at QoS 0: want DISCONNECT 0x90 (144)")
	}
}

// TestAzureTwinAndReauth: twin requests with if-version, and a refused
// re-authentication ends the connection with 135.
func TestAzureTwinAndReauth(t *testing.T) {
	h := startTestHub(t)
	r := dial(t, h)
	if rc := azureConnect(t, r, "dev1", nil); rc != 0 {
		t.Fatalf("CONNACK 0x%02x", rc)
	}
	req := func(topic, payload string, props ...packets.User) *packets.Publish {
		r.send(&packets.Publish{Topic: topic, Payload: []byte(payload), Properties: &packets.Properties{CorrelationData: []byte{7}, User: props}})
		p := r.read().Content.(*packets.Publish)
		if p.Topic != "$iothub/responses" || !bytes.Equal(p.Properties.CorrelationData, []byte{7}) {
			t.Fatalf("response on %q correlation %x", p.Topic, p.Properties.CorrelationData)
		}
		return p
	}
	if p := req("$iothub/twin/patch/reported", `{"a":1}`, packets.User{Key: "if-version", Value: "1"}); userProp(p.Properties, "version") != "2" {
		t.Fatalf("patch: %+v", p.Properties)
	}
	if p := req("$iothub/twin/patch/reported", `{"a":2}`, packets.User{Key: "if-version", Value: "1"}); userProp(p.Properties, "status") != "0104" {
		t.Fatalf("stale if-version: %+v, want 0104", p.Properties)
	}
	if p := req("$iothub/twin/get", ""); !strings.Contains(string(p.Payload), `"reported":{"$version":2,"a":1}`) {
		t.Fatalf("twin: %s", p.Payload)
	}
	h.AddFault(Fault{Op: "twin.get", Status: "0501"})
	if p := req("$iothub/twin/get", ""); userProp(p.Properties, "status") != "0501" {
		t.Fatalf("injected throttling: %+v", p.Properties)
	}
	r.send(&packets.Auth{ReasonCode: 0x19, Properties: &packets.Properties{AuthMethod: "SAS", AuthData: []byte("bad"),
		User: []packets.User{{Key: "sas-expiry", Value: strconv.FormatInt(time.Now().Add(time.Hour).UnixMilli(), 10)}}}})
	if d, ok := r.read().Content.(*packets.Disconnect); !ok || d.ReasonCode != 0x87 {
		t.Fatal("a refused re-authentication: want DISCONNECT 0x87")
	}
}

func TestWatsonChecks(t *testing.T) {
	h := startTestHub(t)
	connect := func(r *raw, id, user, pass string) byte {
		r.send(&packets.Connect{ProtocolName: "MQTT", ProtocolVersion: 5, ClientID: id, CleanStart: true, KeepAlive: 30,
			UsernameFlag: true, Username: user, PasswordFlag: true, Password: []byte(pass)})
		cp := r.read()
		if cp == nil {
			return 0xff
		}
		return cp.Content.(*packets.Connack).ReasonCode
	}
	for _, c := range []struct{ id, user, pass string }{
		{"d:outpst:gw:dev1", "use-token-auth", "wrong"},
		{"d:outpst:gw:dev1", "someone", "tok"},
		{"d:other1:gw:dev1", "use-token-auth", "tok"},
		{"d:outpst:g/w:dev1", "use-token-auth", "tok"},
		{"x:outpst:gw:dev1", "use-token-auth", "tok"},
	} {
		if rc := connect(dial(t, h), c.id, c.user, c.pass); rc == 0 {
			t.Errorf("%+v accepted", c)
		}
	}
	r := dial(t, h)
	if rc := connect(r, "d:outpst:gw:dev1", "use-token-auth", "tok"); rc != 0 {
		t.Fatalf("a good token: CONNACK 0x%02x", rc)
	}
	r.send(&packets.Publish{Topic: "iot-2/evt/temp/fmt/json", QoS: 1, PacketID: 1, Retain: true, Payload: []byte(`{"t":1}`)})
	if a := r.read().Content.(*packets.Puback); a.ReasonCode != 0 {
		t.Fatalf("event: PUBACK 0x%02x", a.ReasonCode)
	}
	if ev := h.Telemetry(); len(ev) != 1 || ev[0].Device != "gw:dev1" || ev[0].Props["event"] != "temp" {
		t.Fatalf("events %+v", ev)
	}
	r.send(&packets.Publish{Topic: "iot-2/evt/big/fmt/bin", QoS: 1, PacketID: 2, Payload: make([]byte, 131073)})
	if cp := r.read(); cp != nil {
		if _, ok := cp.Content.(*packets.Disconnect); !ok {
			t.Fatalf("a payload over 131072 bytes: %T, want the connection closed", cp.Content)
		}
	}
}

func TestAPIErrors(t *testing.T) {
	h := startTestHub(t)
	srv := httptest.NewServer(h.routes())
	defer srv.Close()
	do := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, c := range []struct {
		method, path, body string
		status             int
	}{
		{"POST", "/api/devices/nobody/methods/echo", "", 409},
		{"POST", "/api/devices/nobody/methods/a+b", "", 400},
		{"GET", "/api/devices/nobody/twin", "", 404},
		{"PATCH", "/api/devices/dev9/twin/desired", `[1]`, 400},
		{"PATCH", "/api/devices/dev9/twin/desired", `{"rate":1}`, 200},
		{"POST", "/api/faults", `{}`, 400},
		{"POST", "/api/devices/nobody/methods/echo?timeout=x", "", 400},
		{"POST", "/api/devices/t:nobody/firmware", `{"version":"1"}`, 400},
		{"POST", "/api/devices/t:nobody/firmware", `{"uri":"http://x/y"}`, 404},
		{"GET", "/api/devices/t:nobody/dm", "", 404},
	} {
		if st, body := do(c.method, c.path, c.body); st != c.status {
			t.Errorf("%s %s: %d %s, want %d", c.method, c.path, st, body, c.status)
		} else if st >= 400 {
			var e struct{ Error string }
			if json.Unmarshal([]byte(body), &e) != nil || e.Error == "" {
				t.Errorf("%s %s: error body %q is not {\"error\": ...}", c.method, c.path, body)
			}
		}
	}
	if st, body := do("GET", "/api/devices/dev9/twin", ""); st != 200 || !strings.Contains(body, `"rate":1`) {
		t.Errorf("twin after a patch: %d %s", st, body)
	}
}

// TestOfflineOnline: an outage cuts the device's connection and refuses
// new ones; once online, the same address serves again.
func TestOfflineOnline(t *testing.T) {
	h := startTestHub(t)
	r := dial(t, h)
	if rc := azureConnect(t, r, "dev1", nil); rc != 0 {
		t.Fatalf("CONNACK 0x%02x", rc)
	}
	waitDevice(t, h, "dev1", true)
	if err := h.Offline(); err != nil {
		t.Fatal(err)
	}
	if cp := r.read(); cp != nil {
		t.Errorf("the outage sent %T; want the connection cut", cp.Content)
	}
	if c, err := net.DialTimeout("tcp", h.Addr(), time.Second); err == nil {
		c.Close()
		t.Error("a connection was accepted while offline")
	}
	if !h.Stats().Offline || h.Devices()[0].Connected {
		t.Errorf("offline: stats %+v devices %+v", h.Stats(), h.Devices())
	}
	if err := h.Offline(); err != nil {
		t.Errorf("offline twice: %v", err)
	}
	if err := h.Online(); err != nil {
		t.Fatal(err)
	}
	if rc := azureConnect(t, dial(t, h), "dev1", nil); rc != 0 {
		t.Fatalf("CONNACK 0x%02x after online", rc)
	}
	waitDevice(t, h, "dev1", true)
	if h.Stats().Offline {
		t.Error("still offline after Online")
	}
}

func waitDevice(t *testing.T, h *Hub, id string, connected bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, d := range h.Devices() {
			if d.ID == id && d.Connected == connected {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("device %s connected=%v never seen: %+v", id, connected, h.Devices())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestServedFiles(t *testing.T) {
	h, err := New(Options{Listen: "127.0.0.1:0", API: "127.0.0.1:0", Files: map[string][]byte{"fw.img": []byte("image")}})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for path, want := range map[string]int{"/files/fw.img": 200, "/files/other": 404} {
		resp, err := http.Get("http://" + h.APIAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || (want == 200 && string(b) != "image") {
			t.Errorf("GET %s: %d %q, want %d", path, resp.StatusCode, b, want)
		}
	}
}

// TestOfflineEdges: a device whose connection was accepted before the
// outage is refused at its CONNECT, and Close does not wait for clients
// still connected while offline.
func TestOfflineEdges(t *testing.T) {
	h := startTestHub(t)
	early := dial(t, h)    // accepted before the outage
	observer := dial(t, h) // an observer stays connected through it
	observer.send(&packets.Connect{ProtocolName: "MQTT", ProtocolVersion: 5, ClientID: "watcher", CleanStart: true, KeepAlive: 60})
	if ca, ok := observer.read().Content.(*packets.Connack); !ok || ca.ReasonCode != 0 {
		t.Fatal("observer not admitted")
	}
	if err := h.Offline(); err != nil {
		t.Fatal(err)
	}
	if rc := azureConnect(t, early, "dev1", nil); rc < 0x80 {
		t.Errorf("a CONNECT during the outage: 0x%02x, want a refusal", rc)
	}
	done := make(chan error, 1)
	go func() { done <- h.Close() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for a client connected while offline")
	}
}

// TestFilesDir: the served directory's regular files, and nothing else:
// no listing, no hidden file, no way out by "..", an encoded slash or a
// symbolic link.
func TestFilesDir(t *testing.T) {
	dir, outside := t.TempDir(), t.TempDir()
	for name, body := range map[string]string{"m.wasm": "module", ".env": "secret"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(outside, "x"), []byte("outside"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "x"), filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	h, err := New(Options{Listen: "127.0.0.1:0", API: "127.0.0.1:0", FilesDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for path, want := range map[string]int{"/files/m.wasm": 200, "/files/.env": 404, "/files/sub": 404, "/files/.%2F": 404,
		"/files/sub%2F..%2Fm.wasm": 404, "/files/..%2F..%2Fetc%2Fpasswd": 404, "/files/link": 404, "/files/": 404} {
		resp, err := http.Get("http://" + h.APIAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want || (want == 200 && string(b) != "module") {
			t.Errorf("GET %s: %d %q, want %d", path, resp.StatusCode, b, want)
		}
	}
}
