package hub

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/outpost-edge/outpost/runtime/dialect/azure"
	"github.com/outpost-edge/outpost/runtime/twin"
)

// Topics of the Azure API, as the hub sees them.
const (
	azureCommands = "$iothub/commands"
)

// device is one device the hub knows, connected or not.
type device struct {
	dialect string
	id      string // Azure: the client id; Watson: type/id
	conn    *conn  // the current connection; nil when offline

	// Azure.
	desired, reported       map[string]any
	desiredVer, reportedVer int64
	commands                []*Command
	methods                 map[string]chan MethodResult // waiting invocations, by correlation data

	// Watson.
	wat *watsonState
}

// azureDevice returns the Azure device id, creating it. h.mu must be held.
func (h *Hub) azureDeviceLocked(id string) *device {
	key := "azure/" + id
	d := h.devices[key]
	if d == nil {
		d = &device{dialect: dialectAzure, id: id, desired: map[string]any{}, reported: map[string]any{},
			desiredVer: 1, reportedVer: 1, methods: map[string]chan MethodResult{}}
		h.devices[key] = d
	}
	return d
}

// azureConnect checks an Azure CONNECT (PROTOCOLS.md 3.1): api-version,
// then a SAS signature over host, client id, policy, sas-at and sas-expiry
// with the device's key, not expired; or X509 with a verified client
// certificate naming the device.
func (h *Hub) azureConnect(cl *mqtt.Client, pk packets.Packet) (*conn, error) {
	p := pk.Properties
	props := userProps(p.User)
	if cl.Properties.ProtocolVersion != 5 {
		return nil, errString("azure: MQTT 5 only")
	}
	if v := props["api-version"]; v != azure.APIVersion {
		return nil, fmt.Errorf("azure: api-version %q, want %s", v, azure.APIVersion)
	}
	if pk.Connect.UsernameFlag || pk.Connect.PasswordFlag {
		return nil, errString("azure: username/password authentication is not supported")
	}
	id, module, _ := strings.Cut(cl.ID, "/")
	if id == "" || strings.ContainsAny(cl.ID, "+#") || strings.Contains(module, "/") {
		return nil, fmt.Errorf("azure: client id %q: want deviceId or deviceId/moduleId", cl.ID)
	}
	c := &conn{cl: cl}
	switch p.AuthenticationMethod {
	case azure.AuthSAS:
		exp, err := h.checkSAS(cl.ID, props, p.AuthenticationData)
		if err != nil {
			return nil, err
		}
		c.expiry = time.AfterFunc(time.Until(exp), func() {
			h.disconnect(cl, packets.ErrNotAuthorized, packets.UserProperty{Key: "status", Val: "0101"},
				packets.UserProperty{Key: "reason", Val: "SAS token expired"})
		})
	case azure.AuthX509:
		tc, ok := cl.Net.Conn.(*tls.Conn)
		if !ok || len(tc.ConnectionState().VerifiedChains) == 0 {
			return nil, errString("azure: X509 needs a TLS listener and a verified client certificate")
		}
		if cn := tc.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != id {
			return nil, fmt.Errorf("azure: X509 certificate names %q, not %q", cn, id)
		}
	default:
		return nil, fmt.Errorf("azure: Authentication Method %q, want SAS or X509", p.AuthenticationMethod)
	}
	h.mu.Lock()
	c.dev = h.azureDeviceLocked(cl.ID)
	h.mu.Unlock()
	return c, nil
}

// checkSAS verifies a SAS signature and returns its expiry.
func (h *Hub) checkSAS(clientID string, props map[string]string, sig []byte) (time.Time, error) {
	id, _, _ := strings.Cut(clientID, "/")
	key, ok := h.o.AzureKeys[id]
	if !ok {
		key = h.o.DefaultKey
	}
	if key == nil {
		return time.Time{}, fmt.Errorf("azure: unknown device %q", id)
	}
	if host, ok := props["host"]; ok && host != h.o.AzureHost {
		return time.Time{}, fmt.Errorf("azure: host %q, this hub is %q", host, h.o.AzureHost)
	}
	expMS, ok := props["sas-expiry"]
	if !ok {
		return time.Time{}, errString("azure: sas-expiry is required")
	}
	exp, err := parseMS(expMS)
	if err != nil {
		return time.Time{}, fmt.Errorf("azure: sas-expiry %q: %v", expMS, err)
	}
	atS := props["sas-at"]
	if atS != "" {
		if _, err := parseMS(atS); err != nil {
			return time.Time{}, fmt.Errorf("azure: sas-at %q: %v", atS, err)
		}
	}
	want := azureSign(key, h.o.AzureHost, clientID, props["sas-policy"], atS, expMS)
	if !hmac.Equal(sig, want) {
		return time.Time{}, errString("azure: SAS signature does not match")
	}
	if !exp.After(time.Now()) {
		return time.Time{}, fmt.Errorf("azure: SAS expired at %s", exp.UTC().Format(time.RFC3339))
	}
	return exp, nil
}

