// A Go handler for the sandbox's tests of the blob, http, dm and twin
// capabilities: each method calls one host function and answers its
// result, an error's code as the status 400 + the errno's magnitude.
package main

import (
	"errors"
	"strconv"
	"strings"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/abi/guest"
)

// failed answers a host function's error: 400 + its magnitude (E_LIMIT
// 401, E_NOT_FOUND 402, E_BADARG 403, E_DENIED 404, E_INTERNAL 405,
// E_UNAVAILABLE 406).
func failed(err error) guest.Response {
	var e abi.Errno
	if errors.As(err, &e) {
		return guest.Text(abi.Status(400-int(e)), err.Error())
	}
	return guest.Error(500, err)
}

func init() {
	// blob.read: payload "NAME OFFSET LIMIT".
	guest.Method("blob.read", func(r *guest.Request) guest.Response {
		f := strings.Fields(string(r.Payload()))
		off, _ := strconv.ParseInt(f[1], 10, 64)
		limit, _ := strconv.Atoi(f[2])
		buf := make([]byte, limit)
		n, err := guest.BlobRead(f[0], buf, off)
		if err != nil {
			return failed(err)
		}
		return guest.Response{Status: 200, Body: buf[:n]}
	})
	guest.Method("blob.size", func(r *guest.Request) guest.Response {
		n, err := guest.BlobSize(string(r.Payload()))
		if err != nil {
			return failed(err)
		}
		return guest.Text(200, strconv.FormatInt(n, 10))
	})
	guest.Method("blob.delete", func(r *guest.Request) guest.Response {
		if err := guest.BlobDelete(string(r.Payload())); err != nil {
			return failed(err)
		}
		return guest.Status(204)
	})
	// http.get: payload "URL BLOB".
	guest.Method("http.get", func(r *guest.Request) guest.Response {
		f := strings.Fields(string(r.Payload()))
		n, err := guest.HTTPGet(f[0], f[1])
		if err != nil {
			return failed(err)
		}
		return guest.Text(200, strconv.FormatInt(n, 10))
	})
	// progress: payload "PERCENT MESSAGE".
	guest.Method("progress", func(r *guest.Request) guest.Response {
		pct, msg, _ := strings.Cut(string(r.Payload()), " ")
		n, _ := strconv.Atoi(pct)
		if err := guest.Progress(n, msg); err != nil {
			return failed(err)
		}
		return guest.Status(204)
	})
	guest.Method("twin.get", func(r *guest.Request) guest.Response {
		b, err := guest.TwinGet()
		if err != nil {
			return failed(err)
		}
		return guest.Response{Status: 200, Body: b}
	})
	guest.Method("twin.report", func(r *guest.Request) guest.Response {
		if err := guest.TwinReport(r.Payload()); err != nil {
			return failed(err)
		}
		return guest.Status(202)
	})
}

func main() {}
