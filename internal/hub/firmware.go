package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"time"

	"github.com/outpost-edge/outpost/runtime/dialect/azure"
)

// azureFirmwareUpdate runs a firmware update on an Azure device: the
// firmwareUpdate direct method, then the twin's reported "firmware" is
// watched until the update ends (installed at fw.Version, or an
// updateStatus above 1), at most timeout (default 10 minutes).
func (h *Hub) azureFirmwareUpdate(ctx context.Context, deviceID string, fw Firmware, timeout time.Duration) (FirmwareReport, error) {
	if timeout <= 0 {
		timeout = 10 * time.Minute
	}
	before := h.reportedFirmware(deviceID)
	params, _ := json.Marshal(fw)
	res, err := h.Invoke(ctx, deviceID, azure.MethodFirmwareUpdate, params, 30*time.Second)
	if err != nil {
		return FirmwareReport{}, err
	}
	rep := FirmwareReport{Steps: []DMResult{{Op: azure.MethodFirmwareUpdate, RC: res.Status, D: json.RawMessage(nonEmpty(res.Payload))}}}
	if res.Status != 202 {
		rep.Result = fmt.Sprintf("%s answered %d: %s", azure.MethodFirmwareUpdate, res.Status, res.Payload)
		return rep, nil
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		cur := h.reportedFirmware(deviceID)
		rep.Firmware = cur
		if cur != nil && !reflect.DeepEqual(cur, before) {
			state, status := num(cur["state"]), num(cur["updateStatus"])
			switch {
			case status > 1:
				rep.Result = fmt.Sprintf("update failed: updateStatus %d", status)
				return rep, nil
			case state == 0 && status == 0 && cur["installed"] == fw.Version:
				rep.Result = "success"
				return rep, nil
			}
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			rep.Result = "the device did not report the outcome in time"
			return rep, nil
		case <-ctx.Done():
			rep.Result = ctx.Err().Error()
			return rep, nil
		case <-h.ctx.Done():
			return rep, ErrClosed
		}
	}
}

// reportedFirmware is a copy of an Azure device's reported "firmware", or
// nil.
func (h *Hub) reportedFirmware(deviceID string) map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.devices["azure/"+deviceID]
	if d == nil {
		return nil
	}
	fw, _ := d.reported["firmware"].(map[string]any)
	if fw == nil {
		return nil
	}
	return copyMap(fw)
}

func nonEmpty(s string) string {
	if s == "" || !json.Valid([]byte(s)) {
		b, _ := json.Marshal(s)
		return string(b)
	}
	return s
}
