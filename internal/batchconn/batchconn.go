// Package batchconn coalesces the writes of a network connection.
package batchconn

import (
	"net"
	"sync"
	"time"
)

// Holder is implemented by the connections New returns.
type Holder interface {
	Hold() (release func(error))
}

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

type batchConn struct {
	net.Conn
	packet  sync.Mutex // held by a writer across the Writes of one packet
	mu      sync.Mutex
	cond    *sync.Cond
	buf     []byte // ready to send
	spare   []byte
	held    []*hold // writes made after each Hold, in order, until released
	pending int     // bytes in buf and held
	writing bool
	err     error
	closing bool // Close was called: no new writes
	expired bool // Close stopped waiting
}

// hold is one Hold: the writes made after it (and before the next Hold).
type hold struct {
	released bool
	err      error
	data     []byte
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
	for b.pending > maxPending && b.err == nil && !b.closing {
		b.cond.Wait()
	}
	if b.err != nil {
		return 0, b.err
	}
	if b.closing {
		return 0, net.ErrClosed
	}
	if n := len(b.held); n > 0 {
		b.held[n-1].data = append(b.held[n-1].data, p...)
	} else {
		b.buf = append(b.buf, p...)
	}
	b.pending += len(p)
	b.cond.Broadcast()
	return len(p), nil
}

// Hold keeps every write made after it from the peer until release is
// called: release(nil) lets them go (after those of earlier holds), and
// release(err) closes the connection instead, so that they are never sent.
// Writes made before Hold are not affected. A broker uses it to let an
// acknowledgement wait for a write to its store while it reads on. release
// may be called from any goroutine, at most once.
//
// A connection closed by release(err) may also lose writes made before the
// hold that were not sent yet; a broker's peer then sends again.
func (b *batchConn) Hold() (release func(error)) {
	h := &hold{}
	b.mu.Lock()
	b.held = append(b.held, h)
	b.mu.Unlock()
	return func(err error) {
		b.mu.Lock()
		defer b.mu.Unlock()
		h.released, h.err = true, err
		for len(b.held) > 0 && b.held[0].released {
			first := b.held[0]
			b.held[0] = nil
			b.held = b.held[1:]
			if first.err != nil && b.err == nil {
				b.err = first.err
				b.dropHeldLocked()
				_ = b.Conn.Close()
				break
			}
			b.buf = append(b.buf, first.data...)
		}
		if len(b.held) == 0 {
			b.held = nil
		}
		b.cond.Broadcast()
	}
}

// dropHeldLocked forgets the held writes. b.mu must be held.
func (b *batchConn) dropHeldLocked() {
	for _, h := range b.held {
		b.pending -= len(h.data)
	}
	b.held = nil
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
		b.pending -= len(out)
		b.spare, b.writing = out[:0], false
		if err != nil && b.err == nil {
			b.err = err
		}
		b.cond.Broadcast()
	}
}

// closeFlushTimeout bounds how long Close waits for queued bytes to go out.
const closeFlushTimeout = time.Second

// Close sends what is queued (a DISCONNECT, typically), waiting for held
// writes to be released, then closes. It waits at most closeFlushTimeout;
// writes still held then are dropped. Writes fail from the moment Close is
// called, as they would on a closed net.Conn: a writer learns from a failed
// write that its connection is gone.
func (b *batchConn) Close() error {
	_ = b.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
	t := time.AfterFunc(closeFlushTimeout, func() {
		b.mu.Lock()
		b.expired = true
		b.cond.Broadcast()
		b.mu.Unlock()
	})
	defer t.Stop()
	b.mu.Lock()
	b.closing = true // a writer that still has this connection must learn it is gone
	b.cond.Broadcast()
	for (len(b.buf) > 0 || b.writing || len(b.held) > 0) && b.err == nil && !b.expired {
		b.cond.Wait()
	}
	if b.err == nil {
		b.err = net.ErrClosed
	}
	b.dropHeldLocked()
	b.cond.Broadcast()
	b.mu.Unlock()
	return b.Conn.Close()
}
