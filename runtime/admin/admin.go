// Package admin is the agent's local administration API: HTTP with JSON
// bodies on a unix socket that only the agent's user can open. The outpost
// CLI (plugin install|list|remove|rollback|inspect, invoke) uses it.
//
//	GET    /v1/plugins                 installed plugins
//	GET    /v1/plugins/{name}          one plugin
//	PUT    /v1/plugins/{name}          install or upgrade: {"manifest", "wasm" (base64), "signature"}
//	DELETE /v1/plugins/{name}          remove
//	POST   /v1/plugins/{name}/rollback back to the version before
//	POST   /v1/invoke                  call a handler: {"kind", "name", "payload"}
//
// and the read-only observability routes the agent provides (Observe):
// GET /v1/status, /metrics, /healthz, /readyz. ListenHTTP serves only
// those, on TCP, for Prometheus and health checks.
//
// Errors are {"error": "..."} with a 4xx or 5xx status.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
)

// MaxBody bounds a request body (a base64 module).
const MaxBody = 96 << 20

// InstallRequest is the body of PUT /v1/plugins/{name}.
type InstallRequest struct {
	Manifest  string `json:"manifest"`            // the manifest's YAML
	Wasm      []byte `json:"wasm"`                // the module (base64 in JSON)
	Signature string `json:"signature,omitempty"` // the manifest.sig file
}

// InvokeRequest is the body of POST /v1/invoke.
type InvokeRequest struct {
	Kind        string         `json:"kind"` // method (default), command, dm_action
	Name        string         `json:"name"`
	Payload     []byte         `json:"payload,omitempty"` // base64 in JSON
	ContentType string         `json:"content_type,omitempty"`
	Props       []abi.Property `json:"props,omitempty"`
	TimeoutMS   int64          `json:"timeout_ms,omitempty"`
}

// InvokeResponse is the answer of POST /v1/invoke.
type InvokeResponse struct {
	Status      int            `json:"status"`
	Payload     []byte         `json:"payload,omitempty"`
	ContentType string         `json:"content_type,omitempty"`
	Props       []abi.Property `json:"props,omitempty"`
	Error       string         `json:"error,omitempty"`
	TookMS      float64        `json:"took_ms"`
}

// Server serves the API.
type Server struct {
	reg  *plugins.Registry
	log  *slog.Logger
	srv  *http.Server
	ln   net.Listener
	path string
}

// Listen binds the unix socket at path (mode 0600). A socket left by an
// agent that died is replaced; one that answers means another agent runs.
// observe, when not nil, serves the read-only routes (see the package
// documentation).
func Listen(path string, reg *plugins.Registry, observe http.Handler, log *slog.Logger) (*Server, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin: %s: another agent is listening there", path)
	}
	// Only a socket is replaced: a configured path that names a file of
	// another kind is an operator's mistake, not ours to delete.
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("admin: %s exists and is not a socket: choose another admin.socket", path)
		}
		_ = os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin: %w", err)
	}
	s := &Server{reg: reg, log: log, ln: ln, path: path}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/plugins", s.list)
	mux.HandleFunc("GET /v1/plugins/{name}", s.get)
	mux.HandleFunc("PUT /v1/plugins/{name}", s.install)
	mux.HandleFunc("DELETE /v1/plugins/{name}", s.remove)
	mux.HandleFunc("POST /v1/plugins/{name}/rollback", s.rollback)
	mux.HandleFunc("POST /v1/invoke", s.invoke)
	if observe != nil {
		for _, p := range ObservePaths {
			mux.Handle("GET "+p, observe)
		}
	}
	s.srv = &http.Server{Handler: http.MaxBytesHandler(mux, MaxBody), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin API stopped", "error", err)
		}
	}()
	return s, nil
}

// ObservePaths are the read-only routes.
var ObservePaths = []string{"/v1/status", "/metrics", "/healthz", "/readyz"}

