package azure

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/dm"
	"github.com/outpost-edge/outpost/runtime/uplink"
)

// MethodFirmwareUpdate is the direct method that starts a firmware update
// on Azure: the host runs the same firmware handlers as Watson's DM, and
// reports the progress in the twin's reported "firmware" property.
const MethodFirmwareUpdate = "firmwareUpdate"

// firmwareParams is the firmwareUpdate method's payload.
type firmwareParams struct {
	URI      string `json:"uri"`
	Version  string `json:"version"`
	Name     string `json:"name"`
	Verifier string `json:"verifier"`
}

// firmwareMethod starts a download then an update, and answers 202 with
// the firmware state at once; 400 for bad parameters, 409 while another
// runs, 501 when firmware actions are off.
func (d *Dialect) firmwareMethod(m *uplink.Inbound, corr []byte) {
	respond := func(st abi.Status, v any) {
		b, _ := json.Marshal(v)
		d.methodResponse(MethodFirmwareUpdate, corr, &sandbox.Response{Status: st, Payload: b, ContentType: "application/json"})
	}
	if d.fw == nil {
		respond(abi.StatusNotImplemented, map[string]string{"error": "firmware actions are not supported"})
		return
	}
	var p firmwareParams
	if err := json.Unmarshal(m.Payload, &p); err != nil {
		respond(abi.StatusBadRequest, map[string]string{"error": "want {\"uri\", \"version\", \"verifier\"}: " + err.Error()})
		return
	}
	if err := dm.CheckURI(p.URI); err != nil {
		respond(abi.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	if _, err := dm.ParseVerifier(p.Verifier); err != nil {
		respond(abi.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	if err := d.fw.SetParams(dm.Params{Version: p.Version, Name: p.Name, URI: p.URI, Verifier: p.Verifier}); err != nil {
		respond(abi.StatusConflict, map[string]string{"error": err.Error()})
		return
	}
	if err := d.fw.StartDownload(); err != nil {
		respond(abi.StatusConflict, map[string]string{"error": err.Error()})
		return
	}
	d.reportFirmware("")
	respond(abi.StatusAccepted, d.fw.Get().Firmware)
	d.fwRun.Download(d.afterDownload)
}

// afterDownload goes on to the update once the image is staged.
func (d *Dialect) afterDownload(ok bool) {
	if !ok {
		return
	}
	if err := d.fw.StartUpdate(); err != nil {
		d.log.Error("firmware update not started", "error", err)
		return
	}
	d.reportFirmware("")
	d.fwRun.Update(nil)
}

// reportFirmware queues the firmware state (and a progress message) as the
// twin's reported "firmware".
func (d *Dialect) reportFirmware(progress string) {
	if d.o.Twin == nil || d.fw == nil {
		return
	}
	rec := d.fw.Get()
	v := map[string]any{"version": rec.Version, "uri": rec.URI, "state": rec.State, "updateStatus": rec.UpdateStatus,
		"installed": rec.Installed, "updatedDateTime": rec.UpdatedDateTime}
	if progress != "" {
		v["progress"] = progress
	} else if rec.State == 0 {
		v["progress"] = nil // idle: a patch's null removes the last step's
	}
	b, _ := json.Marshal(map[string]any{"firmware": v})
	if _, err := d.o.Twin.Report(b); err != nil {
		d.log.Warn("firmware state not reported in the twin", "error", err)
	}
}

// OnProgress reports a firmware handler's progress in the twin.
func (d *Dialect) OnProgress(req abi.Meta, percent int, msg string) {
	if req.Kind != abi.KindDMAction || !strings.HasPrefix(req.Name, "firmware.") {
		return
	}
	d.reportFirmware(fmt.Sprintf("%d%% %s", percent, msg))
}

// newFirmware sets up the firmware machine and its runner.
func (d *Dialect) newFirmware() error {
	if d.o.State == nil {
		return nil
	}
	fw, err := dm.Open(d.o.State, "fw/azure/"+d.ClientID())
	if err != nil {
		return err
	}
	if err := fw.SetInstalled(d.o.Running); err != nil {
		return err
	}
	d.fw = fw
	d.fwRun = &dm.Runner{Machine: fw, Blob: "firmware-azure", Ctx: d.ctx, Actions: d.o.Actions, Running: d.o.Running,
		Log:     d.log.With("component", "firmware"),
		Changed: func() { d.reportFirmware("") },
		Call: func(name string, payload []byte, done func(dm.Result)) {
			meta := abi.Meta{Kind: abi.KindDMAction, Name: name, Flags: abi.FlagResponseExpected, Deadline: d.o.ActionTimeout,
				ContentType: "application/json", Props: []abi.Property{{Key: "device-id", Value: d.o.DeviceID}}}
			if !d.hold() {
				done(dm.Result{Status: abi.StatusUnavailable, Body: []byte("the agent is stopping")})
				return
			}
			d.o.Server.Serve(dispatch.Call{Meta: meta, Payload: payload}, func(r *sandbox.Response) {
				defer d.wg.Done()
				done(dm.Result{Status: r.Status, Props: r.Props, Body: r.Payload, Err: r.Err})
			})
		}}
	return nil
}
