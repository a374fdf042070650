// Command outpost is the Outpost edge agent.
//
//	outpost run [flags]              run the agent
//	outpost config validate FILE     check a configuration file
//	outpost config print [FILE]      print the effective configuration
//	outpost plugin install|list|inspect|remove|rollback
//	outpost invoke NAME              call a handler through the running agent
//	outpost status [--json]          the running agent's state
//	outpost hub [serve|invoke|...]   the local hub emulator and its operator commands
//	outpost passwd                   hash a local broker password (read from stdin)
//	outpost version                  print the version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	gort "runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/runtime"
	"github.com/outpost-edge/outpost/runtime/logging"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func init() { runtime.Version = version }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `Outpost: the edge agent (local MQTT broker, durable store-and-forward, uplink).

Usage:
  outpost run [flags]              run the agent (see 'outpost run -h')
  outpost config validate FILE     check a configuration file, report every problem
  outpost config print [FILE]      print the effective configuration (defaults filled in)
  outpost plugin ...               install, list, inspect, remove, roll back wasm handlers
  outpost invoke NAME              call a handler through the running agent
  outpost status [--json]          the running agent's state: broker, backlog, uplink, plugins
  outpost hub ...                  run the local hub emulator, or act on it as the cloud (see 'outpost hub help')
  outpost passwd                   hash a local broker password read from stdin (see 'outpost passwd -h')
  outpost version                  print the version
`

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "config":
		return cmdConfig(args[1:], stdout, stderr)
	case "plugin":
		return cmdPlugin(args[1:], stdout, stderr)
	case "invoke":
		return cmdInvoke(args[1:], stdout, stderr)
	case "hub":
		return cmdHub(args[1:], stdout, stderr)
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "passwd":
		return cmdPasswd(args[1:], os.Stdin, stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "outpost", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "outpost: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// runFlags are the flags of 'outpost run'. Each can also be set with an
// OUTPOST_* environment variable (OUTPOST_UPSTREAM for --upstream); a flag
// on the command line wins.
type runFlags struct {
	config, listen, data, upstream, deviceID, durability, logLevel, logFormat string
	adminHTTP, hubListen, hubAPI                                              string
	hints, hub                                                                bool
	install                                                                   []string
}

func parseRunFlags(args []string, stderr io.Writer) (*runFlags, error) {
	fs := flag.NewFlagSet("outpost run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &runFlags{}
	fs.StringVar(&f.config, "config", "", "YAML configuration `file` (default: embedded defaults)")
	fs.StringVar(&f.listen, "listen", "", "local broker `address`, replaces the configured listeners (default 127.0.0.1:1883)")
	fs.StringVar(&f.data, "data", "", "data `directory` (default ./data)")
	fs.StringVar(&f.upstream, "upstream", "", "upstream broker `URL`, mqtt://host:port or mqtts://host:port (default: none, store only)")
	fs.StringVar(&f.deviceID, "device-id", "", "device `id` used upstream (default: host name)")
	fs.StringVar(&f.durability, "durability", "", "process (survives kill -9) or fsync (survives power loss)")
	fs.StringVar(&f.logLevel, "log-level", "", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "", "auto, text or json")
	fs.StringVar(&f.adminHTTP, "admin-http", "", "`address` of the read-only HTTP listener: /metrics, /healthz, /readyz, /v1/status (default: admin.http, off)")
	fs.BoolVar(&f.hints, "hints", false, "print what to try once the agent is ready")
	fs.BoolVar(&f.hub, "hub", false, "also run the local hub emulator (outpost hub) in this process, and connect the agent to it")
	fs.StringVar(&f.hubListen, "hub-listen", defaultHubMQTT, "with --hub: the hub's MQTT `address`")
	fs.StringVar(&f.hubAPI, "hub-api", defaultHubAPI, "with --hub: the hub's HTTP API `address`")
	fs.Func("install", "install or upgrade the plugin in `DIR` (manifest.yaml, module.wasm) before serving; repeatable", func(s string) error {
		f.install = append(f.install, s)
		return nil
	})
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: outpost run [flags]\n\nFlags (each also as an environment variable: --upstream is OUTPOST_UPSTREAM):")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	var envErr error
	fs.VisitAll(func(fl *flag.Flag) {
		env := "OUTPOST_" + strings.ToUpper(strings.ReplaceAll(fl.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && !set[fl.Name] {
			if err := fl.Value.Set(v); err != nil {
				envErr = errors.Join(envErr, fmt.Errorf("%s: %w", env, err))
			}
		}
	})
	return f, envErr
}

// loadConfig builds the effective configuration: defaults, then the file,
// then the flags.
func (f *runFlags) loadConfig() (runtime.Config, error) {
	cfg := runtime.DefaultConfig()
	if f.config != "" {
		var err error
		if cfg, err = runtime.LoadConfig(f.config); err != nil {
			return cfg, err
		}
	}
	if f.listen != "" {
		cfg.Broker.Listeners = []runtime.ListenerConfig{{Address: f.listen}}
	}
	if f.data != "" {
		cfg.DataDir = f.data
	}
	if f.upstream != "" {
		cfg.Uplink.URL = f.upstream
	}
	if f.deviceID != "" {
		cfg.DeviceID = f.deviceID
	}
	if f.durability != "" {
		cfg.Storage.Durability = f.durability
	}
	if f.logLevel != "" {
		cfg.Log.Level = f.logLevel
	}
	if f.logFormat != "" {
		cfg.Log.Format = f.logFormat
	}
	if f.adminHTTP != "" {
		cfg.Admin.HTTP = f.adminHTTP
	}
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	f, err := parseRunFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "outpost run:", err)
		return 2
	}
	// SIGHUP from now on reloads, once the agent runs; until then it waits
	// here rather than killing the process (its default).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	cfg, err := f.loadConfig()
	if err != nil {
		fmt.Fprintf(stderr, "outpost run: %s\n", indentErr(err))
		return 2
	}
	logger := newLogger(cfg.Log, stderr, cfg.Secrets()...)
	log := logger.Logger
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set && cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(int64(cfg.MemoryLimit))
	}

	// OUTPOST_CPUPROFILE=FILE writes a CPU profile until shutdown, for
	// finding where the time goes under load.
	if path := os.Getenv("OUTPOST_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			log.Error("cpu profile", "error", err)
			return 1
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var lh *localHub
	if f.hub {
		if lh, err = startLocalHub(&cfg, f.hubListen, f.hubAPI, log); err != nil {
			log.Error("cannot start the local hub", "error", err)
			return 1
		}
		defer func() {
			if err := lh.h.Close(); err != nil {
				log.Error("local hub: close", "error", err)
			}
		}()
	}
	agent, err := runtime.New(cfg, log)
	if err != nil {
		log.Error("cannot start", "error", err)
		return 1
	}
	for _, dir := range f.install {
		req, _, err := installRequest(filepath.Join(dir, "manifest.yaml"), filepath.Join(dir, "module.wasm"), optional(filepath.Join(dir, "manifest.sig")))
		if err == nil {
			_, err = agent.Plugins().Install(ctx, []byte(req.Manifest), req.Wasm, []byte(req.Signature))
		}
		if err != nil {
			log.Error("cannot install a plugin", "dir", dir, "error", err)
			_ = agent.Close(context.Background())
			return 1
		}
	}
	if err := agent.Start(); err != nil {
		log.Error("cannot start", "error", err)
		_ = agent.Close(context.Background())
		return 1
	}
	if f.hints {
		var handlers []string
		for _, p := range agent.Plugins().List() {
			for _, h := range p.Handlers {
				handlers = append(handlers, h.Kind+":"+h.Name)
			}
		}
		printHints(stdout, cfg, agent.BrokerAddrs()[0], agent.AdminHTTPAddr(), handlers, lh)
	}
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case <-hup:
			reload(f, agent, logger, lh)
		}
	}
	stop()
	// OUTPOST_MEMPROFILE=FILE writes a heap profile at shutdown, before the
	// agent closes, for finding what holds memory.
	if path := os.Getenv("OUTPOST_MEMPROFILE"); path != "" {
		if err := writeHeapProfile(path); err != nil {
			log.Error("heap profile", "error", err)
		}
	}
	log.Info("shutting down (signal again to force)")
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := agent.Close(closeCtx); err != nil {
		log.Error("shutdown", "error", err)
		return 1
	}
	return 0
}

