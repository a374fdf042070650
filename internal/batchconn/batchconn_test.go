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
	b := NewBuffered(client)
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

// TestBufferedReads reads packets that the peer wrote back to back through
// the read buffer, in the small reads paho makes.
func TestBufferedReads(t *testing.T) {
	client, server := net.Pipe()
	b := NewBuffered(client)
	defer b.Close()
	const N = 1000
	go func() {
		var all bytes.Buffer
		for i := range N {
			ack := &packets.Puback{PacketID: uint16(i + 1), Properties: &packets.Properties{}}
			if _, err := ack.WriteTo(&all); err != nil {
				t.Error(err)
			}
		}
		_, _ = server.Write(all.Bytes())
		server.Close()
	}()
	for i := range N {
		cp, err := packets.ReadPacket(b)
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if ack, ok := cp.Content.(*packets.Puback); !ok || ack.PacketID != uint16(i+1) {
			t.Fatalf("packet %d: got %v", i, cp)
		}
	}
	if _, err := packets.ReadPacket(b); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last packet: %v, want EOF", err)
	}
}