// azureSign signs the properties as sent, so that their exact text is
// what is signed.
func azureSign(key []byte, host, clientID, policy, at, exp string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(host + "\n" + clientID + "\n" + policy + "\n" + at + "\n" + exp + "\n"))
	return m.Sum(nil)
}

func parseMS(s string) (time.Time, error) {
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return time.Time{}, errString("want milliseconds since the epoch")
	}
	return time.UnixMilli(v), nil
}

// azureReauth serves an AUTH with reason 0x19: a new SAS signature for the
// same identity. Success is AUTH 0x00 and a new expiry; failure a
// DISCONNECT 135.
func (h *Hub) azureReauth(c *conn, pk packets.Packet) {
	props := userProps(pk.Properties.User)
	if pk.ReasonCode != 0x19 || pk.Properties.AuthenticationMethod != azure.AuthSAS {
		h.disconnect(c.cl, packets.ErrNotAuthorized, packets.UserProperty{Key: "status", Val: "0101"},
			packets.UserProperty{Key: "reason", Val: "re-authentication must be reason 0x19 with method SAS"})
		return
	}
	exp, err := h.checkSAS(c.cl.ID, props, pk.Properties.AuthenticationData)
	if err != nil {
		h.log.Warn("hub refused a re-authentication", "client", c.cl.ID, "error", err)
		h.disconnect(c.cl, packets.ErrNotAuthorized, packets.UserProperty{Key: "status", Val: "0101"},
			packets.UserProperty{Key: "reason", Val: err.Error()})
		return
	}
	if c.expiry != nil {
		c.expiry.Reset(time.Until(exp))
	}
	_ = c.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Auth}, ReasonCode: 0,
		Properties: packets.Properties{AuthenticationMethod: azure.AuthSAS}})
	h.log.Info("device re-authenticated", "client", c.cl.ID, "expiry", exp.UTC().Format(time.RFC3339))
}

// azureFilter reports whether an Azure device may subscribe to filter.
func azureFilter(f string) bool {
	switch f {
	case azure.TopicMethods, azureCommands, azure.TopicTwinDesired, azure.TopicResponses:
		return true
	}
	name, ok := strings.CutPrefix(f, azure.TopicMethodsPrefix)
	return ok && name != "" && !strings.ContainsAny(name, "/#+")
}

// systemProps are the user properties a device may put on telemetry
// without "@" (PROTOCOLS.md 3.6).
var systemProps = map[string]bool{"content-encoding": true, "message-id": true, "user-id": true,
	"correlation-id": true, "creation-time": true}

// azurePublish serves an Azure device's publish by topic.
func (h *Hub) azurePublish(c *conn, pk packets.Packet) (packets.Packet, error) {
	switch pk.TopicName {
	case azure.TopicTelemetry:
		return h.azureTelemetry(c, pk)
	case azure.TopicResponses:
		h.azureMethodResponse(c, pk)
	case azure.TopicTwinGet, azure.TopicTwinReported:
		h.azureTwinRequest(c, pk)
	default:
		// PROTOCOLS.md 3.2: Not Found; at QoS 0, DISCONNECT 144.
		return pk, h.refuse(c, pk, packets.ErrTopicNameInvalid, azure.StatusNotFound, "Unsupported topic")
	}
	return pk, packets.ErrRejectPacket // served; nobody else receives requests
}

// refuse answers a publish the hub refuses: at QoS 1 a PUBACK with the
// status's reason code and the status; at QoS 0 (no acknowledgement) a
// DISCONNECT.
func (h *Hub) refuse(c *conn, pk packets.Packet, disconnect packets.Code, st azure.Status, reason string) error {
	props := []packets.UserProperty{{Key: "status", Val: st.String()}, {Key: "reason", Val: reason},
		{Key: "trace-id", Val: traceID()}}
	if pk.FixedHeader.Qos == 0 {
		h.disconnect(c.cl, disconnect, props...)
		return packets.ErrRejectPacket
	}
	_ = c.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID,
		ReasonCode: st.Reason(), Properties: packets.Properties{User: props}})
	return packets.ErrRejectPacket
}

