// Device is Outpost's first-party device handler (kind dm_action): it
// agrees to a reboot or a factory reset, which the host then carries out
// with the operator's command, unless the operator has locked the device;
// and it answers a diagnostics method.
//
// Its config:
//
//	allow_reboot: true
//	allow_factory_reset: false   # off unless the operator turns it on
//
// A local client can lock the device for maintenance by calling the
// method "device.lock" with payload "on" (or "off"); the lock is kept in
// the plugin's key/value store, across restarts.
//
// Build: GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o build/module.wasm .
package main

import (
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/abi/guest"
)

var cfg = struct {
	AllowReboot       bool `json:"allow_reboot"`
	AllowFactoryReset bool `json:"allow_factory_reset"`
}{AllowReboot: true}

func locked() bool {
	v, err := guest.KVGet("lock")
	return err == nil && string(v) == "on"
}

// record keeps when an action was last agreed, for diagnostics.
func record(action string) {
	_ = guest.KVSet("last/"+action, []byte(time.Now().UTC().Format(time.RFC3339)))
}

// agree answers a reboot or factory reset: 202 (the host then runs the
// operator's command) unless the configuration forbids it (501) or the
// device is locked (409).
func agree(action string, allowed bool, doing string) guest.Response {
	switch {
	case !allowed:
		return guest.Text(501, strings.ReplaceAll(action, "_", " ")+" is not allowed on this device")
	case locked():
		return guest.Text(409, "the device is locked for maintenance")
	}
	record(action)
	return guest.Text(202, doing)
}

func init() {
	guest.OnInit(func(c []byte) error {
		if len(c) == 0 {
			return nil
		}
		return json.Unmarshal(c, &cfg)
	})
	guest.DMAction("device.reboot", func(*guest.Request) guest.Response {
		return agree("reboot", cfg.AllowReboot, "rebooting")
	})
	guest.DMAction("device.factory_reset", func(*guest.Request) guest.Response {
		return agree("factory_reset", cfg.AllowFactoryReset, "resetting")
	})
	guest.Method("device.lock", func(r *guest.Request) guest.Response {
		v := string(r.Payload())
		if v != "on" && v != "off" {
			return guest.Error(400, errors.New(`want "on" or "off"`))
		}
		if err := guest.KVSet("lock", []byte(v)); err != nil {
			return guest.Error(500, err)
		}
		return guest.Text(200, "lock "+v)
	})
	guest.Method("device.diagnostics", func(r *guest.Request) guest.Response {
		d := map[string]any{"locked": locked(), "allow_reboot": cfg.AllowReboot, "allow_factory_reset": cfg.AllowFactoryReset}
		for _, a := range []string{"reboot", "factory_reset"} {
			if v, err := guest.KVGet("last/" + a); err == nil {
				d["last_"+a] = string(v)
			} else if !errors.Is(err, abi.ErrNotFound) {
				return guest.Error(500, err)
			}
		}
		return guest.JSON(200, d)
	})
}

func main() {}
