package batchconn

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
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
