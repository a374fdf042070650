package dm

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/abi"
)

// Handler names (kind dm_action) of the firmware actions.
const (
	ActionDownload = "firmware.download"
	ActionUpdate   = "firmware.update"
)

// Result is a handler's answer, as the runner needs it.
type Result struct {
	Status abi.Status
	Props  []abi.Property
	Body   []byte
	Err    error // the host ended the call
}

// Actions run the operator's commands (Commands implements it).
type Actions interface {
	Has(action string) bool
	Run(ctx context.Context, action string, env map[string]string) error
}

// Runner carries out a device's firmware download and update with the
// handlers and the operator's install command, recording each outcome in
// the Machine. A dialect drives it: Watson from its DM requests, Azure
// from a firmwareUpdate method.
type Runner struct {
	Machine *Machine
	// Call runs the handler name with payload and gives its result to done.
	Call func(name string, payload []byte, done func(Result))
	// Actions run the install command, when it has one; nil or none: the
	// update handler's 2xx means installed.
	Actions Actions
	// Running is the version the device runs now, as configured: an
	// update cut by a restart took when it is the new version.
	Running string
	// Changed is called after each transition (a notify, a twin report).
	Changed func()
	// Blob names the staged image.
	Blob string
	Log  *slog.Logger
	Ctx  context.Context // ends with the agent
}

// Request is the payload of the firmware handlers.
type Request struct {
	URI      string `json:"uri,omitempty"`
	Verifier string `json:"verifier,omitempty"` // lower-case sha256 hex, or ""
	Version  string `json:"version,omitempty"`
	Name     string `json:"name,omitempty"`
	Blob     string `json:"blob"` // the staged image's name
}

// Status reads a failed firmware handler's updateStatus: the response
// property "firmware-status" (2 to 6) when given, else from the status.
func Status(r Result, download bool) int {
	for _, p := range r.Props {
		if p.Key == "firmware-status" {
			if n, err := strconv.Atoi(p.Value); err == nil && n >= UpdateOutOfMemory && n <= UpdateInvalidURI {
				return n
			}
		}
	}
	switch r.Status {
	case 400, 403, 404:
		if download {
			return UpdateInvalidURI
		}
	case 413, 507:
		return UpdateOutOfMemory
	case 415:
		return UpdateUnsupportedImage
	case 422:
		return UpdateVerificationFailed
	}
	if download {
		return UpdateConnectionLost
	}
	return UpdateUnsupportedImage
}

// signaled reports whether a command ended by a signal.
func signaled(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled()
}

// Dropper is implemented by Actions that can delete a staged image once
// its update is over.
type Dropper interface {
	Drop(blob string)
}

// drop deletes the staged image, which is of no use once installed or
// refused.
func (r *Runner) drop(blob string) {
	if d, ok := r.Actions.(Dropper); ok && blob != "" {
		d.Drop(blob)
	}
}

func (r *Runner) changed() {
	if r.Changed != nil {
		r.Changed()
	}
}

func (r *Runner) stored(err error) {
	if err != nil {
		r.Log.Error("firmware state not stored", "error", err)
	}
}

// Download runs the download handler for the machine's parameters (the
// machine is in Downloading), then records Downloaded or the failure, and
// calls then (if set) after Changed.
func (r *Runner) Download(then func(ok bool)) {
	rec := r.Machine.Get()
	verifier, _ := ParseVerifier(rec.Verifier)
	body, _ := json.Marshal(Request{URI: rec.URI, Verifier: verifier, Version: rec.Version, Name: rec.Name, Blob: r.Blob})
	r.Log.Info("firmware download started", "uri", rec.URI, "version", rec.Version, "attempt", rec.Attempts)
	r.Call(ActionDownload, body, func(res Result) {
		ok := res.Status >= 200 && res.Status < 300
		if !ok && r.Ctx.Err() != nil {
			// The agent is stopping: the download was cut, not failed. The
			// next start takes it up again (Recover).
			r.Log.Warn("firmware download cut by the agent stopping: it starts again at the next start")
			return
		}
		if ok {
			r.stored(r.Machine.Downloaded(r.Blob))
			r.Log.Info("firmware downloaded", "version", rec.Version)
		} else {
			st := Status(res, true)
			r.stored(r.Machine.DownloadFailed(st))
			r.Log.Warn("firmware download failed", "status", int(res.Status), "update_status", st, "response", string(res.Body), "error", res.Err)
		}
		r.changed()
		if then != nil {
			then(ok)
		}
	})
}