// azureTelemetry checks and records a telemetry message.
func (h *Hub) azureTelemetry(c *conn, pk packets.Packet) (packets.Packet, error) {
	props := map[string]string{}
	for _, u := range pk.Properties.User {
		if !strings.HasPrefix(u.Key, "@") && !systemProps[u.Key] {
			return pk, h.refuse(c, pk, packets.ErrImplementationSpecificError, azure.StatusBadRequest,
				fmt.Sprintf("unknown property %q (application properties start with @)", u.Key))
		}
		if u.Key == "creation-time" {
			if _, err := parseMS(u.Val); err != nil {
				return pk, h.refuse(c, pk, packets.ErrImplementationSpecificError, azure.StatusBadRequest,
					"creation-time must be milliseconds since the epoch")
			}
		}
		props[u.Key] = u.Val
	}
	if len(pk.Properties.CorrelationData) > azure.MaxCorrelation {
		return pk, h.refuse(c, pk, packets.ErrImplementationSpecificError, azure.StatusBadRequest, "Correlation Data over 16 bytes")
	}
	if f := h.fault(c.dev.id, "telemetry"); f != nil {
		if f.Drop {
			return pk, packets.ErrRejectPacket // no acknowledgement at all
		}
		if st, err := azure.ParseStatus(f.Status); err == nil {
			return pk, h.refuse(c, pk, packets.Code{Code: st.Reason(), Reason: st.Name()}, st, "injected fault")
		}
	}
	h.record(Event{Time: time.Now(), Dialect: dialectAzure, Device: c.dev.id, Topic: pk.TopicName, QoS: pk.FixedHeader.Qos,
		ContentType: pk.Properties.ContentType, Props: props, Payload: string(pk.Payload)})
	return pk, nil // acknowledged by mochi, seen by observers
}

// reqrep checks a ReqRep request's framing: QoS 0 and Correlation Data of
// 1 to 16 bytes, or the hub's DISCONNECT.
func (h *Hub) reqrep(c *conn, pk packets.Packet) bool {
	switch cd := pk.Properties.CorrelationData; {
	case pk.FixedHeader.Qos != 0:
		_ = h.refuse(c, pk, packets.ErrImplementationSpecificError, azure.StatusBadRequest, "a request must be QoS 0")
	case len(cd) == 0:
		h.disconnect(c.cl, packets.ErrImplementationSpecificError, packets.UserProperty{Key: "status", Val: "0100"},
			packets.UserProperty{Key: "reason", Val: "`Correlation Data` property is missing"})
	case len(cd) > azure.MaxCorrelation:
		h.disconnect(c.cl, packets.ErrImplementationSpecificError, packets.UserProperty{Key: "status", Val: "0100"},
			packets.UserProperty{Key: "reason", Val: "`Correlation Data` is over 16 bytes"})
	default:
		return true
	}
	return false
}

// respond answers a ReqRep request on $iothub/responses.
func (h *Hub) respond(c *conn, corr []byte, payload []byte, props ...packets.UserProperty) {
	_ = c.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: azure.TopicResponses,
		Payload: payload, Properties: packets.Properties{CorrelationData: corr, User: props}})
}

// failed answers a ReqRep request with a status.
func (h *Hub) failed(c *conn, corr []byte, st azure.Status, reason string) {
	h.respond(c, corr, nil, packets.UserProperty{Key: "status", Val: st.String()},
		packets.UserProperty{Key: "reason", Val: reason}, packets.UserProperty{Key: "trace-id", Val: traceID()})
}

