package sandbox

import "github.com/tetratelabs/wazero/experimental"

// limitedMemory backs one instance's linear memory and enforces the
// plugin's memory limit itself, so that the host knows when a guest asked
// for more: a Go guest that cannot grow its memory traps like any other
// trap.
type limitedMemory struct {
	limit   uint64
	buf     []byte
	refused bool // a grow past the limit was refused during the current call
}

func (m *limitedMemory) Reallocate(size uint64) []byte {
	if size > m.limit {
		m.refused = true
		return nil
	}
	if size <= uint64(cap(m.buf)) {
		m.buf = m.buf[:size]
		return m.buf
	}
	// Grow by at least a quarter, as append would, within the limit.
	c := min(max(size, uint64(cap(m.buf))+uint64(cap(m.buf))/4), m.limit)
	nb := make([]byte, size, c)
	copy(nb, m.buf)
	m.buf = nb
	return m.buf
}

func (m *limitedMemory) Free() { m.buf = nil }

var _ experimental.LinearMemory = (*limitedMemory)(nil)
