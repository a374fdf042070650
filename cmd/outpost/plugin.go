package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/admin"
)

const pluginUsage = `Usage:
  outpost plugin install DIR             install or upgrade the plugin in DIR (manifest.yaml, module.wasm, manifest.sig if signed)
  outpost plugin install --manifest F --wasm F [--sig F]
  outpost plugin list                    installed plugins, with their calls and failures
  outpost plugin inspect NAME            one installed plugin, as JSON
  outpost plugin inspect FILE.wasm       what a module exports, imports and asks for, without running it
                                         or reaching the agent
  outpost plugin remove NAME             stop serving it and delete it
  outpost plugin rollback NAME           reinstall the version before the last install
  outpost invoke NAME [--payload P] [--kind method|command|dm_action] [--timeout 5s]
                                         call a handler through the running agent

Each talks to the running agent's admin socket: --socket PATH, or $OUTPOST_SOCKET,
or ./data/outpost.sock (the default data directory), or else the installed agent's
/var/lib/outpost/outpost.sock.
`

// installedSocket is the admin socket of an agent that make install set
// up (examples/configs/outpost.yaml).
const installedSocket = "/var/lib/outpost/outpost.sock"

// adminClient calls the agent's admin API on its unix socket.
type adminClient struct {
	socket string
	http   *http.Client
}