// azureTwinRequest serves twin get and reported patches.
func (h *Hub) azureTwinRequest(c *conn, pk packets.Packet) {
	if !h.reqrep(c, pk) {
		return
	}
	corr := pk.Properties.CorrelationData
	op := "twin.get"
	if pk.TopicName == azure.TopicTwinReported {
		op = "twin.reported"
	}
	if f := h.fault(c.dev.id, op); f != nil {
		if f.Drop {
			return
		}
		if st, err := azure.ParseStatus(f.Status); err == nil {
			h.failed(c, corr, st, "injected fault")
			return
		}
	}
	d := c.dev
	if op == "twin.get" {
		h.mu.Lock()
		doc := h.twinDocLocked(d)
		h.mu.Unlock()
		h.respond(c, corr, doc)
		return
	}
	var patch map[string]any
	if err := json.Unmarshal(pk.Payload, &patch); err != nil || patch == nil {
		h.failed(c, corr, azure.StatusBadRequest, "the patch is not a JSON object")
		return
	}
	if len(pk.Payload) > twin.MaxSection {
		h.failed(c, corr, azure.StatusBadRequest, "the patch is over 32 KiB")
		return
	}
	ifv := userProps(pk.Properties.User)["if-version"]
	h.mu.Lock()
	if ifv != "" && ifv != strconv.FormatInt(d.reportedVer, 10) {
		cur := d.reportedVer
		h.mu.Unlock()
		h.failed(c, corr, azure.StatusPreconditionFailed, fmt.Sprintf("if-version %s, the version is %d", ifv, cur))
		return
	}
	twin.Merge(d.reported, patch)
	d.reportedVer++
	v := d.reportedVer
	h.mu.Unlock()
	h.respond(c, corr, nil, packets.UserProperty{Key: "version", Val: strconv.FormatInt(v, 10)})
}

func (h *Hub) twinDocLocked(d *device) []byte {
	des := clone(d.desired)
	des["$version"] = d.desiredVer
	rep := clone(d.reported)
	rep["$version"] = d.reportedVer
	b, _ := json.Marshal(map[string]any{"desired": des, "reported": rep})
	return b
}

// Twin returns a device's twin document.
func (h *Hub) Twin(deviceID string) ([]byte, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.devices["azure/"+deviceID]
	if d == nil {
		return nil, ErrNoDevice
	}
	return h.twinDocLocked(d), nil
}

// ErrNoDevice is returned for a device the hub has never seen.
var ErrNoDevice = errors.New("hub: no such device")

// ErrOffline is returned for an operation that needs the device connected.
var ErrOffline = errors.New("hub: the device is not connected")

// PatchDesired merges patch into a device's desired properties (the device
// need not have connected yet) and sends it to the device if it is
// connected. It returns the new desired version.
func (h *Hub) PatchDesired(deviceID string, patch []byte) (int64, error) {
	var p map[string]any
	if err := json.Unmarshal(patch, &p); err != nil || p == nil {
		return 0, errString("hub: the patch must be a JSON object")
	}
	h.mu.Lock()
	d := h.azureDeviceLocked(deviceID)
	twin.Merge(d.desired, p)
	d.desiredVer++
	v, c := d.desiredVer, d.conn
	h.mu.Unlock()
	if c != nil && c.cl.State.Subscriptions != nil {
		if _, ok := c.cl.State.Subscriptions.Get(azure.TopicTwinDesired); ok {
			_ = c.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: azure.TopicTwinDesired,
				Payload: patch, Properties: packets.Properties{User: []packets.UserProperty{{Key: "version", Val: strconv.FormatInt(v, 10)}}}})
		}
	}
	return v, nil
}

// MethodResult is a direct method's response: the handler's status
// (response-code), or the device's status when it answered that it cannot
// serve the method.
type MethodResult struct {
	Status       int    `json:"status"`
	DeviceStatus string `json:"device_status,omitempty"`
	Payload      string `json:"payload"`
}

// Invoke calls a direct method on a connected device and waits for its
// response (at most timeout; 0 = the hub's default).
func (h *Hub) Invoke(ctx context.Context, deviceID, method string, payload []byte, timeout time.Duration) (MethodResult, error) {
	if method == "" || strings.ContainsAny(method, "/+#") {
		return MethodResult{}, errString(fmt.Sprintf("hub: method name %q: want one topic level", method))
	}
	if timeout <= 0 {
		timeout = h.o.MethodTimeout
	}
	corr := make([]byte, 16)
	_, _ = rand.Read(corr)
	ch := make(chan MethodResult, 1)
	h.mu.Lock()
	d := h.devices["azure/"+deviceID]
	if d == nil || d.conn == nil {
		h.mu.Unlock()
		return MethodResult{}, ErrOffline
	}
	c := d.conn
	d.methods[string(corr)] = ch
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(d.methods, string(corr))
		h.mu.Unlock()
	}()
	err := c.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName: azure.TopicMethodsPrefix + method, Payload: payload, Properties: packets.Properties{CorrelationData: corr}})
	if err != nil {
		return MethodResult{}, fmt.Errorf("hub: invoke: %w", err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r, nil
	case <-t.C:
		return MethodResult{}, ErrTimeout
	case <-ctx.Done():
		return MethodResult{}, ctx.Err()
	}
}

