package main

import (
	"crypto/sha256"
	"encoding/base64"
	byteorder "encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/runtime"
)

// The local hub of `outpost run --hub`: the emulator in the agent's
// process, with a firmware image to update to.
const (
	demoFirmwareVersion = "1.1.0"
	demoFirmwareFile    = "outpost-demo-firmware-" + demoFirmwareVersion + ".img"
	demoAzureHost       = "outpost-hub.local"
)

// localHub is the emulator `outpost run --hub` starts beside the agent.
type localHub struct {
	h        *hub.Hub
	firmware string // sha256 of the demo image, hex
}

// demoFirmware is a 1 MiB image: a header line, then bytes that are the
// same on every machine.
func demoFirmware() []byte {
	img := make([]byte, 1<<20)
	n := copy(img, "OUTPOST DEMO FIRMWARE "+demoFirmwareVersion+"\n")
	var ctr [8]byte
	for i := 0; n < len(img); i++ {
		byteorder.BigEndian.PutUint64(ctr[:], uint64(i))
		sum := sha256.Sum256(ctr[:])
		n += copy(img[n:], sum[:])
	}
	return img
}

// startLocalHub starts the emulator and points cfg's uplink at it: the
// azure dialect with the emulator's key, a short reconnection back-off,
// and, unless the configuration has its own, firmware commands that
// install into {data_dir}/firmware.
func startLocalHub(cfg *runtime.Config, listen, api string, log *slog.Logger) (*localHub, error) {
	if cfg.Uplink.URL != "" {
		return nil, errors.New("--hub connects the agent to the local hub: leave --upstream and uplink.url unset")
	}
	img := demoFirmware()
	sum := sha256.Sum256(img)
	key, err := base64.StdEncoding.DecodeString(defaultHubKey)
	if err != nil {
		return nil, err
	}
	h, err := hub.New(hub.Options{Listen: listen, API: api, AzureHost: demoAzureHost, DefaultKey: key,
		DefaultToken: "outpost-local-token", Files: map[string][]byte{demoFirmwareFile: img}, Log: log.With("component", "hub")})
	if err != nil {
		return nil, err
	}
	if err := h.Start(); err != nil {
		_ = h.Close()
		return nil, err
	}
	lh := &localHub{h: h, firmware: hex.EncodeToString(sum[:])}
	if err := lh.configure(cfg); err != nil {
		_ = h.Close()
		return nil, err
	}
	return lh, nil
}

// configure points cfg's uplink at the hub: the azure dialect with the
// emulator's key, a short reconnection back-off, and, unless cfg has its
// own, firmware commands that install into {data_dir}/firmware. A reload
// applies it again to the new configuration.
func (lh *localHub) configure(cfg *runtime.Config) error {
	u := &cfg.Uplink
	u.Dialect, u.URL = "azure", "mqtt://"+lh.h.Addr()
	u.Azure.Host, u.Azure.SharedAccessKey = demoAzureHost, defaultHubKey
	u.BackoffMin, u.BackoffMax = runtime.Duration(200*time.Millisecond), runtime.Duration(2*time.Second)
	if len(cfg.DM.InstallCommand) == 0 {
		dir, err := filepath.Abs(filepath.Join(cfg.DataDir, "firmware"))
		if err != nil {
			return err
		}
		// The image goes to {data_dir}/firmware/installed.img, and its
		// version to .../version, which the version command reads.
		cfg.DM.InstallCommand = []string{"sh", "-c",
			`mkdir -p "$0" && cp "$OUTPOST_FIRMWARE_FILE" "$0/installed.img" && printf %s "$OUTPOST_FIRMWARE_VERSION" > "$0/version"`, dir}
		cfg.DM.VersionCommand = []string{"sh", "-c", `cat "$0/version" 2>/dev/null || echo 1.0.0`, dir}
		cfg.DM.FirmwareVersion = "1.0.0"
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}
