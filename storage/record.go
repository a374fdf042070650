package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Record layout (version 1), all integers unsigned varints unless noted:
//
//	version  1 byte (= 1)
//	flags    1 byte: bits 0-1 QoS, bit 2 retain, bit 3 payload is UTF-8, bit 4 has expiry
//	created  unix milliseconds
//	expires  unix milliseconds, present when bit 4 is set
//	topic, content type, response topic, correlation data: length + bytes
//	user properties: count, then key and value as length + bytes
//	payload: length + bytes
const recordVersion = 1

const (
	flagRetain  = 1 << 2
	flagUTF8    = 1 << 3
	flagExpires = 1 << 4
)

var errShort = errors.New("storage: record: truncated")

// encodeRecord appends the encoding of m to dst.
func encodeRecord(dst []byte, m *Message) []byte {
	flags := m.QoS & 3
	if m.Retain {
		flags |= flagRetain
	}
	if m.PayloadUTF8 {
		flags |= flagUTF8
	}
	if !m.Expires.IsZero() {
		flags |= flagExpires
	}
	dst = append(dst, recordVersion, flags)
	dst = binary.AppendUvarint(dst, uint64(max(m.Created.UnixMilli(), 0)))
	if !m.Expires.IsZero() {
		dst = binary.AppendUvarint(dst, uint64(max(m.Expires.UnixMilli(), 0)))
	}
	dst = appendBytes(dst, []byte(m.Topic))
	dst = appendBytes(dst, []byte(m.ContentType))
	dst = appendBytes(dst, []byte(m.ResponseTopic))
	dst = appendBytes(dst, m.CorrelationData)
	dst = binary.AppendUvarint(dst, uint64(len(m.UserProps)))
	for _, p := range m.UserProps {
		dst = appendBytes(dst, []byte(p.Key))
		dst = appendBytes(dst, []byte(p.Value))
	}
	return appendBytes(dst, m.Payload)
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

// decodeRecord decodes b into m. m's byte slices alias b.
func decodeRecord(b []byte, m *Message) error {
	if len(b) < 2 {
		return errShort
	}
	if b[0] != recordVersion {
		return fmt.Errorf("storage: record: unknown version %d", b[0])
	}
	flags := b[1]
	if flags&^(3|flagRetain|flagUTF8|flagExpires) != 0 || flags&3 == 3 {
		return fmt.Errorf("storage: record: bad flags 0x%02x", flags)
	}
	r := reader{b: b[2:]}
	m.QoS = flags & 3
	m.Retain = flags&flagRetain != 0
	m.PayloadUTF8 = flags&flagUTF8 != 0
	m.Created = time.UnixMilli(int64(r.uvarint() & (1<<62 - 1)))
	m.Expires = time.Time{}
	if flags&flagExpires != 0 {
		m.Expires = time.UnixMilli(int64(r.uvarint() & (1<<62 - 1)))
	}
	m.Topic = string(r.bytes())
	m.ContentType = string(r.bytes())
	m.ResponseTopic = string(r.bytes())
	m.CorrelationData = r.bytes()
	n := r.uvarint()
	if n > uint64(len(r.b)) { // each property takes at least 2 bytes
		return errShort
	}
	m.UserProps = nil
	if n > 0 {
		m.UserProps = make([]Property, 0, n)
		for range n {
			k, v := r.bytes(), r.bytes()
			m.UserProps = append(m.UserProps, Property{Key: string(k), Value: string(v)})
		}
	}
	m.Payload = r.bytes()
	if r.err != nil {
		return r.err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("storage: record: %d trailing bytes", len(r.b))
	}
	return nil
}

type reader struct {
	b   []byte
	err error
}

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errShort
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.err = errShort
		return nil
	}
	out := r.b[:n:n]
	r.b = r.b[n:]
	if n == 0 {
		return nil
	}
	return out
}

// A segment is the value of one message entry: the records of messages
// appended to one route in one commit, whose sequence numbers are
// consecutive, each as its length (uvarint) and the record. Entries written
// before segments existed hold one bare record (see parseKey).

// appendFramed appends one record to a segment.
func appendFramed(seg, rec []byte) []byte { return appendBytes(seg, rec) }

// splitSegment calls fn with each of the n records of a segment, in order,
// until fn returns false.
func splitSegment(v []byte, n int, fn func(i int, rec []byte) bool) error {
	r := reader{b: v}
	for i := range n {
		rec := r.bytes()
		if r.err == nil && len(rec) == 0 {
			r.err = errShort
		}
		if r.err != nil {
			return fmt.Errorf("storage: segment: record %d of %d: %w", i, n, r.err)
		}
		if !fn(i, rec) {
			return nil
		}
	}
	if len(r.b) != 0 {
		return fmt.Errorf("storage: segment: %d trailing bytes", len(r.b))
	}
	return nil
}
