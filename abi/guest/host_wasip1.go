//go:build wasip1

package guest

import (
	"runtime"
	"unsafe"

	"github.com/outpost-edge/outpost/abi"
)

//go:wasmimport outpost_v1 req_meta
func reqMeta(buf unsafe.Pointer, limit uint32) int32

//go:wasmimport outpost_v1 req_payload
func reqPayload(buf unsafe.Pointer, limit, offset uint32) int32

//go:wasmimport outpost_v1 resp_write
func respWrite(ptr unsafe.Pointer, n uint32) int32

//go:wasmimport outpost_v1 resp_set_prop
func respSetProp(kp unsafe.Pointer, kl uint32, vp unsafe.Pointer, vl uint32) int32

//go:wasmimport outpost_v1 resp_set_content_type
func respSetContentType(ptr unsafe.Pointer, n uint32) int32

//go:wasmimport outpost_v1 cfg_read
func cfgRead(buf unsafe.Pointer, limit uint32) int32

//go:wasmimport outpost_v1 log
func logImport(level uint32, ptr unsafe.Pointer, n uint32)

//go:wasmimport outpost_v1 log_enabled
func logEnabledImport(level uint32) int32

//go:wasmexport outpost_abi_v1
func abiMarker() {}

// metaBuf is reused across requests; serve gets a string copy.
var metaBuf = make([]byte, 512)

//go:wasmexport outpost_handle
func outpostHandle(metaLen, payloadLen int32) int32 {
	if int(metaLen) > len(metaBuf) {
		metaBuf = make([]byte, metaLen)
	}
	n := reqMeta(unsafe.Pointer(unsafe.SliceData(metaBuf)), uint32(len(metaBuf)))
	if n < 0 || int(n) > len(metaBuf) {
		return int32(abi.StatusInternal)
	}
	return int32(serve(string(metaBuf[:n]), int(payloadLen), hostWriter{}))
}

//go:wasmexport outpost_init
func outpostInit(cfgLen int32) int32 {
	if initFn == nil {
		return 0
	}
	cfg := make([]byte, cfgLen)
	if cfgLen > 0 {
		if n := cfgRead(unsafe.Pointer(unsafe.SliceData(cfg)), uint32(cfgLen)); n != cfgLen {
			Log(abi.LogError, "reading the configuration failed")
			return 1
		}
	}
	if err := initFn(cfg); err != nil {
		Log(abi.LogError, "init: "+err.Error())
		return 1
	}
	return 0
}

//go:wasmexport outpost_idle
func outpostIdle() { runtime.Gosched() }

func readPayload(p []byte, offset int) int {
	if len(p) == 0 {
		return 0
	}
	n := reqPayload(unsafe.Pointer(unsafe.SliceData(p)), uint32(len(p)), uint32(offset))
	if n < 0 {
		return 0
	}
	return int(n)
}

type hostWriter struct{}

func (hostWriter) send(r Response) abi.Status {
	if r.ContentType != "" {
		respSetContentType(ptr(r.ContentType), uint32(len(r.ContentType)))
	}
	for _, p := range r.Props {
		if respSetProp(ptr(p.Key), uint32(len(p.Key)), ptr(p.Value), uint32(len(p.Value))) < 0 {
			break
		}
	}
	if len(r.Body) > 0 {
		respWrite(unsafe.Pointer(unsafe.SliceData(r.Body)), uint32(len(r.Body)))
	}
	return r.Status
}

func ptr(s string) unsafe.Pointer { return unsafe.Pointer(unsafe.StringData(s)) }

func hostLog(level int, msg string) { logImport(uint32(level), ptr(msg), uint32(len(msg))) }

func logEnabled(level int) bool { return logEnabledImport(uint32(level)) == 1 }
