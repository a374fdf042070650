package hub

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"
)

// maxBody bounds a request body of the API.
const maxBody = 1 << 20

// DeviceInfo describes a device in the API.
type DeviceInfo struct {
	Dialect   string `json:"dialect"`
	ID        string `json:"id"`
	Connected bool   `json:"connected"`
}

// Devices lists the devices the hub knows.
func (h *Hub) Devices() []DeviceInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]DeviceInfo, 0, len(h.devices))
	for _, d := range h.devices {
		out = append(out, DeviceInfo{Dialect: d.dialect, ID: d.id, Connected: d.conn != nil})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Dialect+out[i].ID < out[j].Dialect+out[j].ID })
	return out
}

// routes is the operator's HTTP/JSON API. Errors are JSON
// {"error": "..."} with a status that says what kind.
func (h *Hub) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/devices", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, h.Devices()) })
	mux.HandleFunc("GET /api/stats", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, h.Stats()) })
	mux.HandleFunc("POST /api/devices/{id}/methods/{name}", h.apiInvoke)
	mux.HandleFunc("POST /api/devices/{id}/commands", h.apiSendCommand)
	mux.HandleFunc("GET /api/devices/{id}/commands", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, h.Commands(r.PathValue("id")))
	})
	mux.HandleFunc("GET /api/devices/{id}/twin", func(w http.ResponseWriter, r *http.Request) {
		doc, err := h.Twin(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(doc)
	})
	mux.HandleFunc("PATCH /api/devices/{id}/twin/desired", func(w http.ResponseWriter, r *http.Request) {
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		v, err := h.PatchDesired(r.PathValue("id"), body)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, map[string]int64{"version": v})
	})
	mux.HandleFunc("GET /api/telemetry", h.apiTelemetry)
	mux.HandleFunc("POST /api/faults", func(w http.ResponseWriter, r *http.Request) {
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		var f Fault
		if err := json.Unmarshal(body, &f); err != nil || f.Op == "" {
			writeJSON(w, 400, map[string]string{"error": "want a JSON fault: {\"device\":..., \"op\":..., \"status\":... or \"drop\":true, \"count\":...}"})
			return
		}
		h.AddFault(f)
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /api/offline", func(w http.ResponseWriter, _ *http.Request) {
		if err := h.Offline(); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, map[string]bool{"offline": true})
	})
	mux.HandleFunc("POST /api/online", func(w http.ResponseWriter, _ *http.Request) {
		if err := h.Online(); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, map[string]bool{"offline": false})
	})
	mux.HandleFunc("GET /files/{name}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		b, ok := h.o.Files[name]
		if !ok {
			if !h.serveFile(w, r, name) {
				http.NotFound(w, r)
			}
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, r.PathValue("name"), time.Time{}, bytes.NewReader(b))
	})
	h.watsonRoutes(mux)
	h.pluginRoutes(mux)
	return mux
}

func (h *Hub) apiInvoke(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	timeout, err := durationParam(r, "timeout")
	if err != nil {
		writeJSON(w, 400, map[string]string{"error": err.Error()})
		return
	}
	res, err := h.Invoke(r.Context(), r.PathValue("id"), r.PathValue("name"), body, timeout)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, 200, res)
}

func (h *Hub) apiSendCommand(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	wait, err := durationParam(r, "wait")
	if err != nil {
		writeJSON(w, 400, map[string]string{"error": err.Error()})
		return
	}
	id := r.PathValue("id")
	if h.isWatson(id) {
		err := h.WatsonCommand(id, r.URL.Query().Get("command"), r.URL.Query().Get("format"), body)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 202, map[string]string{"state": "sent"})
		return
	}
	props := map[string]string{}
	for k, v := range r.URL.Query() {
		if name, ok := strings.CutPrefix(k, "prop."); ok && len(v) > 0 {
			props["@"+name] = v[0]
		}
	}
	cmd, err := h.SendCommand(id, r.URL.Query().Get("command"), body, props)
	if err != nil {
		writeJSON(w, 429, map[string]string{"error": err.Error()})
		return
	}
	if wait <= 0 {
		writeJSON(w, 202, h.copyCommand(cmd))
		return
	}
	ctx, cancel := contextWithTimeout(r, wait)
	defer cancel()
	c, err := h.WaitCommand(ctx, cmd)
	if err != nil {
		writeJSON(w, 202, c) // not settled yet: still queued or delivered
		return
	}
	writeJSON(w, 200, c)
}

func (h *Hub) copyCommand(c *Command) Command {
	h.mu.Lock()
	defer h.mu.Unlock()
	return *c
}

// apiTelemetry returns the telemetry received, or with follow=1 streams
// it as JSON lines until the client goes.
func (h *Hub) apiTelemetry(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("follow") == "" {
		writeJSON(w, 200, h.Telemetry())
		return
	}
	ch, stop := h.Follow()
	defer stop()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(200)
	fl, _ := w.(http.Flusher)
	if fl != nil {
		fl.Flush()
	}
	enc := json.NewEncoder(w)
	for {
		select {
		case e, ok := <-ch:
			if !ok {
				return
			}
			if err := enc.Encode(e); err != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		case <-r.Context().Done():
			return
		}
	}
}

// isWatson reports whether an API device id names a Watson device
// (TYPE:ID) rather than an Azure one.
func (h *Hub) isWatson(id string) bool {
	h.mu.Lock()
	_, azure := h.devices["azure/"+id]
	h.mu.Unlock()
	return !azure && strings.Contains(id, ":")
}

func contextWithTimeout(r *http.Request, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), d)
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		writeJSON(w, 413, map[string]string{"error": fmt.Sprintf("request body: %v (at most %d bytes)", err, maxBody)})
		return nil, false
	}
	return b, true
}

func durationParam(r *http.Request, name string) (time.Duration, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%s=%q: want a duration such as 30s", name, s)
	}
	return d, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeErr maps the hub's errors to HTTP statuses.
func writeErr(w http.ResponseWriter, err error) {
	status := 500
	switch {
	case errors.Is(err, ErrNoDevice):
		status = 404
	case errors.Is(err, ErrOffline), errors.Is(err, ErrNotManaged):
		status = 409
	case errors.Is(err, ErrClosed):
		status = 503
	case errors.Is(err, ErrTimeout):
		status = 504
	case errors.As(err, new(errString)):
		status = 400
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// serveFile serves the regular file name of FilesDir: one path element,
// not hidden, opened through an os.Root so that neither ".." nor a
// symbolic link leads out of the directory. It reports false when there
// is no such file.
func (h *Hub) serveFile(w http.ResponseWriter, r *http.Request, name string) bool {
	if h.o.FilesDir == "" || name == "" || strings.ContainsAny(name, "/\\") || strings.HasPrefix(name, ".") {
		return false
	}
	root, err := os.OpenRoot(h.o.FilesDir)
	if err != nil {
		return false
	}
	defer root.Close()
	f, err := root.Open(name)
	if err != nil {
		return false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return false
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, name, fi.ModTime(), f)
	return true
}
