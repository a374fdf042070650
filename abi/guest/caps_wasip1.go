//go:build wasip1

package guest

import (
	"unsafe"

	"github.com/outpost-edge/outpost/abi"
)

// These imports appear in a module only if it calls the functions below: a
// module that does not use the key/value store or publish does not need
// those capabilities.

//go:wasmimport outpost_kv_v1 kv_get
func kvGet(kp unsafe.Pointer, kl uint32, buf unsafe.Pointer, limit uint32) int32

//go:wasmimport outpost_kv_v1 kv_set
func kvSet(kp unsafe.Pointer, kl uint32, vp unsafe.Pointer, vl uint32) int32

//go:wasmimport outpost_kv_v1 kv_delete
func kvDelete(kp unsafe.Pointer, kl uint32) int32

//go:wasmimport outpost_mqtt_v1 publish
func publishImport(tp unsafe.Pointer, tl uint32, pp unsafe.Pointer, pl uint32, qos uint32) int32

func kvGetHost(key string) ([]byte, error) {
	buf := make([]byte, 256)
	for {
		n := kvGet(ptr(key), uint32(len(key)), unsafe.Pointer(unsafe.SliceData(buf)), uint32(len(buf)))
		if n < 0 {
			return nil, abi.Errno(n)
		}
		if int(n) <= len(buf) {
			return buf[:n], nil
		}
		buf = make([]byte, n)
	}
}

func kvSetHost(key string, value []byte) error {
	if rc := kvSet(ptr(key), uint32(len(key)), unsafe.Pointer(unsafe.SliceData(value)), uint32(len(value))); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}

func kvDeleteHost(key string) error {
	if rc := kvDelete(ptr(key), uint32(len(key))); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}

func publishHost(topic string, payload []byte, qos int) error {
	if rc := publishImport(ptr(topic), uint32(len(topic)), unsafe.Pointer(unsafe.SliceData(payload)), uint32(len(payload)), uint32(qos)); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}

//go:wasmimport outpost_http_v1 http_get
func httpGet(up unsafe.Pointer, ul uint32, np unsafe.Pointer, nl uint32) int64

//go:wasmimport outpost_blob_v1 blob_size
func blobSize(np unsafe.Pointer, nl uint32) int64

//go:wasmimport outpost_blob_v1 blob_read
func blobRead(np unsafe.Pointer, nl uint32, buf unsafe.Pointer, limit uint32, off int64) int32

//go:wasmimport outpost_blob_v1 blob_delete
func blobDelete(np unsafe.Pointer, nl uint32) int32

//go:wasmimport outpost_dm_v1 progress
func progressImport(percent uint32, mp unsafe.Pointer, ml uint32) int32

func httpGetHost(url, blob string) (int64, error) {
	n := httpGet(ptr(url), uint32(len(url)), ptr(blob), uint32(len(blob)))
	if n < 0 {
		return 0, abi.Errno(n)
	}
	return n, nil
}

func blobSizeHost(name string) (int64, error) {
	n := blobSize(ptr(name), uint32(len(name)))
	if n < 0 {
		return 0, abi.Errno(n)
	}
	return n, nil
}

func blobReadHost(name string, p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n := blobRead(ptr(name), uint32(len(name)), unsafe.Pointer(unsafe.SliceData(p)), uint32(len(p)), off)
	if n < 0 {
		return 0, abi.Errno(n)
	}
	return int(n), nil
}

func blobDeleteHost(name string) error {
	if rc := blobDelete(ptr(name), uint32(len(name))); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}

func progressHost(percent int, msg string) error {
	if rc := progressImport(uint32(percent), ptr(msg), uint32(len(msg))); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}

//go:wasmimport outpost_twin_v1 twin_get
func twinGet(buf unsafe.Pointer, limit uint32) int32

//go:wasmimport outpost_twin_v1 twin_report
func twinReport(p unsafe.Pointer, n uint32) int32

func twinGetHost() ([]byte, error) {
	buf := make([]byte, 4096)
	for {
		n := twinGet(unsafe.Pointer(unsafe.SliceData(buf)), uint32(len(buf)))
		if n < 0 {
			return nil, abi.Errno(n)
		}
		if int(n) <= len(buf) {
			return buf[:n], nil
		}
		buf = make([]byte, n)
	}
}

func twinReportHost(patch []byte) error {
	if rc := twinReport(unsafe.Pointer(unsafe.SliceData(patch)), uint32(len(patch))); rc < 0 {
		return abi.Errno(rc)
	}
	return nil
}
