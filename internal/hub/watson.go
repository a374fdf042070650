package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/outpost-edge/outpost/runtime/dialect/watson"
)

// watsonState is a Watson device's device-management state in the hub.
type watsonState struct {
	dev      watson.Identity
	gateway  *device // the gateway a child is reached through; nil = itself
	managed  bool
	lifetime int
	supports map[string]any
	info     json.RawMessage
	firmware map[string]any // the last mgmt.firmware value notified or observed
	location json.RawMessage
	errors   []int
	logs     []json.RawMessage
	waiting  map[string]chan dmReply // platform requests waiting, by reqId
	notified chan struct{}           // closed and replaced at each notify
	observed map[string]bool         // fields the platform observes
}

// dmReply is a DM response.
type dmReply struct {
	RC      int             `json:"rc"`
	Message string          `json:"message,omitempty"`
	D       json.RawMessage `json:"d,omitempty"`
	ReqID   json.RawMessage `json:"reqId,omitempty"`
}

// watsonKey is the hub's key of a Watson device; its API id is TYPE:ID.
func watsonKey(dev watson.Identity) string { return "watson/" + dev.Type + "/" + dev.ID }

// watsonDeviceLocked returns the Watson device, creating it. h.mu must be
// held.
func (h *Hub) watsonDeviceLocked(dev watson.Identity) *device {
	d := h.devices[watsonKey(dev)]
	if d == nil {
		d = &device{dialect: dialectWatson, id: dev.Type + ":" + dev.ID,
			wat: &watsonState{dev: dev, waiting: map[string]chan dmReply{}, notified: make(chan struct{})}}
		h.devices[watsonKey(dev)] = d
	}
	return d
}

// watsonConnect checks a Watson CONNECT (PROTOCOLS.md 1.2): the client id
// d:org:type:id or g:org:type:id in this hub's organization, token
// authentication.
func (h *Hub) watsonConnect(cl *mqtt.Client, pk packets.Packet) (*conn, error) {
	p := strings.Split(cl.ID, ":")
	if len(p) != 4 {
		return nil, fmt.Errorf("watson: client id %q: want d:org:type:id or g:org:type:id", cl.ID)
	}
	if p[1] != h.o.WatsonOrg {
		return nil, fmt.Errorf("watson: organization %q, this hub is %q", p[1], h.o.WatsonOrg)
	}
	dev := watson.Identity{Type: p[2], ID: p[3]}
	if err := errors.Join(watson.ValidID("type", dev.Type), watson.ValidID("device", dev.ID)); err != nil {
		return nil, err
	}
	token, ok := h.o.WatsonTokens[cl.ID]
	if !ok {
		token = h.o.DefaultToken
	}
	if string(pk.Connect.Username) != "use-token-auth" || string(pk.Connect.Password) != token || token == "" {
		return nil, errString("watson: token authentication failed (username use-token-auth, the token as password)")
	}
	h.mu.Lock()
	d := h.watsonDeviceLocked(dev)
	h.mu.Unlock()
	return &conn{cl: cl, dev: d, gateway: p[0] == "g"}, nil
}

// watsonFilter reports whether a Watson device may subscribe to filter: a
// device to its own commands and DM topics, a gateway to the typed ones.
func (h *Hub) watsonFilter(c *conn, f string) bool {
	if c.gateway {
		return strings.HasPrefix(f, "iot-2/type/") || strings.HasPrefix(f, "iotdm-1/type/")
	}
	return strings.HasPrefix(f, "iot-2/cmd/") || (strings.HasPrefix(f, "iotdm-1/") && !strings.HasPrefix(f, "iotdm-1/type/"))
}

// watsonPublish serves a Watson device's publish: events are recorded,
// DM requests and responses served, anything else dropped and logged.
func (h *Hub) watsonPublish(c *conn, pk packets.Packet) (packets.Packet, error) {
	if len(pk.Payload) > watson.MaxPayload {
		// "The message size is too large for this endpoint": the message
		// is refused and the client disconnected.
		h.disconnect(c.cl, packets.ErrPacketTooLarge)
		return pk, packets.ErrRejectPacket
	}
	pk.FixedHeader.Retain = false // not authorized: cleared, the message kept
	if dev, event, format, ok := watson.ParseEventTopic(pk.TopicName); ok {
		if dev == (watson.Identity{}) {
			dev = c.dev.wat.dev
		} else if !c.gateway {
			h.log.Warn("a device published for another device: dropped", "client", c.cl.ID, "topic", pk.TopicName)
			return pk, packets.ErrRejectPacket
		}
		if f := h.fault(dev.Type+":"+dev.ID, "event"); f != nil {
			return pk, packets.ErrRejectPacket
		}
		h.mu.Lock()
		h.watsonDeviceLocked(dev).wat.gatewayOf(c.dev)
		h.mu.Unlock()
		h.record(Event{Time: time.Now(), Dialect: dialectWatson, Device: dev.Type + ":" + dev.ID, Topic: pk.TopicName,
			QoS: pk.FixedHeader.Qos, Props: map[string]string{"event": event, "format": format}, Payload: string(pk.Payload)})
		return pk, nil
	}
	if rest, ok := strings.CutPrefix(pk.TopicName, "iotdevice-1/"); ok {
		h.watsonDM(c, rest, pk.Payload)
		return pk, nil // observers see the DM traffic too
	}
	h.log.Warn("Watson publish on a topic no rule allows: dropped", "client", c.cl.ID, "topic", pk.TopicName)
	return pk, packets.ErrRejectPacket
}

