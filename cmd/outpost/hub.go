package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/outpost-edge/outpost/internal/hub"
	"github.com/outpost-edge/outpost/runtime"
	"github.com/outpost-edge/outpost/runtime/logging"
)

const hubUsage = `Usage: outpost hub [serve] [flags]            run the hub emulator (Ctrl-C stops it)
       outpost hub devices                        list the devices the hub knows
       outpost hub invoke DEVICE METHOD [--payload P] [--timeout 30s]
       outpost hub send-command DEVICE [--command NAME] [--payload P] [--wait 30s]
       outpost hub commands DEVICE                list a device's commands and their fate
       outpost hub twin DEVICE                    print a device's twin
       outpost hub patch-desired DEVICE JSON      patch the desired properties
       outpost hub telemetry [--follow]           print the telemetry received
       outpost hub firmware-update DEVICE --uri URI [--verifier sha256:HEX] [--version V] [--timeout 10m]
                                                  run a firmware download and update (Watson DM, or
                                                  Azure's firmwareUpdate method and the reported twin)
       outpost hub dm DEVICE OP [--payload JSON]  send a Watson DM request (e.g. mgmt/initiate/device/reboot)
       outpost hub dm-state DEVICE                print a Watson device's DM state
       outpost hub offline                        cut every device and refuse connections (an outage)
       outpost hub online                         end the outage
       outpost hub fault --op OP (--status S | --drop) [--device D] [--count N]
                                                  answer the next OP with an error (telemetry,
                                                  twin.get, twin.reported)
       outpost hub plugin-install DEVICE --name N --uri URI --sha256 HEX (--manifest FILE | --manifest-uri URI --manifest-sha256 HEX)
                                  [--signature FILE] [--version V] [--timeout 60s]
                                                  install or upgrade a plugin on the device
       outpost hub plugin-rollback DEVICE --name N    go back to the plugin's previous version
       outpost hub plugin-remove DEVICE --name N      remove the plugin
       outpost hub plugin-list DEVICE                 list the device's plugins

The client commands talk to a running hub's API (--api, default ` + defaultHubAPI + `).
The plugin commands need plugins.rollout on the agent; ` + "`outpost hub --serve DIR`" + ` serves
DIR's files at http://API/files/NAME for devices to download.
A payload of @FILE reads the file. Azure devices are named by their device id,
Watson devices by TYPE:ID.
`

// Defaults of the emulator. defaultHubKey is a fixed key for local use
// only: the agent's example configuration signs with it.
const (
	defaultHubMQTT = "127.0.0.1:8883"
	defaultHubAPI  = "127.0.0.1:8080"
	defaultHubKey  = "b3V0cG9zdC1sb2NhbC1odWItZGV2aWNlLWtleS0wMDE=" // "outpost-local-hub-device-key-001"
)

func cmdHub(args []string, stdout, stderr io.Writer) int {
	sub := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "serve":
		return hubServe(args, stdout, stderr)
	case "devices", "invoke", "send-command", "commands", "twin", "patch-desired", "telemetry", "fault",
		"firmware-update", "dm", "dm-state", "offline", "online", "plugin-install", "plugin-rollback", "plugin-remove", "plugin-list":
		return hubClient(sub, args, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, hubUsage)
		return 0
	}
	fmt.Fprintf(stderr, "outpost hub: unknown command %q\n\n%s", sub, hubUsage)
	return 2
}

func hubServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost hub", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", defaultHubMQTT, "MQTT listener `address`")
	api := fs.String("api", defaultHubAPI, "HTTP API `address` (off: none)")
	host := fs.String("azure-host", "outpost-hub.local", "host `name` Azure devices sign with")
	key := fs.String("key", defaultHubKey, "base64 shared access `key` of every Azure device without its own")
	org := fs.String("watson-org", "outpst", "Watson organization `id`")
	token := fs.String("token", "outpost-local-token", "auth `token` of every Watson device without its own")
	devKeys := map[string][]byte{}
	fs.Func("device-key", "an Azure device's own key, `ID=BASE64`; repeatable", func(s string) error {
		id, k, ok := strings.Cut(s, "=")
		b, err := base64.StdEncoding.DecodeString(k)
		if !ok || id == "" || err != nil {
			return errors.New("want ID=BASE64")
		}
		devKeys[id] = b
		return nil
	})
	serve := fs.String("serve", "", "serve this `directory`'s files at http://API/files/NAME (plugins, firmware)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "outpost hub: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	dk, err := base64.StdEncoding.DecodeString(*key)
	if err != nil {
		fmt.Fprintln(stderr, "outpost hub: --key: not base64:", err)
		return 2
	}
	if _, err := logging.ParseLevel(*logLevel); err != nil {
		fmt.Fprintln(stderr, "outpost hub: --log-level:", err)
		return 2
	}
	log := newLogger(runtime.LogConfig{Level: *logLevel, Format: "auto"}, stderr, *token).Logger
	h, err := hub.New(hub.Options{Listen: *listen, API: *api, FilesDir: *serve, AzureHost: *host, AzureKeys: devKeys, DefaultKey: dk,
		WatsonOrg: *org, DefaultToken: *token, Log: log})
	if err == nil {
		err = h.Start()
	}
	if err != nil {
		fmt.Fprintln(stderr, "outpost hub:", err)
		return 1
	}
	fmt.Fprintf(stdout, "outpost hub: MQTT on %s, API on http://%s (Azure host %s, Watson org %s)\n", h.Addr(), h.APIAddr(), *host, *org)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	if err := h.Close(); err != nil {
		fmt.Fprintln(stderr, "outpost hub: close:", err)
		return 1
	}
	return 0
}

