// Package batchconn coalesces the writes of a network connection.
package batchconn

import (
	"bufio"
	"net"
	"sync"
	"time"
)

// New wraps c so that writes are coalesced: Write copies into a buffer and
// one writer goroutine sends whatever has accumulated in a single system
// call. When the link is idle a write goes out at once; under load, the
// packets queued while the previous write was in the kernel go out
// together. paho and mochi write one system call per packet otherwise,
// which profiles showed as their largest cost (docs/DECISIONS.md).
//
// Write errors surface on a later Write. Close sends what is queued, waiting
// at most a second, then closes c. The returned connection is safe for
// concurrent use.
//
// The returned connection is also a sync.Locker: a writer that sends one
// packet in several Writes holds Lock meanwhile so that no other writer's
// bytes land inside it. paho's packet writer does this for any sync.Locker.
func New(c net.Conn) net.Conn { return newBatchConn(c) }

// NewBuffered is New with buffered reads as well, for a reader that reads
// a packet in several small Reads (paho reads a fixed header byte by byte).
// Only one goroutine may read at a time.
func NewBuffered(c net.Conn) net.Conn {
	return &bufferedConn{batchConn: newBatchConn(c), r: bufio.NewReaderSize(c, readBufferSize)}
}

// readBufferSize is the read buffer of NewBuffered.
const readBufferSize = 32 << 10

type bufferedConn struct {
	*batchConn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

type batchConn struct {
	net.Conn
	packet  sync.Mutex // held by a writer across the Writes of one packet
	mu      sync.Mutex
	cond    *sync.Cond
	buf     []byte
	spare   []byte
	writing bool
	err     error
}

// maxPending bounds the bytes waiting to be written; Write blocks above it.
const maxPending = 256 << 10

func newBatchConn(c net.Conn) *batchConn {
	b := &batchConn{Conn: c}
	b.cond = sync.NewCond(&b.mu)
	go b.loop()
	return b
}

// Lock keeps other writers out until Unlock, so that several Writes reach the
// peer together and in order.
func (b *batchConn) Lock() { b.packet.Lock() }

// Unlock ends what Lock began.
func (b *batchConn) Unlock() { b.packet.Unlock() }

// Write queues p. It fails once the connection has failed or is closed.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.buf) > maxPending && b.err == nil {
		b.cond.Wait()
	}
	if b.err != nil {
		return 0, b.err
	}
	b.buf = append(b.buf, p...)
	b.cond.Broadcast()
	return len(p), nil
}

func (b *batchConn) loop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		for len(b.buf) == 0 && b.err == nil {
			b.cond.Wait()
		}
		if b.err != nil {
			return
		}
		out := b.buf
		b.buf, b.writing = b.spare[:0], true
		b.mu.Unlock()
		_, err := b.Conn.Write(out)
		b.mu.Lock()
		b.spare, b.writing = out[:0], false
		if err != nil && b.err == nil {
			b.err = err
		}
		b.cond.Broadcast()
	}
}

// closeFlushTimeout bounds how long Close waits for queued bytes to go out.
const closeFlushTimeout = time.Second

// Close sends what is queued (a DISCONNECT, typically), then closes.
func (b *batchConn) Close() error {
	_ = b.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
	b.mu.Lock()
	for (len(b.buf) > 0 || b.writing) && b.err == nil {
		b.cond.Wait()
	}
	if b.err == nil {
		b.err = net.ErrClosed
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	return b.Conn.Close()
}