func (w *watsonState) gatewayOf(gw *device) {
	if gw.wat != w {
		w.gateway = gw
	}
}

// watsonDM serves a device-to-platform DM message.
func (h *Hub) watsonDM(c *conn, rest string, payload []byte) {
	dev := c.dev.wat.dev
	if c.gateway {
		p := strings.SplitN(rest, "/", 5)
		if len(p) != 5 || p[0] != "type" || p[2] != "id" {
			h.log.Warn("gateway DM message not on a typed topic: dropped", "topic", rest)
			return
		}
		dev, rest = watson.Identity{Type: p[1], ID: p[3]}, p[4]
	}
	h.mu.Lock()
	d := h.watsonDeviceLocked(dev)
	d.wat.gatewayOf(c.dev)
	w := d.wat
	h.mu.Unlock()
	var req struct {
		D     json.RawMessage `json:"d"`
		ReqID json.RawMessage `json:"reqId"`
	}
	if err := json.Unmarshal(payload, &req); err != nil {
		h.log.Warn("DM message that is not a JSON object", "device", d.id, "op", rest)
		return
	}
	reply := func(rc int, msg string) {
		if len(req.ReqID) == 0 {
			return
		}
		h.watsonSend(c, dev, "response", dmReply{RC: rc, Message: msg, ReqID: req.ReqID}, 0)
	}
	if f := h.fault(d.id, strings.ReplaceAll(rest, "/", ".")); f != nil && !f.Drop {
		rc, _ := strconv.Atoi(f.Status)
		reply(rc, "injected fault")
		return
	} else if f != nil {
		return
	}
	switch rest {
	case "response":
		var r dmReply
		var id string
		if json.Unmarshal(payload, &r) != nil || json.Unmarshal(r.ReqID, &id) != nil {
			h.log.Warn("DM response without rc and a string reqId", "device", d.id, "payload", string(payload))
			return
		}
		h.mu.Lock()
		ch := w.waiting[id]
		h.mu.Unlock()
		if ch != nil {
			select {
			case ch <- r:
			default: // a second response to one request: ignored
			}
		}
	case "mgmt/manage":
		var m struct {
			Lifetime   int             `json:"lifetime"`
			Supports   map[string]any  `json:"supports"`
			DeviceInfo json.RawMessage `json:"deviceInfo"`
		}
		if len(req.D) > 0 && json.Unmarshal(req.D, &m) != nil {
			reply(400, "d is not a manage request")
			return
		}
		h.mu.Lock()
		w.managed, w.lifetime, w.supports = true, m.Lifetime, m.Supports
		if len(m.DeviceInfo) > 0 {
			w.info = m.DeviceInfo
		}
		h.mu.Unlock()
		h.log.Info("device managed", "device", d.id, "lifetime", m.Lifetime, "supports", m.Supports)
		reply(200, "")
	case "mgmt/unmanage":
		h.mu.Lock()
		w.managed = false
		h.mu.Unlock()
		reply(200, "")
	case "notify":
		var fields struct {
			Fields []struct {
				Field string          `json:"field"`
				Value json.RawMessage `json:"value"`
			} `json:"fields"`
			Field string          `json:"field"`
			Value json.RawMessage `json:"value"`
		}
		if json.Unmarshal(req.D, &fields) != nil {
			reply(400, "bad notify")
			return
		}
		if fields.Field != "" {
			fields.Fields = append(fields.Fields, struct {
				Field string          `json:"field"`
				Value json.RawMessage `json:"value"`
			}{fields.Field, fields.Value})
		}
		h.mu.Lock()
		for _, f := range fields.Fields {
			if !w.observed[f.Field] {
				h.mu.Unlock()
				reply(404, "no observation exists for "+f.Field)
				return
			}
		}
		for _, f := range fields.Fields {
			if f.Field == "mgmt.firmware" {
				var v map[string]any
				if json.Unmarshal(f.Value, &v) == nil {
					if w.firmware == nil {
						w.firmware = map[string]any{}
					}
					for k, x := range v {
						w.firmware[k] = x
					}
				}
			}
		}
		close(w.notified)
		w.notified = make(chan struct{})
		h.mu.Unlock()
		reply(200, "")
	case "device/update/location":
		h.mu.Lock()
		w.location = req.D
		h.mu.Unlock()
		reply(200, "")
	case "add/diag/errorCodes":
		var e struct {
			ErrorCode int `json:"errorCode"`
		}
		if json.Unmarshal(req.D, &e) != nil {
			reply(400, "d.errorCode must be a number")
			return
		}
		h.mu.Lock()
		w.errors = append(w.errors, e.ErrorCode)
		h.mu.Unlock()
		reply(200, "")
	case "clear/diag/errorCodes":
		h.mu.Lock()
		w.errors = nil
		h.mu.Unlock()
		reply(200, "")
	case "add/diag/log":
		h.mu.Lock()
		w.logs = append(w.logs, req.D)
		h.mu.Unlock()
		reply(200, "")
	case "clear/diag/log":
		h.mu.Lock()
		w.logs = nil
		h.mu.Unlock()
		reply(200, "")
	default:
		reply(404, "the operation arrived on an invalid topic")
	}
}

