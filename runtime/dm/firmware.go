// Package dm keeps the device-management state machines the agent runs on
// behalf of a hub, persisted in the store: the firmware download and
// update of PROTOCOLS.md section 2.4. The dialect owns the wire, the
// handlers the device-specific work; this package owns which transitions
// are allowed, and makes sure none is left "in progress" forever across
// restarts.
package dm

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/storage"
)

// Download states (mgmt.firmware.state).
const (
	StateIdle        = 0
	StateDownloading = 1
	StateDownloaded  = 2
)

// Update statuses (mgmt.firmware.updateStatus).
const (
	UpdateSuccess            = 0
	UpdateInProgress         = 1
	UpdateOutOfMemory        = 2
	UpdateConnectionLost     = 3
	UpdateVerificationFailed = 4
	UpdateUnsupportedImage   = 5
	UpdateInvalidURI         = 6
)

// Firmware is mgmt.firmware, as the platform sees it.
type Firmware struct {
	Version         string `json:"version,omitempty"`
	Name            string `json:"name,omitempty"`
	URI             string `json:"uri,omitempty"`
	Verifier        string `json:"verifier,omitempty"`
	State           int    `json:"state"`
	UpdateStatus    int    `json:"updateStatus"`
	UpdatedDateTime string `json:"updatedDateTime,omitempty"`
}

// Record is the persisted firmware state of one device.
type Record struct {
	Firmware
	// Installed is deviceInfo.fwVersion: the version running.
	Installed string `json:"installed,omitempty"`
	// Attempts counts the starts of the current download (a restart in
	// the middle starts it again, up to MaxAttempts).
	Attempts int `json:"attempts,omitempty"`
	// Blob names the staged image once downloaded.
	Blob string `json:"blob,omitempty"`
}

// MaxAttempts bounds the starts of one download across restarts; then the
// download fails with Connection Lost.
const MaxAttempts = 3

// Error is a refused transition: the DM result code and why.
type Error struct {
	RC  int
	Msg string
}

func (e *Error) Error() string { return fmt.Sprintf("dm: %d: %s", e.RC, e.Msg) }

// ErrNotSupported is returned when the device has no firmware support.
var ErrNotSupported = &Error{RC: 501, Msg: "firmware actions are not supported"}

// Machine is the firmware state machine of one device, persisted under one
// key. Each transition is stored before it is reported, so that every
// change produces exactly one notify. Safe for concurrent use.
type Machine struct {
	st  *storage.State
	key string
	now func() time.Time

	mu  sync.Mutex
	rec Record
}

// Open loads the machine stored under key.
func Open(st *storage.State, key string) (*Machine, error) {
	m := &Machine{st: st, key: key, now: time.Now}
	b, err := st.Get(key)
	switch {
	case errors.Is(err, storage.ErrNotFound):
	case err != nil:
		return nil, fmt.Errorf("dm: open %s: %w", key, err)
	default:
		if err := json.Unmarshal(b, &m.rec); err != nil {
			return nil, fmt.Errorf("dm: open %s: corrupt record: %w", key, err)
		}
	}
	return m, nil
}

// Get returns the current record.
func (m *Machine) Get() Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.rec
}

// SetInstalled records the running version (deviceInfo.fwVersion) as the
// device reports it; "" keeps the one recorded (the last installed).
func (m *Machine) SetInstalled(v string) error {
	if v == "" {
		return nil
	}
	return m.change(func(r *Record) error {
		r.Installed = v
		return nil
	})
}

// change applies fn to a copy of the record and stores it.
func (m *Machine) change(fn func(r *Record) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	next := m.rec
	if err := fn(&next); err != nil {
		return err
	}
	b, err := json.Marshal(next)
	if err != nil {
		return err
	}
	if err := m.st.Put(m.key, b, 0); err != nil {
		return &Error{RC: 500, Msg: "the firmware state could not be stored: " + err.Error()}
	}
	m.rec = next
	return nil
}

// Params are the firmware parameters of a device/update.
type Params struct {
	Version, Name, URI, Verifier string
}

// SetParams stores new firmware parameters (device/update of
// mgmt.firmware): only while no download or update runs.
func (m *Machine) SetParams(p Params) error {
	return m.change(func(r *Record) error {
		switch {
		case r.State == StateDownloading || r.UpdateStatus == UpdateInProgress:
			return &Error{RC: 400, Msg: "a firmware download or update is in progress"}
		case r.State == StateDownloaded:
			// The staged image is the old parameters': installing it under
			// new ones would report the wrong version.
			return &Error{RC: 400, Msg: "an image is downloaded and waiting to be installed: update first"}
		}
		r.Version, r.Name, r.URI, r.Verifier = p.Version, p.Name, p.URI, p.Verifier
		r.UpdatedDateTime = m.now().UTC().Format(time.RFC3339)
		return nil
	})
}