// reload reads the configuration again (the file, then the same flags)
// and applies what can change while the agent runs; on any error the
// running configuration stays, and the log says why.
func reload(f *runFlags, agent *runtime.Agent, logger *logging.Logger, lh *localHub) {
	log := logger.Logger
	log.Info("SIGHUP: reloading the configuration", "file", f.config)
	next, err := f.loadConfig()
	if err == nil && lh != nil {
		err = lh.configure(&next)
	}
	if err != nil {
		log.Error("reload refused, the configuration is not valid; the running one stays", "error", err)
		return
	}
	changed, err := agent.Reload(next)
	if err != nil {
		log.Error("reload refused; the running configuration stays", "error", err)
		return
	}
	if err := logger.SetLevels(next.Log.Level, next.Log.Components); err != nil {
		log.Error("log levels not changed", "error", err)
	}
	if len(changed) == 0 {
		log.Info("reload: nothing changed")
	}
}

// optional returns path if the file exists, else "".
func optional(path string) string {
	if _, err := os.Stat(path); err != nil {
		return ""
	}
	return path
}

func cmdConfig(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "usage: outpost config validate FILE | outpost config print [FILE]\n")
		return 2
	}
	switch args[0] {
	case "validate":
		if len(args) != 2 {
			fmt.Fprint(stderr, "usage: outpost config validate FILE\n")
			return 2
		}
		cfg, err := runtime.LoadConfig(args[1])
		if err != nil {
			fmt.Fprintf(stderr, "%s\n", indentErr(err))
			return 1
		}
		for _, w := range cfg.Warnings() {
			fmt.Fprintf(stderr, "warning: %s\n", w)
		}
		fmt.Fprintf(stdout, "%s: valid\n", args[1])
		return 0
	case "print":
		cfg := runtime.DefaultConfig()
		if len(args) == 2 {
			var err error
			if cfg, err = runtime.LoadConfig(args[1]); err != nil {
				fmt.Fprintf(stderr, "%s\n", indentErr(err))
				return 1
			}
		}
		enc := yaml.NewEncoder(stdout)
		enc.SetIndent(2)
		if err := enc.Encode(cfg.Redacted()); err != nil {
			fmt.Fprintln(stderr, "outpost config print:", err)
			return 1
		}
		return 0
	default:
		fmt.Fprintf(stderr, "outpost config: unknown subcommand %q\n", args[0])
		return 2
	}
}

// indentErr puts each joined error on its own line.
func indentErr(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "\n  ")
}

// newLogger builds the agent's logger: c's format and levels, with the
// secrets redacted. The configuration was validated, so it cannot fail but
// for a bug; then the logger is plain JSON.
func newLogger(c runtime.LogConfig, w io.Writer, secrets ...string) *logging.Logger {
	l, err := logging.New(w, logging.Options{Format: c.Format, Level: c.Level, Components: c.Components, Secrets: secrets})
	if err != nil {
		l, _ = logging.New(w, logging.Options{Format: "json", Level: "info", Secrets: secrets})
		l.Error("log configuration", "error", err)
	}
	return l
}

func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	gort.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// firstMethod is the method the hints call with mosquitto_rr: the
// example's echo when it is installed, else the first method among handlers
// ("kind:name"), or "" when none is a method.
func firstMethod(handlers []string) string {
	for _, h := range handlers {
		if h == "method:echo" { // the example's, which any payload suits
			return "echo"
		}
	}
	for _, h := range handlers {
		if name, ok := strings.CutPrefix(h, "method:"); ok {
			return name
		}
	}
	return ""
}