// watsonSend publishes to a Watson device (or a gateway's child) on the
// platform-to-device DM topic of op, at qos.
func (h *Hub) watsonSend(c *conn, dev watson.Identity, op string, v any, qos byte) error {
	topic := "iotdm-1/" + op
	if c.gateway {
		topic = "iotdm-1/type/" + dev.Type + "/id/" + dev.ID + "/" + op
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return h.write(c, topic, b, qos)
}

// write sends a PUBLISH to a connection directly, at QoS 0 or 1.
func (h *Hub) write(c *conn, topic string, payload []byte, qos byte) error {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic, Payload: payload}
	if qos > 0 {
		id, err := c.cl.NextPacketID()
		if err != nil {
			return err
		}
		pk.PacketID = uint16(id)
		c.cl.State.Inflight.Set(pk)
	}
	return c.cl.WritePacket(pk)
}

// watsonConn returns the connection a Watson device is reached through
// (its own, or its gateway's), and the device.
func (h *Hub) watsonConn(id string) (*conn, *device, error) {
	typ, devID, ok := strings.Cut(id, ":")
	if !ok {
		return nil, nil, ErrNoDevice
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.devices[watsonKey(watson.Identity{Type: typ, ID: devID})]
	if d == nil {
		return nil, nil, ErrNoDevice
	}
	c := d.conn
	if c == nil && d.wat.gateway != nil {
		c = d.wat.gateway.conn
	}
	if c == nil {
		return nil, nil, ErrOffline
	}
	return c, d, nil
}

// DMRequest sends a DM request (op, e.g. "mgmt/initiate/device/reboot",
// with d as its "d") to a Watson device and waits for its response.
func (h *Hub) DMRequest(ctx context.Context, deviceID, op string, d json.RawMessage, timeout time.Duration) (DMResult, error) {
	c, dev, err := h.watsonConn(deviceID)
	if err != nil {
		return DMResult{}, err
	}
	if timeout <= 0 {
		timeout = h.o.MethodTimeout
	}
	h.mu.Lock()
	if !dev.wat.managed {
		h.mu.Unlock()
		return DMResult{}, ErrNotManaged
	}
	h.seq++
	id := "hub-" + strconv.FormatUint(h.seq, 10)
	ch := make(chan dmReply, 1)
	dev.wat.waiting[id] = ch
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(dev.wat.waiting, id)
		h.mu.Unlock()
	}()
	body := map[string]any{"reqId": id}
	if len(d) > 0 {
		body["d"] = d
	}
	if err := h.watsonSend(c, dev.wat.dev, op, body, 1); err != nil {
		return DMResult{}, fmt.Errorf("hub: dm %s: %w", op, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if r.RC == 200 && (op == "observe" || op == "cancel") {
			h.track(dev, op, d)
		}
		return DMResult{Op: op, RC: r.RC, Message: r.Message, D: r.D}, nil
	case <-t.C:
		return DMResult{Op: op}, ErrTimeout
	case <-ctx.Done():
		return DMResult{Op: op}, ctx.Err()
	}
}

// ErrNotManaged is returned for a DM request to a device that has not
// managed itself (or unmanaged): the platform sends it none.
var ErrNotManaged = errors.New("hub: the device is not managed")

// track records the fields an observe or cancel named.
func (h *Hub) track(dev *device, op string, d json.RawMessage) {
	var v struct {
		Fields []json.RawMessage `json:"fields"`
	}
	_ = json.Unmarshal(d, &v)
	h.mu.Lock()
	defer h.mu.Unlock()
	if dev.wat.observed == nil {
		dev.wat.observed = map[string]bool{}
	}
	for _, f := range v.Fields {
		var name string
		if json.Unmarshal(f, &name) != nil {
			var obj struct{ Field string }
			_ = json.Unmarshal(f, &obj)
			name = obj.Field
		}
		if op == "observe" {
			dev.wat.observed[name] = true
		} else {
			delete(dev.wat.observed, name)
		}
	}
}

// DMResult is a device's answer to a DM request.
type DMResult struct {
	Op      string          `json:"op"`
	RC      int             `json:"rc"`
	Message string          `json:"message,omitempty"`
	D       json.RawMessage `json:"d,omitempty"`
}

// Firmware is what a firmware update installs.
type Firmware struct {
	URI      string `json:"uri"`
	Verifier string `json:"verifier,omitempty"`
	Version  string `json:"version"`
	Name     string `json:"name,omitempty"`
}

// FirmwareReport is the course of a firmware update.
type FirmwareReport struct {
	Steps    []DMResult     `json:"steps"`
	Firmware map[string]any `json:"firmware,omitempty"` // the last mgmt.firmware the device notified
	Result   string         `json:"result"`             // success, or why not
}

// FirmwareUpdate runs the platform's side of a Watson firmware update
// (PROTOCOLS.md 2.4): set mgmt.firmware, observe it, download, wait for
// the download's outcome, cancel; then observe, update, wait, cancel.
// Each wait is bounded by timeout (default 10 minutes).
func (h *Hub) FirmwareUpdate(ctx context.Context, deviceID string, fw Firmware, timeout time.Duration) (FirmwareReport, error) {
	if timeout <= 0 {
		timeout = 10 * time.Minute
	}
	if _, _, err := h.watsonConn(deviceID); err != nil {
		return FirmwareReport{}, err
	}
	var rep FirmwareReport
	step := func(op string, d any, want int) bool {
		var raw json.RawMessage
		if d != nil {
			raw, _ = json.Marshal(d)
		}
		r, err := h.DMRequest(ctx, deviceID, op, raw, 30*time.Second)
		if err != nil {
			r.Message = err.Error()
		}
		rep.Steps = append(rep.Steps, r)
		if r.RC != want {
			rep.Result = fmt.Sprintf("%s answered rc %d (want %d): %s", op, r.RC, want, r.Message)
			return false
		}
		return true
	}
	observe := map[string]any{"fields": []map[string]string{{"field": "mgmt.firmware"}}}
	value := map[string]any{"version": fw.Version, "name": fw.Name, "uri": fw.URI, "verifier": fw.Verifier, "state": 0, "updateStatus": 0}
	if !step("device/update", map[string]any{"fields": []map[string]any{{"field": "mgmt.firmware", "value": value}}}, 204) ||
		!step("observe", observe, 200) {
		return rep, nil
	}
	_, dev, err := h.watsonConn(deviceID)
	if err != nil {
		return rep, err
	}
	wait := func(done func(fw map[string]any) (bool, string)) bool {
		deadline := time.NewTimer(timeout)
		defer deadline.Stop()
		for {
			h.mu.Lock()
			var fwv map[string]any
			if dev.wat.firmware != nil {
				fwv = copyMap(dev.wat.firmware)
			}
			ch := dev.wat.notified
			h.mu.Unlock()
			if ok, res := done(fwv); ok {
				if res != "" {
					rep.Result = res
					return false
				}
				return true
			}
			select {
			case <-ch:
			case <-deadline.C:
				rep.Result = "the device did not report the outcome in time"
				return false
			case <-ctx.Done():
				rep.Result = ctx.Err().Error()
				return false
			}
		}
	}
	h.mu.Lock()
	dev.wat.firmware = nil
	h.mu.Unlock()
	if !step("mgmt/initiate/firmware/download", nil, 202) {
		return rep, nil
	}
	downloaded := wait(func(fw map[string]any) (bool, string) {
		if fw == nil {
			return false, ""
		}
		switch s, u := num(fw["state"]), num(fw["updateStatus"]); {
		case s == 2:
			return true, ""
		case s == 0 && u > 1:
			return true, fmt.Sprintf("download failed: updateStatus %d", u)
		}
		return false, ""
	})
	step("cancel", observe, 200)
	if !downloaded {
		rep.Firmware = h.firmwareOf(dev)
		return rep, nil
	}
	if !step("observe", observe, 200) {
		rep.Firmware = h.firmwareOf(dev)
		return rep, nil
	}
	h.mu.Lock()
	dev.wat.firmware = nil // before the update: its first notify may come before its 202
	h.mu.Unlock()
	if !step("mgmt/initiate/firmware/update", nil, 202) {
		rep.Firmware = h.firmwareOf(dev)
		return rep, nil
	}
	updated := wait(func(fw map[string]any) (bool, string) {
		if fw == nil {
			return false, ""
		}
		switch s, u := num(fw["state"]), num(fw["updateStatus"]); {
		case s == 0 && u == 0:
			return true, ""
		case u > 1:
			return true, fmt.Sprintf("update failed: updateStatus %d", u)
		}
		return false, ""
	})
	step("cancel", observe, 200)
	rep.Firmware = h.firmwareOf(dev)
	if updated {
		rep.Result = "success"
	}
	return rep, nil
}

func (h *Hub) firmwareOf(d *device) map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	return copyMap(d.wat.firmware)
}

