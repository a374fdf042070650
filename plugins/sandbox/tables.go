package sandbox

import (
	"errors"
	"fmt"
)

// MaxTableElements bounds each table of a module: wazero keeps a table's
// elements in Go memory, 8 bytes each, outside the linear memory the
// memory limit counts, and lets table.grow go to 2^32 elements when the
// module declares no maximum. Go guests declare a table of a few thousand
// elements and never grow it.
const MaxTableElements = 1 << 20 // 8 MiB

// limitTables returns wasm with the maximum of every table it defines set
// to at most MaxTableElements, so that table.grow past it fails (returns
// -1) instead of taking the host's memory. A table whose minimum is above
// it is refused. wazero has no option for this, so the table section is
// rewritten; the rest of the module is copied as it is. A module that does
// not parse is returned unchanged, for the compiler to refuse.
func limitTables(wasm []byte) ([]byte, error) {
	if len(wasm) < 8 {
		return wasm, nil
	}
	out := append([]byte(nil), wasm[:8]...)
	changed := false
	for rest := wasm[8:]; len(rest) > 0; {
		id := rest[0]
		size, n := uleb(rest[1:])
		if n == 0 || uint64(len(rest)-1-n) < size {
			return wasm, nil
		}
		body := rest[1+n : 1+n+int(size)]
		section := rest[:1+n+int(size)]
		rest = rest[1+n+int(size):]
		if id != 4 { // not the table section
			out = append(out, section...)
			continue
		}
		nb, ok, err := limitTableSection(body)
		if err != nil {
			return nil, err
		}
		if !ok {
			return wasm, nil
		}
		out = append(out, id)
		out = appendUleb(out, uint64(len(nb)))
		out = append(out, nb...)
		changed = true
	}
	if !changed {
		return wasm, nil
	}
	return out, nil
}

var errTableTooLarge = errors.New("table too large")

// limitTableSection rewrites the body of a table section; ok is false when
// it does not parse.
func limitTableSection(b []byte) (out []byte, ok bool, err error) {
	count, n := uleb(b)
	if n == 0 {
		return nil, false, nil
	}
	b = b[n:]
	out = appendUleb(nil, count)
	for i := range count {
		// reftype, then limits: 0x00 min, or 0x01 min max.
		if len(b) < 2 || b[1] > 1 {
			return nil, false, nil
		}
		reftype, flags := b[0], b[1]
		b = b[2:]
		lo, n := uleb(b)
		if n == 0 {
			return nil, false, nil
		}
		b = b[n:]
		hi := uint64(MaxTableElements)
		if flags == 1 {
			max, n := uleb(b)
			if n == 0 {
				return nil, false, nil
			}
			b = b[n:]
			if max < lo {
				return nil, false, nil // invalid: for the compiler to say
			}
			hi = min(hi, max)
		}
		if lo > MaxTableElements {
			return nil, true, fmt.Errorf("%w: table %d has at least %d elements, at most %d allowed (8 bytes of host memory each)", errTableTooLarge, i, lo, MaxTableElements)
		}
		out = append(out, reftype, 1)
		out = appendUleb(out, lo)
		out = appendUleb(out, hi)
	}
	if len(b) != 0 {
		return nil, false, nil
	}
	return out, true, nil
}

// uleb decodes an unsigned LEB128 of at most 5 bytes (a u32); n is 0 when
// it is malformed.
func uleb(b []byte) (v uint64, n int) {
	for i := 0; i < len(b) && i < 5; i++ {
		v |= uint64(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			if v > 1<<32-1 {
				return 0, 0
			}
			return v, i + 1
		}
	}
	return 0, 0
}

func appendUleb(b []byte, v uint64) []byte {
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if v == 0 {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}