// Update runs the update handler on the staged image (the machine is
// updating), then the install command, and records the outcome.
func (r *Runner) Update(then func(ok bool)) {
	rec := r.Machine.Get()
	verifier, _ := ParseVerifier(rec.Verifier)
	body, _ := json.Marshal(Request{Version: rec.Version, Name: rec.Name, Blob: rec.Blob, Verifier: verifier})
	r.Call(ActionUpdate, body, func(res Result) {
		switch {
		case (res.Status < 200 || res.Status >= 300) && r.Ctx.Err() != nil:
			r.Log.Warn("firmware update cut by the agent stopping: the next start checks the running version")
			return
		case res.Status < 200 || res.Status >= 300:
			st := Status(res, false)
			r.stored(r.Machine.UpdateFailed(st))
			r.Log.Warn("firmware update refused by its handler", "status", int(res.Status), "update_status", st, "response", string(res.Body))
		case r.Actions != nil && r.Actions.Has("install"):
			ctx, cancel := context.WithTimeout(r.Ctx, 30*time.Minute)
			err := r.Actions.Run(ctx, "install", map[string]string{"OUTPOST_FIRMWARE_BLOB": rec.Blob,
				"OUTPOST_FIRMWARE_VERSION": rec.Version, "OUTPOST_FIRMWARE_NAME": rec.Name})
			cancel()
			switch {
			case err != nil && (r.Ctx.Err() != nil || signaled(err)):
				// Stopped, or the reboot the install asked for ended it: the
				// next start decides by the running version (Recover).
				r.Log.Warn("firmware install command ended by a signal or the agent stopping: the next start checks the running version", "error", err)
				return
			case err != nil:
				r.Log.Error("firmware install command failed", "error", err)
				r.stored(r.Machine.UpdateFailed(UpdateUnsupportedImage))
			default:
				r.stored(r.Machine.Updated())
			}
		default:
			r.stored(r.Machine.Updated())
		}
		r.drop(rec.Blob)
		ok := r.Machine.Get().UpdateStatus == UpdateSuccess
		if ok {
			r.Log.Info("firmware updated", "version", r.Machine.Get().Installed)
		}
		r.changed()
		if then != nil {
			then(ok)
		}
	})
}

// Recover resumes what a restart cut: a download starts again (then calls
// afterDownload, if set); an update that was running took if the device
// runs the new version (Running), and failed otherwise. Nothing stays in
// progress.
func (r *Runner) Recover(afterDownload func(ok bool)) {
	res, err := r.Machine.Recover()
	if err != nil {
		r.Log.Error("firmware state not recovered", "error", err)
		return
	}
	switch res {
	case RestartDownload:
		r.Log.Warn("firmware download cut by a restart: starting it again", "attempt", r.Machine.Get().Attempts)
		r.Download(afterDownload)
	case CheckUpdate:
		rec := r.Machine.Get()
		if r.Running != "" && r.Running == rec.Version {
			r.stored(r.Machine.Updated())
			r.Log.Info("firmware update finished across a restart", "version", rec.Version)
		} else {
			r.stored(r.Machine.UpdateFailed(UpdateUnsupportedImage))
			r.Log.Warn("firmware update cut by a restart and not in place: failed", "version", rec.Version, "running", r.Running)
		}
		r.drop(rec.Blob)
		r.changed()
	default:
		if r.Machine.Get().UpdateStatus != 0 || r.Machine.Get().State != StateIdle {
			r.changed()
		}
	}
}
