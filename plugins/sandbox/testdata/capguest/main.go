// A Go handler for tests of the capabilities: the key/value store and
// publish.
package main

import (
	"errors"
	"strconv"
	"strings"

	"github.com/outpost-edge/outpost/abi"
	"github.com/outpost-edge/outpost/abi/guest"
)

func init() {
	// count adds one to the counter in the store and returns it.
	guest.Method("count", func(r *guest.Request) guest.Response {
		n := 0
		v, err := guest.KVGet("count")
		switch {
		case err == nil:
			n, _ = strconv.Atoi(string(v))
		case !errors.Is(err, abi.ErrNotFound):
			return guest.Error(500, err)
		}
		n++
		if err := guest.KVSet("count", []byte(strconv.Itoa(n))); err != nil {
			return guest.Error(500, err)
		}
		return guest.Text(200, strconv.Itoa(n))
	})
	// fill stores a value of the payload's size; over the quota it is 413.
	guest.Method("fill", func(r *guest.Request) guest.Response {
		n, _ := strconv.Atoi(string(r.Payload()))
		if err := guest.KVSet("fill", make([]byte, n)); err != nil {
			if errors.Is(err, abi.ErrLimit) {
				return guest.Error(413, err)
			}
			return guest.Error(500, err)
		}
		return guest.Status(204)
	})
	// publish publishes "TOPIC MESSAGE" at QoS 1; a refused topic is 403.
	guest.Method("publish", func(r *guest.Request) guest.Response {
		topic, msg, _ := strings.Cut(string(r.Payload()), " ")
		if err := guest.Publish(topic, []byte(msg), 1); err != nil {
			if errors.Is(err, abi.ErrDenied) || errors.Is(err, abi.ErrBadArg) {
				return guest.Error(403, err)
			}
			return guest.Error(500, err)
		}
		return guest.Status(204)
	})
}

func main() {}
