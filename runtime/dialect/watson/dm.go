package watson

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/dm"
	"github.com/outpost-edge/outpost/runtime/uplink"
)

// managed is one managed identity: the device (or gateway) itself, or a
// child device of the gateway.
type managed struct {
	dev      Identity // type and id
	topicDev Identity // zero: the device-form topics
	fw       *dm.Machine
	run      *dm.Runner

	mu          sync.Mutex
	unmanaged   bool // the device asked to be unmanaged: no manage until the next connection
	manageTimer *time.Timer
	observing   map[string]bool
	notifies    []pendingNotify            // waiting their turn, in order
	notifying   bool                       // a goroutine sends them
	attrs       map[string]json.RawMessage // location, metadata, deviceInfo set by the platform
}

func (d *Dialect) newManaged(dev, topicDev Identity) (*managed, error) {
	fw, err := dm.Open(d.o.State, "fw/"+dev.String())
	if err != nil {
		return nil, err
	}
	mg := &managed{dev: dev, topicDev: topicDev, fw: fw, observing: map[string]bool{}, attrs: map[string]json.RawMessage{}}
	mg.run = &dm.Runner{Machine: fw, Blob: fmt.Sprintf("firmware-%d-%s-%s", len(dev.Type), dev.Type, dev.ID), Ctx: d.ctx,
		Log:     d.log.With("device", dev.String()),
		Changed: func() { d.notify(mg, "mgmt.firmware") },
		Call: func(name string, payload []byte, done func(dm.Result)) {
			d.call(mg, name, payload, func(r *sandbox.Response) {
				done(dm.Result{Status: r.Status, Props: r.Props, Body: r.Payload, Err: r.Err})
			})
		}}
	if b, err := d.o.State.Get("observe/" + dev.String()); err == nil {
		_ = json.Unmarshal(b, &mg.observing)
	}
	if b, err := d.o.State.Get("attrs/" + dev.String()); err == nil {
		_ = json.Unmarshal(b, &mg.attrs)
	}
	return mg, nil
}

// managedFor returns the managed identity of a DM topic's device.
func (d *Dialect) managedFor(dev Identity) *managed {
	if dev == (Identity{}) || dev == d.self.dev {
		if d.o.Gateway && dev == (Identity{}) {
			return nil // a gateway's DM uses the typed topics
		}
		return d.self
	}
	return d.children[dev]
}

// request is a DM request from the platform.
type request struct {
	D     json.RawMessage `json:"d"`
	ReqID json.RawMessage `json:"reqId"`
}

// dmResponse is a DM response, either way.
type dmResponse struct {
	RC      int             `json:"rc"`
	Message string          `json:"message,omitempty"`
	D       any             `json:"d,omitempty"`
	ReqID   json.RawMessage `json:"reqId"`
}

// field is one entry of a "fields" list.
type field struct {
	Field string          `json:"field"`
	Value json.RawMessage `json:"value,omitempty"`
}