// ListenHTTP serves the read-only routes of observe on the TCP address
// addr: the metrics and health checks, nothing that changes the agent.
func ListenHTTP(addr string, observe http.Handler, log *slog.Logger) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin: http: %w", err)
	}
	mux := http.NewServeMux()
	for _, p := range ObservePaths {
		mux.Handle("GET "+p, observe)
	}
	s := &Server{log: log, ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin HTTP listener stopped", "error", err)
		}
	}()
	log.Info("metrics and health checks listening", "address", ln.Addr().String())
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops the API and removes its socket, if any.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if s.path != "" {
		_ = os.Remove(s.path)
	}
	return err
}

func reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, status int, err error) {
	reply(w, status, map[string]string{"error": err.Error()})
}

func (s *Server) list(w http.ResponseWriter, _ *http.Request) { reply(w, 200, s.reg.List()) }

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	for _, p := range s.reg.List() {
		if p.Name == r.PathValue("name") {
			reply(w, 200, p)
			return
		}
	}
	fail(w, 404, fmt.Errorf("plugin %s is not installed", r.PathValue("name")))
}

func (s *Server) install(w http.ResponseWriter, r *http.Request) {
	var req InstallRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		fail(w, 400, fmt.Errorf("request body: %w", err))
		return
	}
	m, err := plugins.ParseManifest([]byte(req.Manifest))
	if err != nil {
		fail(w, 400, err)
		return
	}
	if m.Name != r.PathValue("name") {
		fail(w, 400, fmt.Errorf("the manifest is for plugin %s, not %s", m.Name, r.PathValue("name")))
		return
	}
	info, err := s.reg.Install(r.Context(), []byte(req.Manifest), req.Wasm, []byte(req.Signature))
	if err != nil {
		fail(w, status(err, 422), err)
		return
	}
	reply(w, 200, info)
}

func (s *Server) remove(w http.ResponseWriter, r *http.Request) {
	if err := s.reg.Remove(r.Context(), r.PathValue("name")); err != nil {
		fail(w, status(err, 500), err)
		return
	}
	reply(w, 200, map[string]string{"removed": r.PathValue("name")})
}

func (s *Server) rollback(w http.ResponseWriter, r *http.Request) {
	info, err := s.reg.Rollback(r.Context(), r.PathValue("name"))
	if err != nil {
		fail(w, status(err, 422), err)
		return
	}
	reply(w, 200, info)
}

// status is the HTTP status of a registry error, or otherwise.
func status(err error, otherwise int) int {
	switch {
	case errors.Is(err, plugins.ErrBadName):
		return 400
	case errors.Is(err, plugins.ErrNotInstalled), errors.Is(err, plugins.ErrNoPrevious):
		return 404
	case errors.Is(err, plugins.ErrClaimed):
		return 409
	}
	return otherwise
}

func (s *Server) invoke(w http.ResponseWriter, r *http.Request) {
	var req InvokeRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		fail(w, 400, fmt.Errorf("request body: %w", err))
		return
	}
	kind, ok := abi.KindMethod, true
	if req.Kind != "" {
		kind, ok = abi.ParseKind(req.Kind)
	}
	if !ok || req.Name == "" {
		fail(w, 400, fmt.Errorf("want a name and a kind of method, command or dm_action (got %q %q)", req.Kind, req.Name))
		return
	}
	start := time.Now()
	resp := s.reg.Call(r.Context(), &sandbox.Request{
		Meta: abi.Meta{Kind: kind, Name: req.Name, Flags: abi.FlagResponseExpected, ContentType: req.ContentType,
			Props: req.Props, Deadline: time.Duration(req.TimeoutMS) * time.Millisecond, RequestID: "outpost-invoke"},
		Payload: req.Payload,
	})
	out := InvokeResponse{Status: int(resp.Status), Payload: resp.Payload, ContentType: resp.ContentType, Props: resp.Props,
		TookMS: float64(time.Since(start).Microseconds()) / 1000}
	if resp.Err != nil {
		out.Error = resp.Err.Error()
	}
	reply(w, 200, out)
}
