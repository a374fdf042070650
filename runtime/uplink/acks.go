package uplink

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// ackReader is the connection paho reads from. It takes the PUBACKs out of
// the stream and hands each one's packet identifier and reason code to
// onAck; every other packet passes through to paho unchanged.
//
// A forwarded message's PUBACK is the one packet that arrives per message.
// paho reads each packet into a fresh growing buffer (about 2 KB of garbage
// per PUBACK) and tracks each publish with a goroutine and a context; these
// were a third of the agent's allocations in a drain profile
// (docs/DECISIONS.md). The publish loop allocates packet identifiers and
// bounds the window by Receive Maximum itself, so paho's session never
// learns of the forwarded publishes and never waits for their PUBACKs.
//
// Only one goroutine may Read (paho's reader).
type ackReader struct {
	lockedConn
	r     *bufio.Reader
	pass  int // bytes of the current packet still to hand to paho
	onAck func(id uint16, reason byte, props []Property)
	// pace, when set, says how long to let PUBACKs gather before reading
	// the socket again once everything read is handled (see ackPace).
	pace func() time.Duration
}

// ackReadBuffer is the read buffer of an ackReader.
const ackReadBuffer = 32 << 10

func newAckReader(c lockedConn, raw net.Conn, onAck func(id uint16, reason byte, props []Property)) *ackReader {
	return &ackReader{lockedConn: c, r: bufio.NewReaderSize(raw, ackReadBuffer), onAck: onAck}
}

// errMalformedLength is returned for a fixed header whose remaining length
// does not end within four bytes [MQTT-1.5.5].
var errMalformedLength = errors.New("uplink: malformed packet: remaining length longer than 4 bytes")

const (
	typePuback = 4 // MQTT control packet type PUBACK
)

func (a *ackReader) Read(p []byte) (int, error) {
	for a.pass == 0 {
		if a.r.Buffered() == 0 && a.pace != nil {
			if d := a.pace(); d > 0 {
				time.Sleep(d)
			}
		}
		hlen, rlen, err := a.header()
		if err != nil {
			return 0, err
		}
		first, _ := a.r.Peek(1) // header succeeded: the byte is buffered
		if first[0]>>4 != typePuback {
			a.pass = hlen + rlen
			break
		}
		if rlen < 2 {
			return 0, errors.New("uplink: malformed PUBACK: shorter than a packet identifier")
		}
		// Packet identifier (2 bytes), then the reason code, absent when it
		// is 0 (success) [MQTT-3.4.2.1], then the properties, read only for
		// a refusal (they say why: Azure's status).
		body, err := a.r.Peek(hlen + min(rlen, 3))
		if err != nil {
			return 0, noEOF(err)
		}
		id := uint16(body[hlen])<<8 | uint16(body[hlen+1])
		reason := byte(0)
		if rlen > 2 {
			reason = body[hlen+2]
		}
		var props []Property
		if reason >= 0x80 && rlen > 3 && hlen+rlen <= ackReadBuffer {
			if body, err = a.r.Peek(hlen + rlen); err != nil {
				return 0, noEOF(err)
			}
			props = userProps(body[hlen+3:])
		}
		if _, err := a.r.Discard(hlen + rlen); err != nil {
			return 0, noEOF(err)
		}
		a.onAck(id, reason, props)
	}
	if len(p) > a.pass {
		p = p[:a.pass]
	}
	n, err := a.r.Read(p)
	a.pass -= n
	return n, err
}

// header reads ahead the fixed header of the next packet: its length, and
// the remaining length it announces.
func (a *ackReader) header() (hlen, rlen int, err error) {
	mult := 1
	for i := 1; i <= 4; i++ {
		b, err := a.r.Peek(i + 1)
		if err != nil {
			if i == 1 && len(b) == 0 {
				return 0, 0, err // clean end between packets
			}
			return 0, 0, noEOF(err)
		}
		rlen += int(b[i]&0x7f) * mult
		if b[i]&0x80 == 0 {
			return i + 1, rlen, nil
		}
		mult *= 128
	}
	return 0, 0, errMalformedLength
}

// userProps decodes the user properties of a PUBACK's property section;
// a malformed section gives none.
func userProps(b []byte) []Property {
	var pp packets.Properties
	if err := pp.Unpack(bytes.NewBuffer(b), packets.PUBACK); err != nil {
		return nil
	}
	props := make([]Property, len(pp.User))
	for i, u := range pp.User {
		props[i] = Property{Key: u.Key, Value: u.Value}
	}
	return props
}

// noEOF turns an end of stream inside a packet into io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
