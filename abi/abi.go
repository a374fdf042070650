// Package abi is the contract between the Outpost host and its wasm
// handlers, ABI version 1: the names of the exports and imports, the status
// and error codes, and the request metadata envelope. abi/ABI.md is the
// normative specification; this package follows it.
//
// The package uses the standard library only and builds for GOOS=wasip1, so
// the host and Go guests share one codec.
package abi

// Version is the ABI major version. It appears in the import module names
// and in the marker export.
const Version = 1

// Import modules. Module is granted to every handler; each of the others is
// a capability the manifest must request and the operator grant.
const (
	Module     = "outpost_v1"
	ModuleKV   = "outpost_kv_v1"
	ModuleMQTT = "outpost_mqtt_v1"
	ModuleBlob = "outpost_blob_v1"
	ModuleHTTP = "outpost_http_v1"
	ModuleDM   = "outpost_dm_v1"
	ModuleTwin = "outpost_twin_v1"
)

// Exports a handler module provides.
const (
	ExportMemory  = "memory"
	ExportMarker  = "outpost_abi_v1" // () -> (); never called
	ExportInit    = "outpost_init"   // (cfg_len i32) -> i32; optional
	ExportHandle  = "outpost_handle" // (meta_len i32, payload_len i32) -> i32
	ExportIdle    = "outpost_idle"   // () -> (); optional
	ExportReactor = "_initialize"    // () -> (); WASI reactor start, when present
)

// Functions of Module.
const (
	FuncReqMeta      = "req_meta"      // (buf, limit i32) -> len i32
	FuncReqPayload   = "req_payload"   // (buf, limit, offset i32) -> n i32
	FuncRespWrite    = "resp_write"    // (ptr, len i32) -> rc i32
	FuncRespSetProp  = "resp_set_prop" // (kptr, klen, vptr, vlen i32) -> rc i32
	FuncRespSetCType = "resp_set_content_type"
	FuncCfgRead      = "cfg_read"    // (buf, limit i32) -> len i32
	FuncLog          = "log"         // (level, ptr, len i32) -> ()
	FuncLogEnabled   = "log_enabled" // (level i32) -> i32
)

// Functions of ModuleKV and ModuleMQTT.
const (
	FuncKVGet    = "kv_get"    // (kptr, klen, buf, limit i32) -> len i32
	FuncKVSet    = "kv_set"    // (kptr, klen, vptr, vlen i32) -> rc i32
	FuncKVDelete = "kv_delete" // (kptr, klen i32) -> rc i32
	FuncPublish  = "publish"   // (tptr, tlen, pptr, plen, qos i32) -> rc i32
)

// Functions of ModuleBlob, ModuleHTTP and ModuleDM (sections 6.4 to 6.6).
const (
	FuncBlobSize   = "blob_size"   // (nptr, nlen i32) -> size i64
	FuncBlobRead   = "blob_read"   // (nptr, nlen, buf, limit i32, offset i64) -> n i32
	FuncBlobDelete = "blob_delete" // (nptr, nlen i32) -> rc i32
	FuncHTTPGet    = "http_get"    // (uptr, ulen, nptr, nlen i32) -> size i64
	FuncProgress   = "progress"    // (percent, mptr, mlen i32) -> rc i32
	FuncTwinGet    = "twin_get"    // (buf, limit i32) -> len i32
	FuncTwinReport = "twin_report" // (ptr, len i32) -> rc i32
)

// Key/value size limits (section 6.2).
const (
	MaxKVKey   = 256      // bytes; a longer or empty key is E_BADARG
	MaxKVValue = 64 << 10 // bytes; a longer value is E_LIMIT
)

// Status is the outcome of a request, HTTP-like. A handler returns it from
// outpost_handle; the host produces the ones marked "host".
type Status int32

// Status codes.
const (
	StatusOK                  Status = 200
	StatusAccepted            Status = 202 // a long action goes on after the response
	StatusNoContent           Status = 204
	StatusBadRequest          Status = 400
	StatusNotFound            Status = 404
	StatusConflict            Status = 409
	StatusRequestTooLarge     Status = 413 // host: the request is over the plugin's limit
	StatusUnprocessable       Status = 422
	StatusTooManyRequests     Status = 429 // host: the plugin's queue is full
	StatusInternal            Status = 500 // host: the handler trapped or broke the ABI
	StatusNotImplemented      Status = 501 // host: no handler claims the name
	StatusUnavailable         Status = 503 // host: the plugin is not loaded or its breaker is open
	StatusTimeout             Status = 504 // host: the deadline passed
	StatusInsufficientStorage Status = 507 // host: the response or memory limit was hit
)

// Valid reports whether a handler may return s: 100 to 599.
func (s Status) Valid() bool { return s >= 100 && s <= 599 }

// Errno is the negative result of a host function that failed.
type Errno int32

// Host function errors.
const (
	ErrLimit       Errno = -1 // a size, quota or rate limit was hit
	ErrNotFound    Errno = -2
	ErrBadArg      Errno = -3
	ErrDenied      Errno = -4 // not allowed by the plugin's grants
	ErrInternal    Errno = -5
	ErrUnavailable Errno = -6
)

func (e Errno) Error() string {
	switch e {
	case ErrLimit:
		return "abi: limit exceeded"
	case ErrNotFound:
		return "abi: not found"
	case ErrBadArg:
		return "abi: bad argument"
	case ErrDenied:
		return "abi: denied"
	case ErrInternal:
		return "abi: host internal error"
	case ErrUnavailable:
		return "abi: unavailable"
	}
	return "abi: unknown error"
}

// Log levels for FuncLog.
const (
	LogTrace = 0
	LogDebug = 1
	LogInfo  = 2
	LogWarn  = 3
	LogError = 4
)
