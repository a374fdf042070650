package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/outpost-edge/outpost/runtime/rollout"
)

// PluginParams are the parameters of a remote plugin operation (see
// rollout.Params): name for all but list; uri, sha256 and manifest (or
// manifestUri with manifestSha256) for an install; signature when the
// device has trust keys.
type PluginParams struct {
	Name        string `json:"name,omitempty"`
	Version     string `json:"version,omitempty"`
	URI         string `json:"uri,omitempty"`
	SHA256      string `json:"sha256,omitempty"`
	Manifest    string `json:"manifest,omitempty"`
	ManifestURI string `json:"manifestUri,omitempty"`
	// ManifestSHA256 is the sha256 of the manifest at ManifestURI.
	ManifestSHA256 string `json:"manifestSha256,omitempty"`
	Signature      string `json:"signature,omitempty"`
}

// PluginResult is a device's answer to a remote plugin operation: the
// method's response-code (Azure) or the DM response's rc (Watson), the
// error or message, and an Azure method's JSON payload.
type PluginResult struct {
	Status  int             `json:"status"`
	Message string          `json:"message,omitempty"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// pluginMethods are the Azure methods of the plugin operations.
var pluginMethods = map[string]string{
	rollout.ActionInstall: rollout.MethodInstall, rollout.ActionRollback: rollout.MethodRollback,
	rollout.ActionRemove: rollout.MethodRemove, rollout.ActionList: rollout.MethodList,
}

// Plugin runs a remote plugin operation (install, rollback, remove, list)
// on a device and waits for its answer (at most timeout; 0 = the hub's
// default): on an Azure device the direct method (pluginInstall...), on
// a Watson device (TYPE:ID) the custom action outpost-plugins/ACTION.
func (h *Hub) Plugin(ctx context.Context, deviceID, action string, p PluginParams, timeout time.Duration) (PluginResult, error) {
	method, ok := pluginMethods[action]
	if !ok {
		return PluginResult{}, errString(fmt.Sprintf("hub: plugin operation %q: want install, rollback, remove or list", action))
	}
	if h.isWatson(deviceID) {
		var fields []map[string]string
		b, _ := json.Marshal(p)
		var m map[string]string
		_ = json.Unmarshal(b, &m)
		for k, v := range m {
			fields = append(fields, map[string]string{"field": k, "value": v})
		}
		sort.Slice(fields, func(i, j int) bool { return fields[i]["field"] < fields[j]["field"] })
		var d json.RawMessage
		if len(fields) > 0 {
			d, _ = json.Marshal(map[string]any{"fields": fields})
		}
		r, err := h.DMRequest(ctx, deviceID, "mgmt/custom/"+rollout.Bundle+"/"+action, d, timeout)
		if err != nil {
			return PluginResult{}, err
		}
		return PluginResult{Status: r.RC, Message: r.Message}, nil
	}
	b, _ := json.Marshal(p)
	r, err := h.Invoke(ctx, deviceID, method, b, timeout)
	if err != nil {
		return PluginResult{}, err
	}
	res := PluginResult{Status: r.Status}
	var e struct {
		Error string `json:"error"`
	}
	switch {
	case json.Unmarshal([]byte(r.Payload), &e) == nil && e.Error != "":
		res.Message = e.Error
	case json.Valid([]byte(r.Payload)):
		res.Payload = json.RawMessage(r.Payload)
	default:
		res.Message = r.Payload
	}
	return res, nil
}

// pluginRoutes serves the plugin operations and, with Options.Files, the
// files devices download: POST /api/devices/{id}/plugins/{action}
// (?timeout=, body PluginParams).
func (h *Hub) pluginRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /api/devices/{id}/plugins/{action}", func(w http.ResponseWriter, r *http.Request) {
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		var p PluginParams
		if len(body) > 0 {
			if err := json.Unmarshal(body, &p); err != nil {
				writeJSON(w, 400, map[string]string{"error": "want {\"name\", \"uri\", \"sha256\", \"manifest\" or \"manifestUri\", \"signature\", \"version\"}: " + err.Error()})
				return
			}
		}
		timeout, err := durationParam(r, "timeout")
		if err != nil {
			writeJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		res, err := h.Plugin(r.Context(), r.PathValue("id"), r.PathValue("action"), p, timeout)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, 200, res)
	})
}
