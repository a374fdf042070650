// A test handler granted the twin capability: it reads the device state
// and reports patches.
package main

import (
	"errors"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/abi/guest"
)

func init() {
	guest.Method("twin.get", func(r *guest.Request) guest.Response {
		doc, err := guest.TwinGet()
		if err != nil {
			return guest.Error(503, err)
		}
		return guest.Response{Status: 200, Body: doc, ContentType: "application/json"}
	})
	guest.Method("twin.report", func(r *guest.Request) guest.Response {
		err := guest.TwinReport(r.Payload())
		switch {
		case errors.Is(err, abi.ErrBadArg):
			return guest.Error(400, err)
		case err != nil:
			return guest.Error(500, err)
		}
		return guest.Status(202)
	})
}

func main() {}