// parseFields reads the fields of a request's d in any of the shapes the
// sources use: {"fields":[{"field":..,"value":..}]}, {"fields":["name"]},
// {"field":..,"value":..}, and {"data":[...]} (PROTOCOLS.md 2.3, 5).
func parseFields(d json.RawMessage) ([]field, error) {
	if len(d) == 0 || string(d) == "null" {
		return nil, errors.New("no d")
	}
	var obj struct {
		Fields json.RawMessage `json:"fields"`
		Data   json.RawMessage `json:"data"`
		Field  *string         `json:"field"`
		Value  json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(d, &obj); err != nil {
		return nil, fmt.Errorf("d is not an object: %v", err)
	}
	if obj.Field != nil {
		if *obj.Field == "" {
			return nil, errors.New("a field without a name")
		}
		return []field{{Field: *obj.Field, Value: obj.Value}}, nil
	}
	list := obj.Fields
	if len(list) == 0 {
		list = obj.Data
	}
	if len(list) == 0 {
		return nil, errors.New("d has no fields")
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(list, &raw); err != nil {
		return nil, errors.New("fields is not a list")
	}
	if len(raw) == 0 {
		return nil, errors.New("fields is empty")
	}
	out := make([]field, 0, len(raw))
	for _, r := range raw {
		var name string
		if json.Unmarshal(r, &name) == nil {
			if name == "" {
				return nil, errors.New("a field without a name")
			}
			out = append(out, field{Field: name})
			continue
		}
		var f field
		if err := json.Unmarshal(r, &f); err != nil || f.Field == "" {
			return nil, fmt.Errorf("a field is neither a name nor {\"field\": name}: %s", r)
		}
		out = append(out, f)
	}
	return out, nil
}

// reply answers a platform request on the device's response topic. No
// reqId, no answer.
func (d *Dialect) reply(mg Identity, reqID json.RawMessage, rc int, msg string, data any) {
	if len(reqID) == 0 || string(reqID) == "null" {
		return
	}
	if err := d.send(dmDeviceTopic(mg, opResponse), dmResponse{RC: rc, Message: msg, D: data, ReqID: reqID}); err != nil {
		d.log.Warn("DM response not sent", "rc", rc, "error", err)
	}
}

// serveDM serves a DM message on topic with payload.
func (d *Dialect) serveDM(topic string, payload []byte) {
	t, err := ParseDMTopic(topic)
	if err != nil {
		d.log.Warn("malformed DM topic: dropped", "topic", topic, "error", err)
		return
	}
	var req request
	if err := json.Unmarshal(payload, &req); err != nil {
		// Without a readable reqId there is no one to answer.
		d.log.Warn("DM message that is not a JSON object: dropped", "topic", topic, "error", err)
		return
	}
	replyTo := t.Device
	if t.Op == opResponse {
		d.deviceResponse(payload)
		return
	}
	if len(req.ReqID) > 0 && req.ReqID[0] != '"' && string(req.ReqID) != "null" {
		d.reply(replyTo, req.ReqID, 400, "reqId must be a string", nil)
		return
	}
	mg := d.managedFor(t.Device)
	if mg == nil {
		d.reply(replyTo, req.ReqID, 404, "no such managed device behind this gateway", nil)
		return
	}
	replyTo = mg.topicDev
	rc, msg, data, after := d.operation(mg, t.Op, req)
	if rc == 0 {
		return // the operation answers itself
	}
	d.reply(replyTo, req.ReqID, rc, msg, data)
	if after != nil {
		after()
	}
}

// operation serves one DM operation. It returns the reply (rc 0: the
// operation replies itself) and what to do once the reply is out.
func (d *Dialect) operation(mg *managed, op string, req request) (rc int, msg string, data any, after func()) {
	switch op {
	case opObserve:
		return d.observe(mg, req)
	case opCancel:
		return d.cancelObserve(mg, req)
	case opDeviceUpdate:
		return d.deviceUpdate(mg, req)
	case opReboot, opFactoryReset:
		return d.deviceAction(mg, op, req)
	case opFwDownload:
		return d.firmwareDownload(mg, req)
	case opFwUpdate:
		return d.firmwareUpdate(mg, req)
	}
	if bundle, action, ok := ParseCustomOp(op); ok {
		return d.custom(mg, bundle, action, req)
	}
	return 501, fmt.Sprintf("operation %q is not supported", op), nil, nil
}

// managedFields are the fields a device can be asked to observe.
var managedFields = map[string]bool{"mgmt.firmware": true, "deviceInfo": true, "metadata": true, "location": true}

func (d *Dialect) fieldValue(mg *managed, name string) (json.RawMessage, bool) {
	switch name {
	case "mgmt.firmware":
		b, _ := json.Marshal(mg.fw.Get().Firmware)
		return b, true
	case "deviceInfo":
		info := map[string]any{}
		if mg == d.self {
			for k, v := range d.o.DeviceInfo {
				info[k] = v
			}
		}
		mg.mu.Lock()
		if raw, ok := mg.attrs["deviceInfo"]; ok {
			_ = json.Unmarshal(raw, &info)
		}
		mg.mu.Unlock()
		if v := mg.fw.Get().Installed; v != "" {
			info["fwVersion"] = v
		}
		b, _ := json.Marshal(info)
		return b, true
	case "metadata", "location":
		mg.mu.Lock()
		defer mg.mu.Unlock()
		if raw, ok := mg.attrs[name]; ok {
			return raw, true
		}
		if name == "metadata" {
			b, _ := json.Marshal(d.o.Metadata)
			if d.o.Metadata == nil {
				b = []byte("{}")
			}
			return b, true
		}
		return nil, false
	}
	return nil, false
}

// observe starts notifications of the fields and answers their values.
func (d *Dialect) observe(mg *managed, req request) (int, string, any, func()) {
	fields, err := parseFields(req.D)
	if err != nil {
		return 400, "observe: " + err.Error(), nil, nil
	}
	var out []field
	rc, missing := 200, []string(nil)
	for _, f := range fields {
		v, ok := d.fieldValue(mg, f.Field)
		if !ok || !managedFields[f.Field] {
			rc = 404
			missing = append(missing, f.Field)
			out = append(out, field{Field: f.Field})
			continue
		}
		out = append(out, field{Field: f.Field, Value: v})
	}
	msg := ""
	if rc != 200 {
		msg = "cannot observe " + strings.Join(missing, ", ")
	} else {
		mg.mu.Lock()
		for _, f := range fields {
			mg.observing[f.Field] = true
		}
		d.saveObserving(mg)
		mg.mu.Unlock()
	}
	return rc, msg, map[string]any{"fields": out}, nil
}

// cancelObserve stops notifications of the fields.
func (d *Dialect) cancelObserve(mg *managed, req request) (int, string, any, func()) {
	fields, err := parseFields(req.D)
	if err != nil {
		return 400, "cancel: " + err.Error(), nil, nil
	}
	mg.mu.Lock()
	for _, f := range fields {
		delete(mg.observing, f.Field)
	}
	d.saveObserving(mg)
	mg.mu.Unlock()
	return 200, "", nil, nil
}

// saveObserving persists the observed fields. mg.mu must be held.
func (d *Dialect) saveObserving(mg *managed) {
	b, _ := json.Marshal(mg.observing)
	if err := d.o.State.Put("observe/"+mg.dev.String(), b, 0); err != nil {
		d.log.Warn("observed fields not stored", "error", err)
	}
}

// notify sends the value of a field if the platform observes it. The
// value is taken now, and the notifies of one device go out one at a time
// in the order they were taken, each waiting for the platform's answer, so
// the platform's last value is the device's.
func (d *Dialect) notify(mg *managed, name string) {
	mg.mu.Lock()
	on := mg.observing[name]
	mg.mu.Unlock()
	if !on {
		return
	}
	v, _ := d.fieldValue(mg, name)
	body := map[string]any{"d": map[string]any{"fields": []field{{Field: name, Value: v}}}}
	mg.mu.Lock()
	mg.notifies = append(mg.notifies, pendingNotify{field: name, body: body})
	start := !mg.notifying
	mg.notifying = true
	mg.mu.Unlock()
	if start && !d.spawn(func() { d.sendNotifies(mg) }) {
		mg.mu.Lock()
		mg.notifying, mg.notifies = false, nil
		mg.mu.Unlock()
	}
}

// pendingNotify is a notify waiting its turn.
type pendingNotify struct {
	field string
	body  map[string]any
}

// sendNotifies sends mg's queued notifies in order, until none is left.
func (d *Dialect) sendNotifies(mg *managed) {
	for {
		mg.mu.Lock()
		if len(mg.notifies) == 0 || d.ctx.Err() != nil {
			mg.notifying, mg.notifies = false, nil
			mg.mu.Unlock()
			return
		}
		n := mg.notifies[0]
		mg.notifies = mg.notifies[1:]
		mg.mu.Unlock()
		resp, err := d.deviceRequest(mg, opNotify, n.body)
		switch {
		case err != nil:
			d.log.Warn("notify not acknowledged", "device", mg.dev.String(), "field", n.field, "error", err)
		case resp.RC != 200:
			d.log.Warn("platform refused a notify", "device", mg.dev.String(), "field", n.field, "rc", resp.RC, "message", resp.Message)
		}
	}
}

// deviceUpdate stores attribute updates (location, metadata, deviceInfo,
// mgmt.firmware). 204 when all applied; 404 lists those that were not.
func (d *Dialect) deviceUpdate(mg *managed, req request) (int, string, any, func()) {
	fields, err := parseFields(req.D)
	if err != nil {
		return 400, "device/update: " + err.Error(), nil, nil
	}
	var failed []string
	var reasons []string
	for _, f := range fields {
		switch f.Field {
		case "mgmt.firmware":
			var p dm.Params
			if err := json.Unmarshal(f.Value, &p); err != nil {
				failed, reasons = append(failed, f.Field), append(reasons, "mgmt.firmware: "+err.Error())
				continue
			}
			if !d.o.FirmwareActions {
				failed, reasons = append(failed, f.Field), append(reasons, "firmware actions are not supported")
				continue
			}
			if _, err := dm.ParseVerifier(p.Verifier); err != nil {
				failed, reasons = append(failed, f.Field), append(reasons, err.Error())
				continue
			}
			if err := mg.fw.SetParams(p); err != nil {
				failed, reasons = append(failed, f.Field), append(reasons, err.Error())
				continue
			}
		case "location", "metadata", "deviceInfo":
			var obj map[string]any
			if err := json.Unmarshal(f.Value, &obj); err != nil || obj == nil {
				failed, reasons = append(failed, f.Field), append(reasons, f.Field+" is not an object")
				continue
			}
			mg.mu.Lock()
			mg.attrs[f.Field] = f.Value
			b, _ := json.Marshal(mg.attrs)
			mg.mu.Unlock()
			if err := d.o.State.Put("attrs/"+mg.dev.String(), b, 0); err != nil {
				failed, reasons = append(failed, f.Field), append(reasons, err.Error())
			}
		default:
			failed, reasons = append(failed, f.Field), append(reasons, "unknown field "+f.Field)
		}
	}
	if len(failed) > 0 {
		return 404, strings.Join(reasons, "; "), map[string]any{"fields": failed}, nil
	}
	return 204, "", nil, func() {
		for _, f := range fields {
			if f.Field != "mgmt.firmware" { // the transition table: parameters stored, no notify
				d.notify(mg, f.Field)
			}
		}
	}
}

// call runs a DM handler and passes its response to done.
func (d *Dialect) call(mg *managed, name string, payload []byte, done func(*sandbox.Response)) {
	props := []abi.Property{{Key: "device-type", Value: mg.dev.Type}, {Key: "device-id", Value: mg.dev.ID}}
	meta := abi.Meta{Kind: abi.KindDMAction, Name: name, Flags: abi.FlagResponseExpected, Deadline: d.o.ActionTimeout,
		ContentType: "application/json", Props: props}
	if !d.hold() {
		done(&sandbox.Response{Status: abi.StatusUnavailable, Payload: []byte("the agent is stopping")})
		return
	}
	d.o.Server.Serve(dispatch.Call{Meta: meta, Payload: payload}, func(r *sandbox.Response) {
		defer d.wg.Done()
		done(r)
	})
}

// deviceAction serves reboot and factory reset: the handler (device.reboot
// or device.factory_reset) decides; on its 2xx the reply is 202, then the
// operator's command runs. The action is complete when the device manages
// again after it.
func (d *Dialect) deviceAction(mg *managed, op string, req request) (int, string, any, func()) {
	name, action := ActionReboot, "reboot"
	if op == opFactoryReset {
		name, action = ActionFactoryReset, "factory_reset"
	}
	if !d.o.DeviceActions {
		return 501, action + " is not supported", nil, nil
	}
	if mg == d.self && (d.o.Actions == nil || !d.o.Actions.Has(action)) {
		// Agreed and never done, the action would never complete: the
		// host carries it out, and has no command for it.
		return 501, "no " + action + " command is configured on this device (dm." + action + "_command)", nil, nil
	}
	d.call(mg, name, req.D, func(r *sandbox.Response) {
		rc, msg := rcOf(r)
		if rc != 202 {
			d.reply(mg.topicDev, req.ReqID, rc, msg, nil)
			return
		}
		d.reply(mg.topicDev, req.ReqID, 202, "", nil)
		if d.o.Actions == nil || !d.o.Actions.Has(action) || mg != d.self {
			return // the handler does it (a child device is reached through it)
		}
		d.log.Warn("running the operator's command", "action", action)
		ctx, cancel := context.WithTimeout(d.ctx, 5*time.Minute)
		defer cancel()
		if err := d.o.Actions.Run(ctx, action, nil); err != nil {
			d.log.Error("the operator's command failed", "action", action, "error", err)
		}
	})
	return 0, "", nil, nil
}

// rcOf maps a handler's response to a DM reply: 2xx is 202 (started),
// 501 (no handler, or the handler does not do it) stays 501, a 4xx is a
// 400, anything else a 500; the handler's payload is the message.
func rcOf(r *sandbox.Response) (int, string) {
	msg := string(r.Payload)
	if len(msg) > 512 {
		msg = msg[:512]
	}
	switch st := r.Status; {
	case st >= 200 && st < 300:
		return 202, msg
	case st == abi.StatusNotImplemented:
		return 501, msg
	case st >= 400 && st < 500 && st != abi.StatusTooManyRequests:
		return 400, msg
	}
	return 500, msg
}

// custom serves a custom action: the handler custom:BUNDLE:ACTION, with
// the request's parameters as its payload; rc 200 once it is done.
func (d *Dialect) custom(mg *managed, bundle, action string, req request) (int, string, any, func()) {
	served := false
	for _, b := range d.o.Bundles {
		served = served || b == bundle
	}
	for _, b := range d.o.SelfBundles {
		served = served || (b == bundle && mg == d.self)
	}
	if !served {
		return 501, fmt.Sprintf("bundle %q is not supported", bundle), nil, nil
	}
	if len(req.D) > 0 && string(req.D) != "null" {
		if _, err := parseFields(req.D); err != nil {
			return 400, "custom action: " + err.Error(), nil, nil
		}
	}
	d.call(mg, CustomAction(bundle, action), req.D, func(r *sandbox.Response) {
		rc, msg := rcOf(r)
		switch {
		case rc == 202:
			rc = 200
		case r.Status == abi.StatusNotFound || r.Status == abi.StatusConflict:
			rc = int(r.Status) // both DM codes (PROTOCOLS.md 2.1); 409 may be retried
		}
		d.reply(mg.topicDev, req.ReqID, rc, msg, nil)
	})
	return 0, "", nil, nil
}

// firmwareDownload starts a download: (0,*) to (1,*), replied 202, then
// the firmware.download handler fetches, verifies and stages the image.
func (d *Dialect) firmwareDownload(mg *managed, _ request) (int, string, any, func()) {
	if !d.o.FirmwareActions {
		return 501, "firmware actions are not supported", nil, nil
	}
	if err := mg.fw.StartDownload(); err != nil {
		return dmErr(err)
	}
	return 202, "", nil, func() {
		d.notify(mg, "mgmt.firmware")
		mg.run.Download(nil)
	}
}

// firmwareUpdate starts an install: (2,*) to (2,1), replied 202, then the
// firmware.update handler checks the image and the operator's install
// command (if any) installs it.
func (d *Dialect) firmwareUpdate(mg *managed, _ request) (int, string, any, func()) {
	if !d.o.FirmwareActions {
		return 501, "firmware actions are not supported", nil, nil
	}
	if err := mg.fw.StartUpdate(); err != nil {
		return dmErr(err)
	}
	return 202, "", nil, func() {
		d.notify(mg, "mgmt.firmware")
		mg.run.Update(func(bool) { d.notify(mg, "deviceInfo") })
	}
}

func dmErr(err error) (int, string, any, func()) {
	var e *dm.Error
	if errors.As(err, &e) {
		return e.RC, e.Msg, nil, nil
	}
	return 500, err.Error(), nil, nil
}

// deviceRequest sends a device-to-platform DM request and waits for the
// platform's response (iotdm-1/response, by reqId).
func (d *Dialect) deviceRequest(mg *managed, op string, body map[string]any) (dmResponse, error) {
	d.reqMu.Lock()
	d.reqSeq++
	id := d.reqBase + "-" + strconv.FormatUint(d.reqSeq, 10)
	ch := make(chan dmResponse, 1)
	d.pending[id] = ch
	d.reqMu.Unlock()
	defer func() {
		d.reqMu.Lock()
		delete(d.pending, id)
		d.reqMu.Unlock()
	}()
	if body == nil {
		body = map[string]any{}
	}
	body["reqId"] = id
	if err := d.send(dmDeviceTopic(mg.topicDev, op), body); err != nil {
		return dmResponse{}, err
	}
	t := time.NewTimer(d.o.RequestTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r, nil
	case <-t.C:
		return dmResponse{}, fmt.Errorf("watson: %s: no response within %s", op, d.o.RequestTimeout)
	case <-d.ctx.Done():
		return dmResponse{}, d.ctx.Err()
	}
}

// deviceResponse hands the platform's response to the request waiting.
func (d *Dialect) deviceResponse(payload []byte) {
	var r dmResponse
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&r); err != nil {
		d.log.Warn("DM response that is not {rc, reqId}: dropped", "payload", string(payload), "error", err)
		return
	}
	var id string
	if json.Unmarshal(r.ReqID, &id) != nil {
		d.log.Warn("DM response without a string reqId: dropped", "payload", string(payload))
		return
	}
	d.reqMu.Lock()
	ch := d.pending[id]
	d.reqMu.Unlock()
	if ch == nil {
		d.log.Debug("DM response for no request waiting", "req_id", id)
		return
	}
	select {
	case ch <- r:
	default:
	}
}

// manage sends the manage request (retried until the platform answers),
// then again two minutes before the lifetime ends.
func (d *Dialect) manage(mg *managed) {
	body := d.manageBody(mg)
	delay := time.Second
	for d.ctx.Err() == nil {
		d.mu.Lock()
		up := d.up
		d.mu.Unlock()
		mg.mu.Lock()
		unmanaged := mg.unmanaged
		mg.mu.Unlock()
		if !up || unmanaged {
			return // the next connection manages again
		}
		resp, err := d.deviceRequest(mg, opManage, body)
		switch {
		case err == nil && resp.RC == 200:
			mg.mu.Lock()
			if mg.manageTimer != nil {
				mg.manageTimer.Stop()
			}
			if d.o.Lifetime > 0 && d.ctx.Err() == nil {
				mg.manageTimer = time.AfterFunc(d.o.Lifetime-d.renewBefore, func() {
					d.spawn(func() { d.manage(mg) })
				})
			}
			mg.mu.Unlock()
			d.log.Info("managed", "device", mg.dev.String(), "lifetime", d.o.Lifetime)
			// What the platform observes may have changed meanwhile.
			d.notify(mg, "mgmt.firmware")
			return
		case err == nil && (resp.RC == 400 || resp.RC == 404):
			d.log.Error("platform refused the manage request", "device", mg.dev.String(), "rc", resp.RC, "message", resp.Message)
			return
		case err == nil:
			d.log.Warn("manage request failed; retrying", "device", mg.dev.String(), "rc", resp.RC, "message", resp.Message, "in", delay)
		default:
			d.log.Warn("manage request not answered; retrying", "device", mg.dev.String(), "error", err, "in", delay)
		}
		select {
		case <-time.After(delay):
		case <-d.ctx.Done():
			return
		}
		delay = min(delay*2, 2*time.Minute)
	}
}

// ErrNotManaged is returned by a local DM operation on a device whose
// dialect does not manage it.
var ErrNotManaged = errors.New("watson: device management is off (uplink.watson.manage)")

// Local serves a device-initiated DM operation a local client asks for
// (outpost/dm/OP, payload JSON): location, error-code, clear-error-codes,
// log, clear-logs, manage, unmanage. It returns an HTTP-like status and a
// message.
func (d *Dialect) Local(op string, payload []byte) (int, string) {
	if !d.o.Manage {
		return 501, ErrNotManaged.Error()
	}
	var err error
	switch op {
	case "location":
		var loc Location
		if err := json.Unmarshal(payload, &loc); err != nil {
			return 400, "want {\"latitude\", \"longitude\", \"elevation\", \"accuracy\", \"measuredDateTime\"}: " + err.Error()
		}
		err = d.UpdateLocation(loc)
	case "error-code":
		var e struct {
			ErrorCode *int `json:"errorCode"`
		}
		if json.Unmarshal(payload, &e) != nil || e.ErrorCode == nil {
			return 400, `want {"errorCode": N}`
		}
		err = d.AddErrorCode(*e.ErrorCode)
	case "clear-error-codes":
		err = d.ClearErrorCodes()
	case "log":
		var l Log
		if err := json.Unmarshal(payload, &l); err != nil || l.Message == "" {
			return 400, `want {"message", "severity" (0 info, 1 warning, 2 error), "data" (base64), "timestamp"}`
		}
		err = d.AddLog(l)
	case "clear-logs":
		err = d.ClearLogs()
	case "manage":
		d.self.mu.Lock()
		d.self.unmanaged = false
		d.self.mu.Unlock()
		resp, rerr := d.deviceRequest(d.self, opManage, d.manageBody(d.self))
		switch {
		case rerr != nil:
			err = rerr
		case resp.RC != 200:
			return 502, fmt.Sprintf("the platform answered rc %d: %s", resp.RC, resp.Message)
		}
	case "unmanage":
		err = d.Unmanage(d.ctx, Identity{})
	default:
		return 404, fmt.Sprintf("%q: want location, error-code, clear-error-codes, log, clear-logs, manage or unmanage", op)
	}
	switch {
	case err == nil:
		return 200, "done"
	case errors.Is(err, uplink.ErrLost):
		return 503, "the platform is out of reach: " + err.Error()
	case strings.Contains(err.Error(), "out of range"), strings.Contains(err.Error(), "severity"):
		return 400, err.Error()
	}
	return 502, err.Error()
}

// State is the device's DM attributes as JSON: deviceInfo, metadata,
// location (when set) and mgmt.firmware.
func (d *Dialect) State() []byte {
	out := map[string]json.RawMessage{}
	for _, f := range []string{"deviceInfo", "metadata", "location", "mgmt.firmware"} {
		if v, ok := d.fieldValue(d.self, f); ok {
			out[f] = v
		}
	}
	b, _ := json.Marshal(out)
	return b
}

// manageBody is the manage request of mg.
func (d *Dialect) manageBody(mg *managed) map[string]any {
	supports := map[string]any{"deviceActions": d.o.DeviceActions, "firmwareActions": d.o.FirmwareActions}
	for _, b := range d.o.Bundles {
		supports[b] = true
	}
	if mg == d.self {
		for _, b := range d.o.SelfBundles {
			supports[b] = true
		}
	}
	info, _ := d.fieldValue(mg, "deviceInfo")
	body := map[string]any{"d": map[string]any{"lifetime": int(d.o.Lifetime / time.Second), "supports": supports,
		"deviceInfo": json.RawMessage(info)}}
	if d.o.Metadata != nil && mg == d.self {
		body["d"].(map[string]any)["metadata"] = d.o.Metadata
	}
	return body
}

// Unmanage tells the platform to stop sending DM requests for the device
// (or a child).
func (d *Dialect) Unmanage(ctx context.Context, dev Identity) error {
	mg := d.self
	if dev != (Identity{}) && dev != d.self.dev {
		if mg = d.children[dev]; mg == nil {
			return fmt.Errorf("watson: %s is not a managed child device", dev)
		}
	}
	mg.mu.Lock()
	mg.unmanaged = true // a manage loop in progress stops
	if mg.manageTimer != nil {
		mg.manageTimer.Stop()
	}
	mg.mu.Unlock()
	resp, err := d.deviceRequest(mg, opUnmanage, nil)
	if err != nil {
		return err
	}
	if resp.RC != 200 {
		return fmt.Errorf("watson: unmanage: rc %d %s", resp.RC, resp.Message)
	}
	return nil
}

// Location is a device-initiated location update.
type Location struct {
	Latitude         float64    `json:"latitude"`
	Longitude        float64    `json:"longitude"`
	Elevation        *float64   `json:"elevation,omitempty"`
	Accuracy         *float64   `json:"accuracy,omitempty"`
	MeasuredDateTime *time.Time `json:"measuredDateTime,omitempty"`
}

// UpdateLocation sends the device's location (a complete set: omitted
// optional fields are deleted on the platform).
func (d *Dialect) UpdateLocation(loc Location) error {
	if loc.Latitude < -90 || loc.Latitude > 90 || loc.Longitude < -180 || loc.Longitude > 180 {
		return fmt.Errorf("watson: location %v,%v is out of range", loc.Latitude, loc.Longitude)
	}
	return d.simple(opLocation, map[string]any{"d": loc})
}

// AddErrorCode, ClearErrorCodes, AddLog and ClearLogs send diagnostics.
func (d *Dialect) AddErrorCode(code int) error {
	return d.simple(opAddErrorCode, map[string]any{"d": map[string]any{"errorCode": code}})
}

// ClearErrorCodes clears the device's error codes on the platform.
func (d *Dialect) ClearErrorCodes() error { return d.simple(opClearErrorCode, nil) }

// Log is a diagnostic log entry; Severity 0 info, 1 warning, 2 error.
type Log struct {
	Message   string    `json:"message"`
	Timestamp time.Time `json:"timestamp"`
	Data      string    `json:"data,omitempty"` // base64
	Severity  int       `json:"severity"`
}

// AddLog adds a diagnostic log entry.
func (d *Dialect) AddLog(l Log) error {
	if l.Severity < 0 || l.Severity > 2 {
		return fmt.Errorf("watson: log severity %d: want 0, 1 or 2", l.Severity)
	}
	if l.Timestamp.IsZero() {
		l.Timestamp = time.Now().UTC()
	}
	return d.simple(opAddLog, map[string]any{"d": l})
}

// ClearLogs clears the device's diagnostic log on the platform.
func (d *Dialect) ClearLogs() error { return d.simple(opClearLog, nil) }

func (d *Dialect) simple(op string, body map[string]any) error {
	resp, err := d.deviceRequest(d.self, op, body)
	if err != nil {
		return err
	}
	if resp.RC != 200 {
		return fmt.Errorf("watson: %s: rc %d %s", op, resp.RC, resp.Message)
	}
	return nil
}