// ErrTimeout is returned when a device does not answer in time.
var ErrTimeout = errors.New("hub: the device did not answer in time")

// azureMethodResponse matches a method response to its invocation. A
// response without a valid response-code breaks the protocol.
func (h *Hub) azureMethodResponse(c *conn, pk packets.Packet) {
	if !h.reqrep(c, pk) {
		return
	}
	props := userProps(pk.Properties.User)
	res := MethodResult{Payload: string(pk.Payload)}
	if st, ok := props["status"]; ok {
		// The alternative answer: the device cannot serve the method
		// (06A0, Target Unavailable).
		if _, err := azure.ParseStatus(st); err != nil {
			h.disconnect(c.cl, packets.ErrImplementationSpecificError, packets.UserProperty{Key: "status", Val: "0100"},
				packets.UserProperty{Key: "reason", Val: "`status` is not four hex digits"})
			return
		}
		res.DeviceStatus = st
	} else {
		code, err := strconv.ParseUint(props["response-code"], 10, 32)
		if err != nil {
			h.disconnect(c.cl, packets.ErrImplementationSpecificError, packets.UserProperty{Key: "status", Val: "0100"},
				packets.UserProperty{Key: "reason", Val: "`response-code` is missing or not a u32"})
			return
		}
		res.Status = int(code)
	}
	h.mu.Lock()
	ch := c.dev.methods[string(pk.Properties.CorrelationData)]
	h.mu.Unlock()
	if ch != nil {
		select {
		case ch <- res:
		default: // a second response to one request: ignored
		}
	}
}

// Command is a cloud-to-device message and its fate.
type Command struct {
	Seq        uint64            `json:"sequence_no"`
	Name       string            `json:"command,omitempty"`
	Payload    string            `json:"payload"`
	Props      map[string]string `json:"properties,omitempty"`
	Enqueued   time.Time         `json:"enqueued"`
	Deliveries int               `json:"delivery_count"`
	// State is queued, delivered (waiting for the acknowledgement),
	// completed, rejected, or dead-lettered (abandoned too often).
	State string `json:"state"`

	packetID uint16
	conn     *conn         // the connection it was delivered on
	done     chan struct{} // closed at a final state
}

// Final reports whether the command's fate is settled.
func (c *Command) Final() bool {
	return c.State == "completed" || c.State == "rejected" || c.State == "dead-lettered" || c.State == "bad-ack"
}

// maxPending is the hub's bound on a device's pending commands.
const maxPending = 50

// SendCommand queues a command for an Azure device; name, when set, goes
// in the @command application property. It is delivered when the device
// is connected and subscribed.
func (h *Hub) SendCommand(deviceID, name string, payload []byte, props map[string]string) (*Command, error) {
	h.mu.Lock()
	d := h.azureDeviceLocked(deviceID)
	pending := 0
	for _, c := range d.commands {
		if !c.Final() {
			pending++
		}
	}
	if pending >= maxPending {
		h.mu.Unlock()
		return nil, fmt.Errorf("hub: %d commands pending for %s (the hub's limit)", pending, deviceID)
	}
	h.seq++
	cmd := &Command{Seq: h.seq, Name: name, Payload: string(payload), Props: props, Enqueued: time.Now(), State: "queued",
		done: make(chan struct{})}
	d.commands = append(d.commands, cmd)
	h.mu.Unlock()
	h.deliverCommands(d)
	return cmd, nil
}