func newAdminClient(socket string) *adminClient {
	if socket == "" {
		socket = os.Getenv("OUTPOST_SOCKET")
	}
	if socket == "" {
		// ./data (make run's), else the installed agent's.
		socket = filepath.Join("data", "outpost.sock")
		if _, err := os.Stat(socket); err != nil {
			if _, err := os.Stat(installedSocket); err == nil {
				socket = installedSocket
			}
		}
	}
	return &adminClient{socket: socket, http: &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

// do sends a request and decodes a 2xx answer into out; other answers
// become the error the API gave.
func (c *adminClient) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://outpost"+path, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the agent at %s (is it running? --socket sets the path): %w", c.socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e struct{ Error string }
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func cmdPlugin(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, pluginUsage)
		return 2
	}
	fs := flag.NewFlagSet("outpost plugin "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "the agent's admin `socket`")
	manifest := fs.String("manifest", "", "manifest `file` (install)")
	wasm := fs.String("wasm", "", "module `file` (install)")
	sig := fs.String("sig", "", "signature `file` of the manifest (install)")
	if err := fs.Parse(reorder(args[1:])); err != nil {
		return 2
	}
	c := newAdminClient(*socket)
	failed := func(err error) int { fmt.Fprintln(stderr, "outpost plugin "+args[0]+":", err); return 1 }
	one := func() (string, bool) {
		if fs.NArg() != 1 {
			fmt.Fprintf(stderr, "outpost plugin %s: want one plugin name\n\n%s", args[0], pluginUsage)
			return "", false
		}
		return fs.Arg(0), true
	}
	switch args[0] {
	case "install":
		if fs.NArg() == 1 {
			dir := fs.Arg(0)
			*manifest, *wasm = filepath.Join(dir, "manifest.yaml"), filepath.Join(dir, "module.wasm")
			*sig = optional(filepath.Join(dir, "manifest.sig"))
		}
		if *manifest == "" || *wasm == "" {
			fmt.Fprintf(stderr, "outpost plugin install: want DIR, or --manifest and --wasm\n\n%s", pluginUsage)
			return 2
		}
		req, name, err := installRequest(*manifest, *wasm, *sig)
		if err != nil {
			return failed(err)
		}
		var info plugins.Info
		if err := c.do("PUT", "/v1/plugins/"+name, req, &info); err != nil {
			return failed(err)
		}
		fmt.Fprintf(stdout, "installed %s %s (%d handlers, signed: %v)\n", info.Name, info.Version, len(info.Handlers), info.Signed)
		return 0
	case "list":
		var list []plugins.Info
		if err := c.do("GET", "/v1/plugins", nil, &list); err != nil {
			return failed(err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tVERSION\tHANDLERS\tCALLS\tFAILURES\tBREAKER\tSIGNED")
		for _, p := range list {
			var hs []string
			for _, h := range p.Handlers {
				hs = append(hs, h.Kind+":"+h.Name)
			}
			var failures int64
			for _, n := range p.Stats.Failures {
				failures += n
			}
			breaker := "closed"
			if p.Stats.BreakerOpen {
				breaker = "open"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%v\n", p.Name, p.Version, strings.Join(hs, ","), p.Stats.Calls, failures, breaker, p.Signed)
		}
		tw.Flush()
		return 0
	case "inspect":
		name, ok := one()
		if !ok {
			return 2
		}
		if strings.HasSuffix(name, ".wasm") {
			return inspectFile(name, stdout, stderr)
		}
		var info json.RawMessage
		if err := c.do("GET", "/v1/plugins/"+name, nil, &info); err != nil {
			return failed(err)
		}
		var pretty bytes.Buffer
		_ = json.Indent(&pretty, info, "", "  ")
		fmt.Fprintln(stdout, pretty.String())
		return 0
	case "remove":
		name, ok := one()
		if !ok {
			return 2
		}
		if err := c.do("DELETE", "/v1/plugins/"+name, nil, nil); err != nil {
			return failed(err)
		}
		fmt.Fprintln(stdout, "removed", name)
		return 0
	case "rollback":
		name, ok := one()
		if !ok {
			return 2
		}
		var info plugins.Info
		if err := c.do("POST", "/v1/plugins/"+name+"/rollback", nil, &info); err != nil {
			return failed(err)
		}
		fmt.Fprintf(stdout, "rolled back %s to %s\n", info.Name, info.Version)
		return 0
	}
	fmt.Fprintf(stderr, "outpost plugin: unknown command %q\n\n%s", args[0], pluginUsage)
	return 2
}

// installRequest reads a plugin's files. The manifest's sha256 must match
// the module: it is checked here to fail early, and again by the agent.
func installRequest(manifest, wasm, sig string) (admin.InstallRequest, string, error) {
	var req admin.InstallRequest
	man, err := os.ReadFile(manifest)
	if err != nil {
		return req, "", err
	}
	mod, err := os.ReadFile(wasm)
	if err != nil {
		return req, "", err
	}
	m, err := plugins.ParseManifest(man)
	if err != nil {
		return req, "", fmt.Errorf("%s: %w", manifest, err)
	}
	if err := m.CheckModule(mod); err != nil {
		sum := sha256.Sum256(mod)
		return req, "", fmt.Errorf("%w (if %s is the module you mean, set sha256: %s in %s)", err, wasm, hex.EncodeToString(sum[:]), manifest)
	}
	req = admin.InstallRequest{Manifest: string(man), Wasm: mod}
	if sig != "" {
		s, err := os.ReadFile(sig)
		if err != nil {
			return req, "", err
		}
		req.Signature = string(s)
	}
	return req, m.Name, nil
}

func cmdInvoke(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost invoke", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "the agent's admin `socket`")
	payload := fs.String("payload", "", "request payload; @FILE reads a file")
	kind := fs.String("kind", "method", "method, command or dm_action")
	timeout := fs.Duration("timeout", 0, "deadline (default: the plugin's)")
	if err := fs.Parse(reorder(args)); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(stderr, "outpost invoke: want one handler name\n\n%s", pluginUsage)
		return 2
	}
	body := []byte(*payload)
	if strings.HasPrefix(*payload, "@") {
		b, err := os.ReadFile((*payload)[1:])
		if err != nil {
			fmt.Fprintln(stderr, "outpost invoke:", err)
			return 1
		}
		body = b
	}
	var resp admin.InvokeResponse
	err := newAdminClient(*socket).do("POST", "/v1/invoke", admin.InvokeRequest{Kind: *kind, Name: fs.Arg(0), Payload: body, TimeoutMS: timeout.Milliseconds()}, &resp)
	if err != nil {
		fmt.Fprintln(stderr, "outpost invoke:", err)
		return 1
	}
	fmt.Fprintf(stderr, "status %d (%.2f ms)", resp.Status, resp.TookMS)
	if resp.ContentType != "" {
		fmt.Fprintf(stderr, ", %s", resp.ContentType)
	}
	for _, p := range resp.Props {
		fmt.Fprintf(stderr, ", %s=%s", p.Key, p.Value)
	}
	fmt.Fprintln(stderr)
	stdout.Write(resp.Payload)
	if len(resp.Payload) > 0 && resp.Payload[len(resp.Payload)-1] != '\n' {
		fmt.Fprintln(stdout)
	}
	if resp.Status >= 400 {
		return 1
	}
	return 0
}

// reorder puts flags before positional arguments, so that both
// "remove NAME --socket S" and "remove --socket S NAME" parse.
func reorder(args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") && len(a) > 1 {
			flags = append(flags, a)
			if !strings.Contains(a, "=") && i+1 < len(args) {
				flags = append(flags, args[i+1])
				i++
			}
			continue
		}
		pos = append(pos, a)
	}
	return append(flags, pos...)
}

// inspectFile prints what the module in path holds and asks for, offline.
// It exits 1 when the agent would refuse the module.
func inspectFile(path string, stdout, stderr io.Writer) int {
	wasm, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintln(stderr, "outpost plugin inspect:", err)
		return 1
	}
	e, err := sandbox.NewEngine("")
	if err != nil {
		fmt.Fprintln(stderr, "outpost plugin inspect:", err)
		return 1
	}
	defer e.Close(context.Background())
	info, err := e.Inspect(context.Background(), wasm)
	if err != nil {
		fmt.Fprintf(stderr, "outpost plugin inspect: %s: %v\n", path, err)
		return 1
	}
	out := struct {
		*sandbox.ModuleInfo
		Manifest []string `json:"manifest_capabilities"` // what its manifest must ask for
	}{ModuleInfo: info, Manifest: []string{}}
	for _, mod := range info.Capabilities {
		out.Manifest = append(out.Manifest, plugins.CapabilityOf(mod))
	}
	b, _ := json.MarshalIndent(out, "", "  ")
	fmt.Fprintln(stdout, string(b))
	if info.Problem != "" {
		fmt.Fprintf(stderr, "outpost plugin inspect: %s would be refused: %s\n", path, info.Problem)
		return 1
	}
	return 0
}