func copyMap(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func num(v any) int {
	f, ok := v.(float64)
	if !ok {
		return -1
	}
	return int(f)
}

// WatsonCommand sends a command to a Watson device (through its gateway
// for a child) at QoS 1.
func (h *Hub) WatsonCommand(deviceID, command, format string, payload []byte) error {
	if err := watson.ValidID("command", command); err != nil {
		return errString(err.Error())
	}
	if format == "" {
		format = "json"
	}
	c, d, err := h.watsonConn(deviceID)
	if err != nil {
		return err
	}
	topic := "iot-2/cmd/" + command + "/fmt/" + format
	if c.gateway {
		topic = "iot-2/type/" + d.wat.dev.Type + "/id/" + d.wat.dev.ID + "/cmd/" + command + "/fmt/" + format
	}
	return h.write(c, topic, payload, 1)
}

// WatsonState is a Watson device's DM state as the platform sees it.
type WatsonState struct {
	Managed    bool              `json:"managed"`
	Lifetime   int               `json:"lifetime"`
	Supports   map[string]any    `json:"supports,omitempty"`
	DeviceInfo json.RawMessage   `json:"deviceInfo,omitempty"`
	Firmware   map[string]any    `json:"mgmt.firmware,omitempty"`
	Location   json.RawMessage   `json:"location,omitempty"`
	ErrorCodes []int             `json:"errorCodes,omitempty"`
	Logs       []json.RawMessage `json:"logs,omitempty"`
}

// Watson returns a Watson device's DM state.
func (h *Hub) Watson(deviceID string) (WatsonState, error) {
	typ, id, _ := strings.Cut(deviceID, ":")
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.devices[watsonKey(watson.Identity{Type: typ, ID: id})]
	if d == nil {
		return WatsonState{}, ErrNoDevice
	}
	w := d.wat
	return WatsonState{Managed: w.managed, Lifetime: w.lifetime, Supports: copyMap(w.supports), DeviceInfo: w.info,
		Firmware: copyMap(w.firmware), Location: w.location, ErrorCodes: append([]int(nil), w.errors...),
		Logs: append([]json.RawMessage(nil), w.logs...)}, nil
}

func (h *Hub) watsonRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/devices/{id}/dm", func(w http.ResponseWriter, r *http.Request) {
		st, err := h.Watson(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, st)
	})
	mux.HandleFunc("POST /api/devices/{id}/dm/{op...}", func(w http.ResponseWriter, r *http.Request) {
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		res, err := h.DMRequest(r.Context(), r.PathValue("id"), r.PathValue("op"), body, 0)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, res)
	})
	mux.HandleFunc("POST /api/devices/{id}/firmware", func(w http.ResponseWriter, r *http.Request) {
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		var fw Firmware
		if err := json.Unmarshal(body, &fw); err != nil || fw.URI == "" {
			writeJSON(w, 400, map[string]string{"error": "want {\"uri\":..., \"verifier\":..., \"version\":...}"})
			return
		}
		timeout, err := durationParam(r, "timeout")
		if err != nil {
			writeJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		var rep FirmwareReport
		if id := r.PathValue("id"); h.isWatson(id) {
			rep, err = h.FirmwareUpdate(r.Context(), id, fw, timeout)
		} else {
			rep, err = h.azureFirmwareUpdate(r.Context(), id, fw, timeout)
		}
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, rep)
	})
}
