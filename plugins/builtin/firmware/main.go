// Firmware is Outpost's first-party firmware handler (kind dm_action): it
// downloads an image through the host's http capability into a staged
// blob, verifies it against the platform's sha256 verifier, and checks an
// image before the host installs it with the operator's command.
//
// The host owns the protocol and the state machine (runtime/dm); this
// module owns the checks a device may need. Its config:
//
//	max_bytes: 0           # refuse a larger image (507, out of memory); 0 = the host's http_bytes
//	magic: ""              # bytes every image starts with; else 415 (unsupported image)
//	require_verifier: false # refuse a download without a verifier (422)
//
// Build: GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o build/module.wasm .
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/abi/guest"
)

var cfg struct {
	MaxBytes        int64  `json:"max_bytes"`
	Magic           string `json:"magic"`
	RequireVerifier bool   `json:"require_verifier"`
}

// request is the host's payload (abi/ABI.md section 6.6).
type request struct {
	URI      string `json:"uri"`
	Verifier string `json:"verifier"`
	Version  string `json:"version"`
	Name     string `json:"name"`
	Blob     string `json:"blob"`
}

// Firmware statuses the host understands (mgmt.firmware.updateStatus).
const (
	outOfMemory        = "2"
	connectionLost     = "3"
	verificationFailed = "4"
	unsupportedImage   = "5"
	invalidURI         = "6"
)

func fail(status abi.Status, firmwareStatus string, format string, a ...any) guest.Response {
	msg := fmt.Sprintf(format, a...)
	guest.Log(abi.LogWarn, msg)
	return guest.Text(status, msg).With("firmware-status", firmwareStatus)
}

func init() {
	guest.OnInit(func(c []byte) error {
		if len(c) == 0 {
			return nil
		}
		return json.Unmarshal(c, &cfg)
	})
	guest.DMAction("firmware.download", download)
	guest.DMAction("firmware.update", update)
}

func parse(r *guest.Request) (request, error) {
	var q request
	if err := json.Unmarshal(r.Payload(), &q); err != nil {
		return q, err
	}
	if q.Blob == "" {
		return q, errors.New("no blob named")
	}
	return q, nil
}

func download(r *guest.Request) guest.Response {
	q, err := parse(r)
	if err != nil {
		return fail(400, invalidURI, "bad request: %v", err)
	}
	if q.Verifier == "" && cfg.RequireVerifier {
		return fail(422, verificationFailed, "no verifier, and this device requires one")
	}
	size, err := guest.HTTPGet(q.URI, q.Blob)
	switch {
	case errors.Is(err, abi.ErrNotFound), errors.Is(err, abi.ErrBadArg), errors.Is(err, abi.ErrDenied):
		return fail(404, invalidURI, "cannot download %s: %v", q.URI, err)
	case errors.Is(err, abi.ErrLimit):
		return fail(507, outOfMemory, "the image at %s is larger than this device takes", q.URI)
	case err != nil:
		return fail(503, connectionLost, "download of %s failed: %v", q.URI, err)
	}
	if cfg.MaxBytes > 0 && size > cfg.MaxBytes {
		_ = guest.BlobDelete(q.Blob)
		return fail(507, outOfMemory, "the image is %d bytes, over this device's %d", size, cfg.MaxBytes)
	}
	sum, err := digest(q.Blob, size)
	if err != nil {
		_ = guest.BlobDelete(q.Blob)
		return fail(500, connectionLost, "reading the image back: %v", err)
	}
	if q.Verifier != "" && sum != q.Verifier {
		_ = guest.BlobDelete(q.Blob)
		return fail(422, verificationFailed, "sha256 %s, the verifier says %s", sum, q.Verifier)
	}
	_ = guest.Progress(100, "downloaded and verified")
	return guest.JSON(200, map[string]any{"bytes": size, "sha256": sum})
}

// digest is the sha256 of a blob, read in chunks.
func digest(blob string, size int64) (string, error) {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	var off int64
	next := int64(25)
	for off < size {
		n, err := guest.BlobRead(blob, buf, off)
		if err != nil {
			return "", err
		}
		if n == 0 {
			return "", fmt.Errorf("the blob ended at %d of %d bytes", off, size)
		}
		h.Write(buf[:n])
		off += int64(n)
		if pct := off * 100 / size; pct >= next && pct < 100 {
			_ = guest.Progress(int(pct), "verifying")
			next = pct/25*25 + 25
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func update(r *guest.Request) guest.Response {
	q, err := parse(r)
	if err != nil {
		return fail(400, unsupportedImage, "bad request: %v", err)
	}
	size, err := guest.BlobSize(q.Blob)
	if err != nil {
		return fail(415, unsupportedImage, "no staged image %s: %v", q.Blob, err)
	}
	if size == 0 {
		return fail(415, unsupportedImage, "the staged image is empty")
	}
	if q.Verifier != "" {
		// Checked again before install: the image must be the one verified.
		sum, err := digest(q.Blob, size)
		if err != nil || sum != q.Verifier {
			return fail(422, unsupportedImage, "the staged image no longer matches its verifier")
		}
	}
	if m := cfg.Magic; m != "" {
		head := make([]byte, len(m))
		n, err := guest.BlobRead(q.Blob, head, 0)
		if err != nil || string(head[:n]) != m {
			return fail(415, unsupportedImage, "the image does not start with %q", m)
		}
	}
	_ = guest.Progress(100, "image checked; installing")
	return guest.Text(200, "install "+q.Version)
}

func main() {}
