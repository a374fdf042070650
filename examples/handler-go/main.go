// Example Outpost handler in Go: a diagnostics method, an echo method and a
// set-point command that validates its JSON payload.
//
// Build (make examples does this, and writes build/manifest.yaml):
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o build/module.wasm .
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/outpost-edge/outpost/abi/guest"
)

var (
	started = time.Now()
	served  int
	limits  struct {
		Min float64 `json:"min"`
		Max float64 `json:"max"`
	}
)

func init() {
	// The plugin's config (the manifest's config section) arrives here.
	guest.OnInit(func(config []byte) error {
		limits.Min, limits.Max = 0, 100
		if len(config) == 0 {
			return nil
		}
		return json.Unmarshal(config, &limits)
	})

	guest.Method("getDiagnostics", func(r *guest.Request) guest.Response {
		served++
		return guest.JSON(200, map[string]any{
			"instance_uptime_s": int(time.Since(started).Seconds()),
			"requests_served":   served,
			"setpoint_limits":   limits,
		})
	})

	guest.Method("echo", func(r *guest.Request) guest.Response {
		served++
		return guest.Response{Status: 200, Body: r.Payload(), ContentType: r.ContentType, Props: r.Props}
	})

	guest.Command("setpoint", func(r *guest.Request) guest.Response {
		served++
		var sp struct {
			Value *float64 `json:"value"`
		}
		if err := r.JSON(&sp); err != nil {
			return guest.Error(400, err)
		}
		if sp.Value == nil {
			return guest.Error(400, errors.New(`want {"value": NUMBER}`))
		}
		if *sp.Value < limits.Min || *sp.Value > limits.Max {
			return guest.Error(422, fmt.Errorf("%g is outside %g..%g", *sp.Value, limits.Min, limits.Max))
		}
		guest.Logf(2, "set point accepted: %g", *sp.Value)
		return guest.JSON(200, map[string]float64{"accepted": *sp.Value})
	})
}

func main() {}