// CheckURI reports whether uri can be downloaded from: http or https with
// a host.
func CheckURI(uri string) error {
	u, err := url.Parse(uri)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%q is not an http(s) URI", uri)
	}
	return nil
}

// StartDownload moves (0,*) to (1,*): 400 when not idle or the URI is
// missing or invalid.
func (m *Machine) StartDownload() error {
	return m.change(func(r *Record) error {
		if r.State != StateIdle {
			return &Error{RC: 400, Msg: "not idle: a download is in progress or an image is waiting to be installed"}
		}
		if r.URI == "" {
			return &Error{RC: 400, Msg: "no firmware uri: set mgmt.firmware with device/update first"}
		}
		if err := CheckURI(r.URI); err != nil {
			return &Error{RC: 400, Msg: err.Error()}
		}
		r.State, r.Attempts, r.Blob = StateDownloading, 1, ""
		return nil
	})
}

// Downloaded moves (1,*) to (2,*) with the staged image's blob name.
func (m *Machine) Downloaded(blob string) error {
	return m.change(func(r *Record) error {
		if r.State != StateDownloading {
			return &Error{RC: 409, Msg: "no download in progress"}
		}
		r.State, r.Blob = StateDownloaded, blob
		return nil
	})
}

// DownloadFailed moves (1,*) to (0,status): out of memory, connection
// lost, verification failed or invalid URI.
func (m *Machine) DownloadFailed(status int) error {
	return m.change(func(r *Record) error {
		if r.State != StateDownloading {
			return &Error{RC: 409, Msg: "no download in progress"}
		}
		r.State, r.UpdateStatus, r.Blob, r.Attempts = StateIdle, status, "", 0
		return nil
	})
}

// StartUpdate moves (2,*) to (2,1): 400 unless an image is downloaded.
func (m *Machine) StartUpdate() error {
	return m.change(func(r *Record) error {
		if r.State != StateDownloaded {
			return &Error{RC: 400, Msg: "not downloaded: download the firmware first"}
		}
		if r.UpdateStatus == UpdateInProgress {
			return &Error{RC: 400, Msg: "an update is in progress"}
		}
		r.UpdateStatus = UpdateInProgress
		return nil
	})
}

// Updated moves (2,1) to (0,0) and makes the new version the installed
// one; the image is no longer needed.
func (m *Machine) Updated() error {
	return m.change(func(r *Record) error {
		if r.State != StateDownloaded || r.UpdateStatus != UpdateInProgress {
			return &Error{RC: 409, Msg: "no update in progress"}
		}
		r.State, r.UpdateStatus, r.Installed, r.Blob = StateIdle, UpdateSuccess, r.Version, ""
		return nil
	})
}

// UpdateFailed moves (2,1) to (0,status), out of memory or unsupported
// image; the image is dropped (PROTOCOLS.md 2.4, DESIGN).
func (m *Machine) UpdateFailed(status int) error {
	return m.change(func(r *Record) error {
		if r.State != StateDownloaded || r.UpdateStatus != UpdateInProgress {
			return &Error{RC: 409, Msg: "no update in progress"}
		}
		r.State, r.UpdateStatus, r.Blob = StateIdle, status, ""
		return nil
	})
}

// Resume is what a restart finds to do.
type Resume int

// Results of Recover.
const (
	Nothing         Resume = iota
	RestartDownload        // a download was cut: start it again
	CheckUpdate            // an update was running: find out whether it took
)

// Recover decides, after a restart, what becomes of a transition that was
// in progress: a download starts again (it failed as Connection Lost after
// MaxAttempts starts); an update must be checked by the caller (Updated or
// UpdateFailed). Nothing stays in progress without an owner.
func (m *Machine) Recover() (Resume, error) {
	var res Resume
	err := m.change(func(r *Record) error {
		switch {
		case r.State == StateDownloading && r.Attempts >= MaxAttempts:
			r.State, r.UpdateStatus, r.Attempts, r.Blob = StateIdle, UpdateConnectionLost, 0, ""
		case r.State == StateDownloading:
			r.Attempts++
			res = RestartDownload
		case r.State == StateDownloaded && r.UpdateStatus == UpdateInProgress:
			res = CheckUpdate
		}
		return nil
	})
	return res, err
}

// ParseVerifier reads a verifier: "sha256:HEX" or bare 64 hex digits, as a
// lower-case hex digest. "" = none.
func ParseVerifier(v string) (string, error) {
	if v == "" {
		return "", nil
	}
	h := strings.ToLower(strings.TrimPrefix(strings.TrimPrefix(v, "sha256:"), "SHA256:"))
	if len(h) != 64 || strings.Trim(h, "0123456789abcdef") != "" {
		return "", fmt.Errorf("verifier %q: want sha256:<64 hex digits>", v)
	}
	return h, nil
}