// WaitCommand waits until a command's fate is settled (or ctx ends) and
// returns a copy.
func (h *Hub) WaitCommand(ctx context.Context, cmd *Command) (Command, error) {
	select {
	case <-cmd.done:
	case <-ctx.Done():
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return *cmd, ctx.Err()
}

// Commands returns copies of a device's commands, oldest first.
func (h *Hub) Commands(deviceID string) []Command {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.devices["azure/"+deviceID]
	if d == nil {
		return nil
	}
	out := make([]Command, len(d.commands))
	for i, c := range d.commands {
		out[i] = *c
	}
	return out
}

// deliverCommands sends a connected, subscribed device its queued
// commands, each with its properties and a delivery count one higher.
func (h *Hub) deliverCommands(d *device) {
	h.mu.Lock()
	c := d.conn
	if c == nil || c.cl.State.Subscriptions == nil {
		h.mu.Unlock()
		return
	}
	if _, ok := c.cl.State.Subscriptions.Get(azureCommands); !ok {
		h.mu.Unlock()
		return
	}
	var out []packets.Packet
	for _, cmd := range d.commands {
		if cmd.State != "queued" {
			continue
		}
		id, err := c.cl.NextPacketID()
		if err != nil {
			break
		}
		cmd.Deliveries++
		cmd.State = "delivered"
		cmd.packetID, cmd.conn = uint16(id), c
		user := []packets.UserProperty{{Key: "sequence-no", Val: strconv.FormatUint(cmd.Seq, 10)},
			{Key: "enqueued-time", Val: strconv.FormatInt(cmd.Enqueued.UnixMilli(), 10)},
			{Key: "delivery-count", Val: strconv.Itoa(cmd.Deliveries)}}
		if cmd.Name != "" {
			user = append(user, packets.UserProperty{Key: azure.CommandProperty, Val: cmd.Name})
		}
		for k, v := range cmd.Props {
			user = append(user, packets.UserProperty{Key: k, Val: v})
		}
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, TopicName: azureCommands,
			PacketID: uint16(id), Payload: []byte(cmd.Payload), Properties: packets.Properties{User: user}}
		c.cl.State.Inflight.Set(pk) // reserves the identifier
		out = append(out, pk)
	}
	h.mu.Unlock()
	for _, pk := range out {
		if err := c.cl.WritePacket(pk); err != nil {
			h.log.Warn("command not delivered", "device", d.id, "error", err)
		}
	}
}

// azurePuback settles a delivered command by its acknowledgement:
// complete (reason 0), abandon (status 0603: queued again, dead-lettered
// after MaxDeliveries), or reject (status 0100, or any other refusal).
func (h *Hub) azurePuback(c *conn, pk packets.Packet) {
	h.mu.Lock()
	var cmd *Command
	for _, x := range c.dev.commands {
		if x.State == "delivered" && x.conn == c && x.packetID == pk.PacketID {
			cmd = x
			break
		}
	}
	if cmd == nil {
		h.mu.Unlock()
		return
	}
	status := userProps(pk.Properties.User)["status"]
	redeliver := false
	switch {
	case pk.ReasonCode == 0:
		cmd.State = "completed"
	case pk.ReasonCode == 0x83 && status == azure.StatusServerBusy.String():
		if cmd.Deliveries >= h.o.MaxDeliveries {
			cmd.State = "dead-lettered"
		} else {
			cmd.State, redeliver = "queued", true
		}
	case pk.ReasonCode == 0x83 && status == azure.StatusBadRequest.String():
		cmd.State = "rejected"
	default:
		// Not one of the three acknowledgements the API defines.
		cmd.State = "bad-ack"
		h.log.Warn("a command acknowledged with a reason code and status the API does not define",
			"device", c.dev.id, "reason_code", pk.ReasonCode, "status", status)
	}
	if cmd.Final() {
		close(cmd.done)
	}
	h.mu.Unlock()
	h.log.Info("command acknowledged", "device", c.dev.id, "sequence_no", cmd.Seq, "reason_code", pk.ReasonCode,
		"status", status, "state", cmd.State)
	if redeliver {
		h.after(h.o.RedeliveryDelay, func() { h.deliverCommands(c.dev) })
	}
}

// requeue puts back the commands a lost connection left unacknowledged:
// the hub delivers them again on the next connection.
func (h *Hub) requeue(c *conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, cmd := range c.dev.commands {
		if cmd.State == "delivered" && cmd.conn == c {
			cmd.State, cmd.conn = "queued", nil
		}
	}
}

func userProps(ps []packets.UserProperty) map[string]string {
	m := make(map[string]string, len(ps))
	for _, p := range ps {
		if _, ok := m[p.Key]; !ok {
			m[p.Key] = p.Val
		}
	}
	return m
}

func traceID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

func clone(m map[string]any) map[string]any {
	b, _ := json.Marshal(m)
	out := map[string]any{}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	_ = dec.Decode(&out)
	return out
}
