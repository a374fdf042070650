package batchconn

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// TestBatchConnKeepsEveryWrite hammers a batchConn from several goroutines:
// the peer must receive every write whole, and each writer's writes in order.
func TestBatchConnKeepsEveryWrite(t *testing.T) {
	client, server := net.Pipe()
	b := newBatchConn(client)
	got := make(chan []byte, 1)
	go func() {
		data, _ := io.ReadAll(server)
		got <- data
	}()
	const P, N = 8, 500
	var wg sync.WaitGroup
	for p := range P {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range N {
				if _, err := fmt.Fprintf(b, "<%d:%04d>", p, i); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := b.Close(); err != nil { // must flush what is queued first
		t.Fatal(err)
	}
	data := <-got
	next := make([]int, P)
	for len(data) > 0 {
		var p, i int
		if _, err := fmt.Sscanf(string(data[:8]), "<%d:%04d>", &p, &i); err != nil {
			t.Fatalf("torn write near %q: %v", data[:min(len(data), 16)], err)
		}
		if i != next[p] {
			t.Fatalf("writer %d: got %d, want %d", p, i, next[p])
		}
		next[p]++
		data = data[8:]
	}
	for p, n := range next {
		if n != N {
			t.Fatalf("writer %d: %d of %d writes arrived", p, n, N)
		}
	}
}

func TestBatchConnFailsAfterPeerCloses(t *testing.T) {
	client, server := net.Pipe()
	b := newBatchConn(client)
	server.Close()
	// The failure surfaces on a later Write, once the writer has met it.
	var err error
	for deadline := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(deadline); {
		_, err = b.Write(bytes.Repeat([]byte("x"), 1024))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("writes kept succeeding on a closed connection")
	}
	if _, err := b.Write([]byte("x")); err == nil {
		t.Fatal("a write after the failure succeeded")
	}
	if err := b.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Logf("close: %v", err)
	}
}

// TestPahoPacketsStayWhole writes MQTT packets the way paho does (several
// Writes per packet, under the conn's lock when it is a sync.Locker) from
// several goroutines: every packet must arrive whole. The payloads are large
// so that writers often block mid-packet on a full buffer.
func TestPahoPacketsStayWhole(t *testing.T) {
	client, server := net.Pipe()
	b := New(client)
	if _, ok := b.(sync.Locker); !ok {
		t.Fatal("a batch conn is not a sync.Locker: paho would interleave packets")
	}
	const P, N = 6, 100
	done := make(chan error, 1)
	go func() {
		// On a torn packet, stop reading and close: the writers then fail
		// instead of blocking on a full buffer.
		defer server.Close()
		seen := 0
		for seen < P*N {
			cp, err := packets.ReadPacket(server)
			if err != nil {
				done <- fmt.Errorf("after %d packets: %w", seen, err)
				return
			}
			switch p := cp.Content.(type) {
			case *packets.Publish:
				if want := payloadOf(p.Topic); string(p.Payload) != want {
					done <- fmt.Errorf("packet torn: topic %q payload %q", p.Topic, p.Payload)
					return
				}
				seen++
			case *packets.Pingreq:
			default:
				done <- fmt.Errorf("unexpected packet %T", p)
				return
			}
		}
		done <- nil
	}()
	var wg sync.WaitGroup
	for g := range P {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range N {
				topic := fmt.Sprintf("w%d/m%d", g, i)
				pub := &packets.Publish{Topic: topic, Payload: []byte(payloadOf(topic)), QoS: 1, PacketID: uint16(i + 1), Properties: &packets.Properties{}}
				if _, err := pub.WriteTo(b); err != nil {
					return // the reader failed; it reports why
				}
				if i%10 == 0 {
					if _, err := packets.NewControlPacket(packets.PINGREQ).WriteTo(b); err != nil {
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader did not see every packet")
	}
	b.Close()
}

func payloadOf(topic string) string { return strings.Repeat(topic+";", 40<<10/len(topic)) }

// tcpPair returns a batchConn over a loopback TCP connection and the peer's
// end.
func tcpPair(t *testing.T) (*batchConn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	if peer == nil {
		t.Fatal("accept failed")
	}
	b := newBatchConn(c)
	t.Cleanup(func() { b.Close(); peer.Close() })
	return b, peer
}

// readFor returns what the peer receives within d.
func readFor(t *testing.T, c net.Conn, d time.Duration) string {
	t.Helper()
	var out []byte
	buf := make([]byte, 4096)
	_ = c.SetReadDeadline(time.Now().Add(d))
	for {
		n, err := c.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil {
			return string(out)
		}
	}
}

func write(t *testing.T, b *batchConn, s string) {
	t.Helper()
	if _, err := b.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

// TestHoldKeepsLaterWrites: writes after a Hold wait for its release, in
// order, even when holds are released out of order.
func TestHoldKeepsLaterWrites(t *testing.T) {
	b, peer := tcpPair(t)
	write(t, b, "a")
	r1 := b.Hold()
	write(t, b, "b")
	r2 := b.Hold()
	write(t, b, "c")
	if got := readFor(t, peer, 200*time.Millisecond); got != "a" {
		t.Fatalf("before any release the peer got %q, want %q", got, "a")
	}
	r2(nil)
	if got := readFor(t, peer, 200*time.Millisecond); got != "" {
		t.Fatalf("after releasing only the second hold the peer got %q, want nothing", got)
	}
	r1(nil)
	if got := readFor(t, peer, 2*time.Second); got != "bc" {
		t.Fatalf("after both releases the peer got %q, want %q", got, "bc")
	}
	write(t, b, "d")
	if got := readFor(t, peer, 2*time.Second); got != "d" {
		t.Fatalf("after the holds the peer got %q, want %q", got, "d")
	}
}

// TestHoldReleasedWithErrorCloses: a hold released with an error closes the
// connection; what was written after it never reaches the peer.
func TestHoldReleasedWithErrorCloses(t *testing.T) {
	b, peer := tcpPair(t)
	release := b.Hold()
	write(t, b, "never")
	failed := errors.New("store failed")
	release(failed)
	if got := readFor(t, peer, 2*time.Second); got != "" {
		t.Fatalf("peer got %q after a failed hold", got)
	}
	if _, err := b.Write([]byte("x")); !errors.Is(err, failed) {
		t.Fatalf("write after a failed hold: %v, want %v", err, failed)
	}
}

// TestCloseWaitsForHolds: Close sends held writes released while it waits,
// and gives up on the others after closeFlushTimeout.
func TestCloseWaitsForHolds(t *testing.T) {
	b, peer := tcpPair(t)
	release := b.Hold()
	write(t, b, "ack")
	time.AfterFunc(50*time.Millisecond, func() { release(nil) })
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readFor(t, peer, 2*time.Second); got != "ack" {
		t.Fatalf("peer got %q, want %q", got, "ack")
	}

	b2, peer2 := tcpPair(t)
	_ = b2.Hold() // never released
	write(t, b2, "lost")
	start := time.Now()
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < closeFlushTimeout/2 {
		t.Errorf("Close returned after %s with a hold outstanding", waited)
	}
	if got := readFor(t, peer2, time.Second); got != "" {
		t.Fatalf("peer got %q from a hold never released", got)
	}
}

// TestWriteFailsOnceClosing: from the moment Close is called, writes fail,
// even while Close still waits to flush.
func TestWriteFailsOnceClosing(t *testing.T) {
	b, _ := tcpPair(t)
	release := b.Hold()
	write(t, b, "held")
	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if _, err = b.Write([]byte("late")); err != nil {
			break
		}
	}
	if !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write during Close: %v, want net.ErrClosed", err)
	}
	release(nil)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}