// hubClient runs one API call against a running hub.
func hubClient(sub string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost hub "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	api := fs.String("api", envOr("OUTPOST_HUB_API", defaultHubAPI), "the hub's API `address`")
	payload := fs.String("payload", "", "payload; @FILE reads a file")
	timeout := fs.Duration("timeout", 0, "how long the hub waits for a method's response (default 30s); the agent's uplink.azure.method_timeout bounds its side")
	command := fs.String("command", "", "the command's name (the @command application property)")
	wait := fs.Duration("wait", 0, "wait this long for the command's fate")
	follow := fs.Bool("follow", false, "print telemetry as it arrives")
	format := fs.String("format", "", "a Watson command's format (default json)")
	var fw hub.Firmware
	fs.StringVar(&fw.URI, "uri", "", "firmware-update, plugin-install: the image's or module's http(s) URI")
	fs.StringVar(&fw.Verifier, "verifier", "", "firmware-update: sha256:HEX of the image")
	fs.StringVar(&fw.Version, "version", "", "firmware-update, plugin-install: the image's or plugin's version")
	fs.StringVar(&fw.Name, "name", "", "firmware-update: the image's name; plugin-*: the plugin's")
	sha := fs.String("sha256", "", "plugin-install: the module's sha256 (64 hex digits)")
	manifest := fs.String("manifest", "", "plugin-install: the manifest `file` (sent inline)")
	manifestURI := fs.String("manifest-uri", "", "plugin-install: the manifest's http(s) URI")
	manifestSHA := fs.String("manifest-sha256", "", "plugin-install: with --manifest-uri, the manifest's sha256 (hex)")
	signature := fs.String("signature", "", "plugin-install: the manifest's signature `file` (base64 ed25519)")
	var fault hub.Fault
	fs.StringVar(&fault.Op, "op", "", "fault: the operation")
	fs.StringVar(&fault.Status, "status", "", "fault: the status to answer (Azure: 4 hex digits)")
	fs.StringVar(&fault.Device, "device", "", "fault: only this device")
	fs.BoolVar(&fault.Drop, "drop", false, "fault: answer nothing")
	fs.IntVar(&fault.Count, "count", 1, "fault: how many times")
	if err := fs.Parse(reorderFlags(fs, args)); err != nil {
		return 2
	}
	pos := fs.Args()
	body := []byte(*payload)
	if strings.HasPrefix(*payload, "@") {
		b, err := os.ReadFile((*payload)[1:])
		if err != nil {
			fmt.Fprintln(stderr, "outpost hub:", err)
			return 1
		}
		body = b
	}
	want := map[string]int{"devices": 0, "invoke": 2, "send-command": 1, "commands": 1, "twin": 1, "patch-desired": 2, "telemetry": 0,
		"fault": 0, "firmware-update": 1, "dm": 2, "dm-state": 1, "offline": 0, "online": 0,
		"plugin-install": 1, "plugin-rollback": 1, "plugin-remove": 1, "plugin-list": 1}
	if len(pos) != want[sub] {
		fmt.Fprintf(stderr, "outpost hub %s: want %d arguments, got %d\n\n%s", sub, want[sub], len(pos), hubUsage)
		return 2
	}
	base := "http://" + *api + "/api"
	esc := url.PathEscape
	var method, path string
	q := url.Values{}
	switch sub {
	case "devices":
		method, path = "GET", "/devices"
	case "invoke":
		method, path = "POST", "/devices/"+esc(pos[0])+"/methods/"+esc(pos[1])
		if *timeout > 0 {
			q.Set("timeout", timeout.String())
		}
	case "send-command":
		method, path = "POST", "/devices/"+esc(pos[0])+"/commands"
		if *command != "" {
			q.Set("command", *command)
		}
		if *wait > 0 {
			q.Set("wait", wait.String())
		}
		if *format != "" {
			q.Set("format", *format)
		}
	case "commands":
		method, path = "GET", "/devices/"+esc(pos[0])+"/commands"
	case "twin":
		method, path = "GET", "/devices/"+esc(pos[0])+"/twin"
	case "patch-desired":
		method, path, body = "PATCH", "/devices/"+esc(pos[0])+"/twin/desired", []byte(pos[1])
	case "telemetry":
		method, path = "GET", "/telemetry"
		if *follow {
			q.Set("follow", "1")
		}
	case "firmware-update":
		if fw.URI == "" {
			fmt.Fprintln(stderr, "outpost hub firmware-update: --uri is required")
			return 2
		}
		method, path = "POST", "/devices/"+esc(pos[0])+"/firmware"
		body, _ = json.Marshal(fw)
		if *timeout > 0 {
			q.Set("timeout", timeout.String())
		}
	case "dm":
		method, path = "POST", "/devices/"+esc(pos[0])+"/dm/"+strings.Trim(pos[1], "/")
	case "dm-state":
		method, path = "GET", "/devices/"+esc(pos[0])+"/dm"
	case "offline", "online":
		method, path = "POST", "/"+sub
	case "plugin-install", "plugin-rollback", "plugin-remove", "plugin-list":
		action := strings.TrimPrefix(sub, "plugin-")
		p := hub.PluginParams{Name: fw.Name, Version: fw.Version, URI: fw.URI, SHA256: *sha, ManifestURI: *manifestURI, ManifestSHA256: *manifestSHA}
		switch {
		case action != "list" && p.Name == "":
			fmt.Fprintf(stderr, "outpost hub %s: --name is required\n", sub)
			return 2
		case action == "install" && (p.URI == "" || p.SHA256 == "" || (*manifest == "") == (*manifestURI == "") || (*manifestURI != "") != (*manifestSHA != "")):
			fmt.Fprintln(stderr, "outpost hub plugin-install: want --uri, --sha256 and one of --manifest or --manifest-uri with --manifest-sha256")
			return 2
		}
		for _, f := range []struct {
			file string
			dst  *string
		}{{*manifest, &p.Manifest}, {*signature, &p.Signature}} {
			if f.file == "" {
				continue
			}
			b, err := os.ReadFile(f.file)
			if err != nil {
				fmt.Fprintf(stderr, "outpost hub %s: %v\n", sub, err)
				return 1
			}
			*f.dst = string(b)
		}
		method, path = "POST", "/devices/"+esc(pos[0])+"/plugins/"+action
		body, _ = json.Marshal(p)
		if *timeout > 0 {
			q.Set("timeout", timeout.String())
		}
	case "fault":
		if fault.Op == "" || (fault.Status == "") == !fault.Drop {
			fmt.Fprintln(stderr, "outpost hub fault: want --op and one of --status or --drop")
			return 2
		}
		method, path = "POST", "/faults"
		body, _ = json.Marshal(fault)
	}
	u := base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		fmt.Fprintln(stderr, "outpost hub:", err)
		return 1
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "outpost hub: %v (is `outpost hub` running with --api %s?)\n", err, *api)
		return 1
	}
	defer resp.Body.Close()
	if sub == "telemetry" && *follow {
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			fmt.Fprintln(stdout, sc.Text())
		}
		return 0
	}
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 400 {
		var e struct{ Error string }
		if json.Unmarshal(out, &e) == nil && e.Error != "" {
			fmt.Fprintf(stderr, "outpost hub %s: %s (HTTP %d)\n", sub, e.Error, resp.StatusCode)
		} else {
			fmt.Fprintf(stderr, "outpost hub %s: HTTP %d %s\n", sub, resp.StatusCode, out)
		}
		return 1
	}
	if strings.HasPrefix(sub, "plugin-") {
		var r hub.PluginResult
		if json.Unmarshal(out, &r) == nil {
			fmt.Fprintf(stderr, "status %d\n", r.Status)
			if r.Status >= 300 {
				fmt.Fprintf(stderr, "outpost hub %s: %s\n", sub, r.Message)
				return 1
			}
			if len(r.Payload) > 0 {
				var pretty bytes.Buffer
				if json.Indent(&pretty, r.Payload, "", "  ") == nil {
					fmt.Fprintln(stdout, pretty.String())
					return 0
				}
			}
			fmt.Fprintln(stdout, r.Message)
			return 0
		}
	}
	if sub == "invoke" {
		var r hub.MethodResult
		if json.Unmarshal(out, &r) == nil {
			fmt.Fprintf(stderr, "status %d\n", r.Status)
			fmt.Fprintln(stdout, r.Payload)
			if r.Status >= 400 {
				return 1
			}
			return 0
		}
	}
	var pretty bytes.Buffer
	if json.Indent(&pretty, out, "", "  ") == nil {
		out = pretty.Bytes()
	}
	stdout.Write(bytes.TrimRight(out, "\n"))
	fmt.Fprintln(stdout)
	if sub == "firmware-update" {
		// The report is printed either way; the exit status says whether
		// the update took.
		var rep hub.FirmwareReport
		if json.Unmarshal(out, &rep) == nil && rep.Result != "success" {
			fmt.Fprintf(stderr, "outpost hub firmware-update: %s\n", rep.Result)
			return 1
		}
	}
	return 0
}

// reorderFlags puts flags before positional arguments, so that both
// "invoke dev m --payload x" and "invoke --payload x dev m" parse; a
// boolean flag takes no separate value.
func reorderFlags(fs *flag.FlagSet, args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || len(a) == 1 {
			pos = append(pos, a)
			continue
		}
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if strings.Contains(name, "=") {
			continue
		}
		if f := fs.Lookup(name); f != nil {
			if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
				continue
			}
		}
		if i+1 < len(args) {
			flags = append(flags, args[i+1])
			i++
		}
	}
	return append(flags, pos...)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
