package main

import (
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"

	"github.com/outpost-edge/outpost/runtime"
)

// printHints prints what to try once the agent is ready. Each command is
// on a line of its own, indented by seven spaces, so that it can be
// copied (and the walkthrough test runs each one as printed).
func printHints(w io.Writer, cfg runtime.Config, addr, metricsAddr string, handlers []string, lh *localHub) {
	host, port, _ := strings.Cut(addr, ":")
	mq := fmt.Sprintf("-h %s -p %s", host, port)
	sock := ""
	if s := cfg.AdminSocket(); s != filepath.Join("data", "outpost.sock") {
		sock = " --socket " + s
	}
	hs := "none installed (bin/outpost plugin install DIR)"
	if len(handlers) > 0 {
		hs = strings.Join(handlers, ", ")
	}
	method := firstMethod(handlers)
	if lh == nil {
		printHintsAlone(w, cfg, addr, mq, sock, hs, method)
		return
	}
	api := lh.h.APIAddr()
	hubFlag := ""
	if api != defaultHubAPI {
		hubFlag = " --api " + api
	}
	dev := cfg.Uplink.Azure.DeviceID
	if dev == "" {
		dev = cfg.DeviceID
	}
	fmt.Fprintf(w, `
Outpost is running, connected to a local hub (the cloud side, in this process).
  local broker  %s   plant devices and apps connect here
  hub           %s   azure dialect, device %s; API on http://%s
`, addr, lh.h.Addr(), dev, api)
	if metricsAddr != "" {
		fmt.Fprintf(w, "  metrics       http://%s/metrics\n", metricsAddr)
	}
	fmt.Fprintf(w, `  data          %s
  handlers      %s

Try, in another terminal:
  1. Watch telemetry reach the hub (leave it running):
       bin/outpost hub telemetry --follow%s
  2. Publish a reading on the plant floor; it is stored, then forwarded:
       mosquitto_pub %s -q 1 -t plant/line1/temp -m 21.5
`, cfg.DataDir, hs, hubFlag, mq)
	if method != "" {
		fmt.Fprintf(w, `  3. Invoke the %[1]s handler (wasm) from the cloud:
       bin/outpost hub invoke %[2]s %[1]s --payload hello%[3]s
  4. Invoke it on the plant floor over MQTT 5; this works with the cloud down too:
       mosquitto_rr %[4]s -t outpost/methods/%[1]s -e replies/me -m hi -F '%%P %%p'
`, method, dev, hubFlag, mq)
	}
	fmt.Fprintf(w, `  5. Cut the hub, publish 100 readings, and watch the backlog drain when it returns:
       bin/outpost hub offline%[1]s
       seq 1 100 | mosquitto_pub %[2]s -q 1 -t plant/line1/count -l
       bin/outpost status%[3]s
       bin/outpost hub online%[1]s
       bin/outpost status%[3]s
`, hubFlag, mq, sock)
	if slices.Contains(handlers, "dm_action:firmware.update") {
		fmt.Fprintf(w, `  6. Update the firmware from the cloud: the firmware handler (wasm) downloads the
     image, checks its sha256, and the install command copies it to %[5]s:
       bin/outpost hub firmware-update %[1]s --uri http://%[2]s/files/%[3]s --version %[4]s --verifier sha256:%[6]s%[7]s
       cat %[5]s/version
`, dev, api, demoFirmwareFile, demoFirmwareVersion, filepath.Join(cfg.DataDir, "firmware"), lh.firmware, hubFlag)
	}
	fmt.Fprintf(w, `
Ctrl-C stops the agent and the hub; the backlog stays in %s for the next start.
`, cfg.DataDir)
}

// printHintsAlone prints the hints of an agent without the local hub.
func printHintsAlone(w io.Writer, cfg runtime.Config, addr, mq, sock, hs, method string) {
	up := "none: messages are stored in " + cfg.DataDir + " until an uplink is configured"
	if u, err := runtime.ParseUplinkURL(cfg.Uplink.URL); err == nil {
		up = u.Redacted()
	}
	fmt.Fprintf(w, `
Outpost is running.
  local broker  %s
  uplink        %s
  device id     %s
  handlers      %s

Try, in another terminal:
       mosquitto_sub %s -t 'plant/#' -v
       mosquitto_pub %s -q 1 -t plant/line1/temp -m 21.5
`, addr, up, cfg.DeviceID, hs, mq, mq)
	if method != "" {
		fmt.Fprintf(w, `       mosquitto_rr %s -t outpost/methods/%s -e replies/me -m hi -F '%%P %%p'
       bin/outpost invoke %s%s
       bin/outpost plugin list%s
`, mq, method, method, sock, sock)
	}
	fmt.Fprintf(w, `       bin/outpost status%s

Stop with Ctrl-C: the backlog stays in %s and drains on the next start, for example
forwarded to any MQTT 5 broker, under outpost/%s/..., with
       bin/outpost run --upstream mqtt://BROKER:1883
`, sock, cfg.DataDir, cfg.DeviceID)
}
