package abi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// MetaVersion is the version of the metadata envelope this package writes.
// Readers accept any version from 1: a later version only adds fields at
// the end, which they skip.
const MetaVersion = 1

// Kind is what a request asks for.
type Kind uint8

// Request kinds.
const (
	KindCommand  Kind = 1
	KindMethod   Kind = 2
	KindDMAction Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindCommand:
		return "command"
	case KindMethod:
		return "method"
	case KindDMAction:
		return "dm_action"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// ParseKind is the Kind named s ("command", "method", "dm_action"), as
// Kind.String writes it.
func ParseKind(s string) (Kind, bool) {
	for _, k := range []Kind{KindCommand, KindMethod, KindDMAction} {
		if k.String() == s {
			return k, true
		}
	}
	return 0, false
}

// Flags qualify a request.
type Flags uint16

// Request flags. Bits not defined here are reserved: writers leave them
// zero, readers ignore them.
const (
	FlagResponseExpected Flags = 1 << 0 // the caller waits for the response
	FlagRedelivery       Flags = 1 << 1 // the transport delivered this request before
)

// Property is one request or response property (an MQTT 5 user property or
// a method header). Keys may repeat.
type Property struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Meta is a request's metadata: everything but the payload.
type Meta struct {
	Kind     Kind
	Flags    Flags
	Deadline time.Duration // the time left to answer, in whole milliseconds; 0 = none given
	// Name is the command, method or action name.
	Name string
	// RequestID identifies the request on its transport (correlation data,
	// $rid, a job id), for logs. Opaque.
	RequestID   string
	ContentType string // of the request payload
	Props       []Property
}

// Bounds of the envelope.
const (
	MaxString   = 1<<16 - 1 // bytes in one string
	MaxProps    = 1<<16 - 1
	MaxMetaSize = 64 << 10 // the whole envelope
	headerSize  = 8
)

// Errors of the codec.
var (
	ErrMetaShort   = errors.New("abi: meta: truncated")
	ErrMetaVersion = errors.New("abi: meta: version 0")
	ErrMetaTooBig  = errors.New("abi: meta: over the size limit")
)

// AppendMeta appends the encoding of m to dst. It fails if a string or the
// property count does not fit its 16-bit length, the deadline is negative
// or longer than 2^32-1 ms, or the envelope is over MaxMetaSize.
func AppendMeta(dst []byte, m *Meta) ([]byte, error) {
	start := len(dst)
	ms := m.Deadline.Milliseconds()
	if m.Deadline < 0 || ms > 1<<32-1 {
		return dst, fmt.Errorf("abi: meta: deadline %v out of range", m.Deadline)
	}
	if len(m.Props) > MaxProps {
		return dst, fmt.Errorf("abi: meta: %d properties, at most %d", len(m.Props), MaxProps)
	}
	dst = append(dst, MetaVersion, byte(m.Kind))
	dst = binary.LittleEndian.AppendUint16(dst, uint16(m.Flags))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(ms))
	var err error
	for _, f := range [...]struct{ name, s string }{{"name", m.Name}, {"request id", m.RequestID}, {"content type", m.ContentType}} {
		if dst, err = appendString(dst, f.name, f.s); err != nil {
			return dst[:start], err
		}
	}
	dst = binary.LittleEndian.AppendUint16(dst, uint16(len(m.Props)))
	for i, p := range m.Props {
		// The names of what is too long are made only on error: this runs
		// for every property of every call.
		if len(p.Key) > MaxString {
			return dst[:start], fmt.Errorf("abi: meta: property %d key is %d bytes, at most %d", i, len(p.Key), MaxString)
		}
		if len(p.Value) > MaxString {
			return dst[:start], fmt.Errorf("abi: meta: property %d value is %d bytes, at most %d", i, len(p.Value), MaxString)
		}
		dst, _ = appendString(dst, "", p.Key)
		dst, _ = appendString(dst, "", p.Value)
	}
	if len(dst)-start > MaxMetaSize {
		return dst[:start], fmt.Errorf("%w: %d bytes, at most %d", ErrMetaTooBig, len(dst)-start, MaxMetaSize)
	}
	return dst, nil
}

func appendString(dst []byte, what, s string) ([]byte, error) {
	if len(s) > MaxString {
		return dst, fmt.Errorf("abi: meta: %s is %d bytes, at most %d", what, len(s), MaxString)
	}
	dst = binary.LittleEndian.AppendUint16(dst, uint16(len(s)))
	return append(dst, s...), nil
}

// DecodeMeta decodes an envelope. Bytes after the fields of version 1 are
// ignored (they are fields of a later version). It copies what it keeps:
// the result does not alias b.
func DecodeMeta(b []byte) (Meta, error) { return decodeMeta(b) }

// DecodeMetaString is DecodeMeta for an envelope held in a string: the
// strings of the result are substrings of s, so decoding allocates nothing
// but the property slice. Guests use it to make one string per request.
func DecodeMetaString(s string) (Meta, error) { return decodeMeta(s) }

func decodeMeta[T string | []byte](b T) (Meta, error) {
	var m Meta
	if len(b) > MaxMetaSize {
		return m, fmt.Errorf("%w: %d bytes, at most %d", ErrMetaTooBig, len(b), MaxMetaSize)
	}
	if len(b) < headerSize {
		return m, ErrMetaShort
	}
	if b[0] == 0 {
		return m, ErrMetaVersion
	}
	m.Kind = Kind(b[1])
	m.Flags = Flags(u16(b[2:]))
	m.Deadline = time.Duration(uint32(b[4])|uint32(b[5])<<8|uint32(b[6])<<16|uint32(b[7])<<24) * time.Millisecond
	r := b[headerSize:]
	var ok bool
	if m.Name, r, ok = readString(r); !ok {
		return Meta{}, fmt.Errorf("%w: in the name", ErrMetaShort)
	}
	if m.RequestID, r, ok = readString(r); !ok {
		return Meta{}, fmt.Errorf("%w: in the request id", ErrMetaShort)
	}
	if m.ContentType, r, ok = readString(r); !ok {
		return Meta{}, fmt.Errorf("%w: in the content type", ErrMetaShort)
	}
	if len(r) < 2 {
		return Meta{}, fmt.Errorf("%w: in the property count", ErrMetaShort)
	}
	n := int(u16(r))
	r = r[2:]
	if n > len(r)/4 { // each property takes at least 4 bytes
		return Meta{}, fmt.Errorf("%w: %d properties in %d bytes", ErrMetaShort, n, len(r))
	}
	if n > 0 {
		m.Props = make([]Property, n)
	}
	for i := range n {
		var k, v string
		if k, r, ok = readString(r); ok {
			v, r, ok = readString(r)
		}
		if !ok {
			return Meta{}, fmt.Errorf("%w: in property %d", ErrMetaShort, i)
		}
		m.Props[i] = Property{k, v}
	}
	return m, nil
}

func u16[T string | []byte](b T) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }

// readString reads a length-prefixed string: a copy when b is a []byte, a
// substring when it is a string.
func readString[T string | []byte](b T) (string, T, bool) {
	if len(b) < 2 {
		return "", b, false
	}
	n := int(u16(b))
	if len(b) < 2+n {
		return "", b, false
	}
	return string(b[2 : 2+n]), b[2+n:], true
}
