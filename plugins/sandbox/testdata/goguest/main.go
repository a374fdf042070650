// A Go handler for the sandbox's tests: well-behaved methods beside
// hostile ones.
package main

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/abi/guest"
)

var hold [][]byte // what "alloc" keeps

func init() {
	guest.Method("echo", func(r *guest.Request) guest.Response {
		resp := guest.Response{Status: 200, Body: r.Payload(), ContentType: r.ContentType, Props: r.Props}
		return resp.With("deadline-ms", strconv.FormatInt(r.Deadline.Milliseconds(), 10))
	})
	guest.Command("fail", func(r *guest.Request) guest.Response {
		return guest.Error(422, errors.New("refused: "+string(r.Payload())))
	})
	// flaky is busy on its first delivery (503: an Azure command is then
	// abandoned) and done on the next.
	guest.Command("flaky", func(r *guest.Request) guest.Response {
		if r.Prop("delivery-count") == "1" {
			return guest.Text(503, "busy, try again")
		}
		return guest.Text(200, "done on delivery "+r.Prop("delivery-count"))
	})
	guest.Command("ok", func(r *guest.Request) guest.Response { return guest.Status(200) })
	// device.reboot agrees to a reboot of the device itself, and refuses
	// one of a child device.
	guest.DMAction("device.reboot", func(r *guest.Request) guest.Response {
		if id := r.Prop("device-id"); id != "" && strings.HasPrefix(id, "child") {
			return guest.Text(409, "the child is busy")
		}
		return guest.Status(202)
	})
	guest.Method("sleep", func(r *guest.Request) guest.Response {
		d, err := time.ParseDuration(string(r.Payload()))
		if err != nil {
			return guest.Error(400, err)
		}
		time.Sleep(d)
		return guest.Text(200, "slept "+d.String())
	})
	guest.Method("alloc", func(r *guest.Request) guest.Response {
		for {
			hold = append(hold, make([]byte, 1<<20))
		}
	})
	guest.Method("loop", func(r *guest.Request) guest.Response {
		for {
		}
	})
	guest.Method("panic", func(r *guest.Request) guest.Response {
		panic("handler panicked")
	})
	guest.Method("big", func(r *guest.Request) guest.Response {
		n, _ := strconv.Atoi(string(r.Payload()))
		return guest.Response{Status: 200, Body: make([]byte, n)}
	})
	// escape tries what the sandbox must not allow: files and the
	// environment. It answers 200 only if all of them fail. (Go on wasip1
	// has no sockets at all, so the network is not tried here.)
	guest.Method("escape", func(r *guest.Request) guest.Response {
		if b, err := os.ReadFile("/etc/passwd"); err == nil {
			return guest.Text(500, "read /etc/passwd: "+strconv.Itoa(len(b))+" bytes")
		}
		if err := os.WriteFile("/tmp/outpost-escape", []byte("x"), 0o600); err == nil {
			return guest.Text(500, "wrote /tmp/outpost-escape")
		}
		if len(os.Environ()) > 0 {
			return guest.Text(500, "environment: "+strings.Join(os.Environ(), " "))
		}
		return guest.Text(200, "contained")
	})
	guest.Method("log", func(r *guest.Request) guest.Response {
		n, _ := strconv.Atoi(string(r.Payload()))
		for i := range n {
			guest.Logf(2, "line %d", i)
		}
		return guest.Status(204)
	})
}

func main() {}
