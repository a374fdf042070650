package storage

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

type fakeClock struct{ ns atomic.Int64 }

func newClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) Now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Add(d time.Duration) { c.ns.Add(int64(d)) }
func open(t testing.TB, o Options) *Outbox {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Routes == nil {
		o.Routes = []Route{{Name: "r"}}
	}
	ob, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ob.Close() })
	return ob
}

func appendN(t testing.TB, ob *Outbox, route string, n int, payload string) []uint64 {
	t.Helper()
	var seqs []uint64
	for i := range n {
		m := &Message{Route: route, Topic: "t", QoS: 1, Payload: fmt.Appendf(nil, "%s%d", payload, i)}
		if err := ob.Append(m); err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, m.Seq)
	}
	return seqs
}

// drain reads everything with a cursor, acking as it goes.
func drain(t testing.TB, ob *Outbox, ack bool) []Message {
	t.Helper()
	c := Cursor{}
	var all []Message
	for {
		msgs, err := ob.Next(c, 7)
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) == 0 {
			return all
		}
		for _, m := range msgs {
			c[m.Route] = m.Seq
			if ack {
				if err := ob.Ack(Ref{m.Route, m.Seq}); err != nil {
					t.Fatal(err)
				}
			}
		}
		all = append(all, msgs...)
	}
}

func TestFIFOAndPriorities(t *testing.T) {
	ob := open(t, Options{Routes: []Route{{Name: "low", Priority: 0}, {Name: "high", Priority: 5}}})
	appendN(t, ob, "low", 10, "l")
	appendN(t, ob, "high", 10, "h")
	appendN(t, ob, "low", 5, "L")
	got := drain(t, ob, true)
	if len(got) != 25 {
		t.Fatalf("read %d, want 25", len(got))
	}
	for i := range 10 {
		if got[i].Route != "high" || string(got[i].Payload) != fmt.Sprintf("h%d", i) {
			t.Fatalf("message %d is %s %q: high priority must drain first, in order", i, got[i].Route, got[i].Payload)
		}
	}
	for i := 10; i < 25; i++ {
		if got[i].Route != "low" || (i > 10 && got[i].Seq <= got[i-1].Seq) {
			t.Fatalf("low route out of order at %d", i)
		}
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("after acking all: %+v", st)
	}
}

func TestStarvationGuard(t *testing.T) {
	ob := open(t, Options{Routes: []Route{{Name: "low", Priority: 0}, {Name: "high", Priority: 5}}})
	appendN(t, ob, "low", 1, "l")
	appendN(t, ob, "high", 200, "h")
	c := Cursor{}
	for call := 1; call <= 200; call++ {
		msgs, err := ob.Next(c, 1)
		if err != nil || len(msgs) != 1 {
			t.Fatal(err, len(msgs))
		}
		c[msgs[0].Route] = msgs[0].Seq
		if msgs[0].Route == "low" {
			if call != 64 {
				t.Fatalf("low route served at call %d, want 64", call)
			}
			return
		}
	}
	t.Fatal("the low-priority route starved")
}

func TestNextSeeksPastAcked(t *testing.T) {
	ob := open(t, Options{})
	seqs := appendN(t, ob, "r", 1000, "m")
	refs := make([]Ref, 900)
	for i := range refs {
		refs[i] = Ref{"r", seqs[i]}
	}
	if err := ob.Ack(refs...); err != nil {
		t.Fatal(err)
	}
	ob.flushAcks()
	// A fresh cursor (after a restart) starts at the first live message.
	msgs, err := ob.Next(Cursor{}, 10)
	if err != nil || len(msgs) != 10 || msgs[0].Seq != seqs[900] {
		t.Fatalf("Next from zero: %v, %d msgs, first %v", err, len(msgs), msgs)
	}
	// A cursor in the middle continues from there.
	msgs, _ = ob.Next(Cursor{"r": seqs[950]}, 1)
	if len(msgs) != 1 || msgs[0].Seq != seqs[951] {
		t.Fatalf("Next after %d: %+v", seqs[950], msgs)
	}
}

func TestAckIdempotent(t *testing.T) {
	ob := open(t, Options{})
	seqs := appendN(t, ob, "r", 3, "m")
	for range 3 {
		if err := ob.Ack(Ref{"r", seqs[0]}, Ref{"r", 99999}, Ref{"gone", 1}); err != nil {
			t.Fatal(err)
		}
		ob.flushAcks()
	}
	st := ob.Stats()
	if st.Messages != 2 || st.Bytes <= 0 {
		t.Fatalf("stats after repeated acks: %+v", st)
	}
}

// TestHammer appends, reads, acks and evicts from many goroutines at once;
// the accounting must end exact.
func TestHammer(t *testing.T) {
	ob := open(t, Options{MaxMessages: 500, Routes: []Route{{Name: "a", Priority: 1}, {Name: "b"}}})
	hammerBody(t, ob)
	ob.flushAcks()
	st := ob.Stats()
	left := drain(t, ob, false)
	if int64(len(left)) != st.Messages {
		t.Fatalf("Stats say %d messages, %d are readable", st.Messages, len(left))
	}
	if bytes := storedBytes(t, ob); bytes != st.Bytes {
		t.Fatalf("Stats say %d bytes, the stored entries hold %d", st.Bytes, bytes)
	}
	if st.Messages > 500+8 {
		t.Fatalf("%d messages over a 500 cap", st.Messages)
	}
}

func hammerBody(t *testing.T, ob *Outbox) {
	const P, N = 8, 300
	var wg sync.WaitGroup
	start := make(chan struct{})
	for p := range P {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			route := []string{"a", "b"}[p%2]
			c := Cursor{}
			for i := range N {
				if err := ob.Append(&Message{Route: route, Topic: "t", Payload: []byte(strconv.Itoa(i))}); err != nil {
					t.Error(err)
					return
				}
				if i%3 == 0 {
					msgs, err := ob.Next(c, 5)
					if err != nil {
						t.Error(err)
						return
					}
					for _, m := range msgs {
						c[m.Route] = m.Seq
						_ = ob.Ack(Ref{m.Route, m.Seq})
					}
				}
			}
		}()
	}
	close(start)
	wg.Wait()
}

func TestRejectNew(t *testing.T) {
	ob := open(t, Options{MaxBytes: 10_000, WhenFull: RejectNew})
	payload := make([]byte, 900)
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		err = ob.Append(&Message{Route: "r", Topic: "t", Payload: payload})
	}
	if !errors.Is(err, ErrFull) {
		t.Fatalf("want ErrFull, got %v", err)
	}
	before := ob.Stats()
	if err := ob.Append(&Message{Route: "r", Topic: "t", Payload: payload}); !errors.Is(err, ErrFull) {
		t.Fatal(err)
	}
	after := ob.Stats()
	if after.Messages != before.Messages || after.Bytes != before.Bytes || after.Dropped[ReasonRejected] != before.Dropped[ReasonRejected]+1 {
		t.Fatalf("a rejected append changed the store: %+v -> %+v", before, after)
	}
	if err := ob.Append(&Message{Route: "r", Topic: "t", Payload: make([]byte, 20_000)}); !errors.Is(err, ErrFull) {
		t.Fatalf("a message over the cap by itself: %v", err)
	}
}

// TestCapsCountQueuedAppends: appends queued faster than the committer
// writes them count against the byte cap, so reject_new never lets the
// store grow past it.
func TestCapsCountQueuedAppends(t *testing.T) {
	const maxBytes = 100_000
	ob := open(t, Options{MaxBytes: maxBytes, WhenFull: RejectNew})
	payload := make([]byte, 900)
	var wg sync.WaitGroup
	var accepted, refused int
	for range 1000 {
		wg.Add(1)
		err := ob.AppendAsync(&Message{Route: "r", Topic: "t", QoS: 1, Payload: payload}, func(_ uint64, err error) {
			if err != nil {
				t.Error(err)
			}
			wg.Done()
		})
		switch {
		case err == nil:
			accepted++
		case errors.Is(err, ErrFull):
			wg.Done()
			refused++
		default:
			t.Fatal(err)
		}
	}
	wg.Wait()
	st := ob.Stats()
	if st.Bytes > maxBytes {
		t.Fatalf("%d bytes stored with a %d-byte cap (%d accepted, %d refused)", st.Bytes, maxBytes, accepted, refused)
	}
	if refused == 0 || int64(accepted) != st.Messages {
		t.Fatalf("%d accepted, %d refused, %d stored", accepted, refused, st.Messages)
	}
}

func TestDropOldest(t *testing.T) {
	ob := open(t, Options{MaxMessages: 10, Routes: []Route{{Name: "hi", Priority: 1}, {Name: "lo"}}})
	appendN(t, ob, "lo", 5, "lo")
	appendN(t, ob, "hi", 5, "hi")
	appendN(t, ob, "hi", 3, "new")
	st := ob.Stats()
	if st.Messages != 10 || st.Dropped[ReasonEvicted] != 3 {
		t.Fatalf("stats %+v", st)
	}
	got := drain(t, ob, false)
	var lo []string
	for _, m := range got {
		if m.Route == "lo" {
			lo = append(lo, string(m.Payload))
		}
	}
	if fmt.Sprint(lo) != "[lo3 lo4]" {
		t.Fatalf("low route kept %v, want its two newest", lo)
	}
}

func TestTTL(t *testing.T) {
	clock := newClock()
	ob := open(t, Options{Now: clock.Now, TTL: time.Hour, Routes: []Route{{Name: "fast", TTL: time.Minute}, {Name: "slow"}}})
	appendN(t, ob, "fast", 3, "f")
	appendN(t, ob, "slow", 3, "s")
	if err := ob.Append(&Message{Route: "slow", Topic: "t", Payload: []byte("own"), Expires: clock.Now().Add(time.Second)}); err != nil {
		t.Fatal(err)
	}
	clock.Add(2 * time.Second) // the message's own expiry passes
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	if d := ob.Stats().Dropped[ReasonTTL]; d != 1 {
		t.Fatalf("after 2s: ttl drops %d, want 1", d)
	}
	clock.Add(2 * time.Minute) // the route TTL passes: found by Next
	if got := drain(t, ob, false); len(got) != 3 || got[0].Route != "slow" {
		t.Fatalf("read %d messages, want the 3 of the slow route", len(got))
	}
	if d := ob.Stats().Dropped[ReasonTTL]; d != 4 {
		t.Fatalf("ttl drops %d, want 4", d)
	}
	clock.Add(time.Hour) // the global TTL passes
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	if st := ob.Stats(); st.Dropped[ReasonTTL] != 7 || st.Messages != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	ob, err := Open(Options{Dir: dir, Routes: []Route{{Name: "old"}, {Name: "keep"}}})
	if err != nil {
		t.Fatal(err)
	}
	seqs := appendN(t, ob, "old", 4, "o")
	appendN(t, ob, "keep", 2, "k")
	if err := ob.Ack(Ref{"old", seqs[0]}); err != nil {
		t.Fatal(err)
	}
	id, before := ob.ID(), ob.Stats()
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ob.Append(&Message{Route: "keep"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v", err)
	}
	// "old" is no longer configured: its messages still drain, last.
	ob2 := open(t, Options{Dir: dir, Routes: []Route{{Name: "keep"}}})
	after := ob2.Stats()
	if ob2.ID() != id || after.Messages != before.Messages-1 || after.Messages != 5 {
		t.Fatalf("reopen: id %s/%s, stats %+v -> %+v", id, ob2.ID(), before, after)
	}
	m := &Message{Route: "keep", Topic: "t"}
	if err := ob2.Append(m); err != nil || m.Seq <= seqs[3] {
		t.Fatalf("seq %d after reopen, last was %d: %v", m.Seq, seqs[3], err)
	}
	if err := ob2.Append(&Message{Route: "old"}); !errors.Is(err, ErrUnknownRoute) {
		t.Fatalf("append to an adopted route: %v", err)
	}
	got := drain(t, ob2, true)
	if len(got) != 6 || got[len(got)-1].Route != "old" {
		t.Fatalf("drained %d, last from %q", len(got), got[len(got)-1].Route)
	}
}

func TestGroupCommit(t *testing.T) {
	ob := open(t, Options{Durability: DurabilityFsync})
	const P, N = 50, 40
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range P {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range N {
				if err := ob.Append(&Message{Route: "r", Topic: "t", Payload: []byte("x")}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	if c := ob.commits.Load(); c >= P*N {
		t.Fatalf("%d commits for %d appends: no group commit", c, P*N)
	} else {
		t.Logf("%d appends in %d synced commits", P*N, c)
	}
	if got := len(drain(t, ob, false)); got != P*N {
		t.Fatalf("read %d, want %d", got, P*N)
	}
}

// TestAppendAsyncLargeBatch queues more than one Badger transaction holds
// (4 MiB memtables take about 600 KiB per transaction): the committer splits
// the batch, every append is reported, and all are stored in order.
func TestAppendAsyncLargeBatch(t *testing.T) {
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	const n = 40
	payload := make([]byte, 256<<10)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		payload[0] = byte(i)
		err := ob.AppendAsync(&Message{Route: "r", Topic: "t", QoS: 1, Payload: payload}, func(_ uint64, err error) {
			errs[i] = err
			wg.Done()
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if c := ob.commits.Load(); c < 2 {
		t.Errorf("%d commits for %d MiB: the batch was not split", c, n/4)
	}
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	ob = open(t, Options{Dir: dir})
	got := drain(t, ob, false)
	if len(got) != n {
		t.Fatalf("read %d after reopen, want %d", len(got), n)
	}
	for i, m := range got {
		if m.Payload[0] != byte(i) || len(m.Payload) != len(payload) {
			t.Fatalf("message %d: first byte %d, %d bytes", i, m.Payload[0], len(m.Payload))
		}
	}
}

// TestCloseWritesQueuedAppends: Close writes what was queued before it and
// refuses appends after it.
func TestCloseWritesQueuedAppends(t *testing.T) {
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	const n = 2000
	var done atomic.Int64
	for range n {
		err := ob.AppendAsync(&Message{Route: "r", Topic: "t", QoS: 1, Payload: []byte("x")}, func(_ uint64, err error) {
			if err != nil {
				t.Error(err)
			}
			done.Add(1)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	if d := done.Load(); d != n {
		t.Fatalf("%d of %d appends reported after Close", d, n)
	}
	if err := ob.Append(&Message{Route: "r", Topic: "t"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v, want ErrClosed", err)
	}
	ob = open(t, Options{Dir: dir})
	if got := len(drain(t, ob, false)); got != n {
		t.Fatalf("read %d after reopen, want %d", got, n)
	}
}

// duOf returns the disk space the files in dir use.
func duOf(t *testing.T, dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Sys().(*syscall.Stat_t).Blocks * 512
		}
		return nil
	})
	return n
}

func TestDiskReclaimedAfterDrain(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 60 MB")
	}
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	payload := make([]byte, 200)
	const n = 150_000
	for i := range n {
		if err := ob.Append(&Message{Route: "r", Topic: "plant/line1/temp", Payload: payload}); err != nil {
			t.Fatal(i, err)
		}
	}
	// Let Badger flush its memtables to tables.
	if err := ob.db.Flatten(1); err != nil {
		t.Fatal(err)
	}
	peak := duOf(t, dir)
	drain(t, ob, true)
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	after := duOf(t, dir)
	t.Logf("disk: %d MB with %d messages, %d MB after the drain and maintenance", peak>>20, n, after>>20)
	if after >= peak*2/3 {
		t.Fatalf("disk use did not fall enough after the drain: %d -> %d bytes", peak, after)
	}
}

// TestCrashKeepsAcknowledged re-runs this test binary as a child that
// appends and prints each sequence number once Append returned, then kills
// it with SIGKILL: every printed message must be in the store.
func TestCrashKeepsAcknowledged(t *testing.T) {
	if dir := os.Getenv("OUTPOST_CRASH_CHILD"); dir != "" {
		crashChild(dir, os.Getenv("OUTPOST_CRASH_MODE"))
		return
	}
	for _, mode := range []string{"process", "fsync"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^TestCrashKeepsAcknowledged$")
			cmd.Env = append(os.Environ(), "OUTPOST_CRASH_CHILD="+dir, "OUTPOST_CRASH_MODE="+mode)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			acked := map[uint64]bool{}
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if seq, err := strconv.ParseUint(sc.Text(), 10, 64); err == nil {
					acked[seq] = true
				}
				if len(acked) == 20_000 {
					_ = cmd.Process.Kill()
					break
				}
			}
			_ = cmd.Wait()
			if len(acked) < 20_000 {
				t.Fatalf("child acknowledged only %d before it ended", len(acked))
			}
			ob := open(t, Options{Dir: dir})
			have := map[uint64]bool{}
			for _, m := range drain(t, ob, false) {
				have[m.Seq] = true
			}
			for seq := range acked {
				if !have[seq] {
					t.Fatalf("acknowledged message %d lost after kill -9 (%d acknowledged, %d stored)", seq, len(acked), len(have))
				}
			}
			t.Logf("%s: %d acknowledged before SIGKILL, %d stored after", mode, len(acked), len(have))
		})
	}
}

func crashChild(dir, mode string) {
	d := DurabilityProcess
	if mode == "fsync" {
		d = DurabilityFsync
	}
	ob, err := Open(Options{Dir: dir, Durability: d, Routes: []Route{{Name: "r"}}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	w := bufio.NewWriterSize(os.Stdout, 0)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				m := &Message{Route: "r", Topic: "t", Payload: make([]byte, 200)}
				if err := ob.Append(m); err != nil {
					os.Exit(1)
				}
				mu.Lock()
				fmt.Fprintln(w, m.Seq)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

func BenchmarkAppendProcess(b *testing.B) {
	ob := open(b, Options{})
	payload := make([]byte, 200)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := ob.Append(&Message{Route: "r", Topic: "plant/line1/temp", QoS: 1, Payload: payload}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

func BenchmarkAppendFsyncParallel(b *testing.B) {
	ob := open(b, Options{Durability: DurabilityFsync})
	payload := make([]byte, 200)
	b.ReportAllocs()
	b.SetParallelism(25) // 50 publishers on 2 cores
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := ob.Append(&Message{Route: "r", Topic: "plant/line1/temp", QoS: 1, Payload: payload}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

func BenchmarkDrain(b *testing.B) {
	ob := open(b, Options{})
	payload := make([]byte, 200)
	for range b.N {
		if err := ob.Append(&Message{Route: "r", Topic: "t", QoS: 1, Payload: payload}); err != nil {
			b.Fatal(err)
		}
	}
	benchDrain(b, ob)
}

// benchDrain times reading and acknowledging everything in ob, b.N
// messages.
func benchDrain(b *testing.B, ob *Outbox) {
	b.ReportAllocs()
	b.ResetTimer()
	c := Cursor{}
	for {
		msgs, err := ob.Next(c, 256)
		if err != nil {
			b.Fatal(err)
		}
		if len(msgs) == 0 {
			break
		}
		for _, m := range msgs {
			c[m.Route] = m.Seq
			_ = ob.Ack(Ref{m.Route, m.Seq})
		}
	}
	ob.flushAcks()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
}

// TestNotifyAfterAppend: the consumer is woken once an append is readable.
func TestNotifyAfterAppend(t *testing.T) {
	ob := open(t, Options{})
	select {
	case <-ob.Notify():
		t.Fatal("notified before any append")
	default:
	}
	appendN(t, ob, "r", 1, "x")
	select {
	case <-ob.Notify():
	case <-time.After(5 * time.Second):
		t.Fatal("no notification within 5s of an append")
	}
	if got := len(drain(t, ob, false)); got != 1 {
		t.Fatalf("read %d after the notification, want 1", got)
	}
}

// TestAckSparseAndRepeated: acknowledgements with gaps, repeats, unknown
// sequence numbers and several routes delete exactly the stored messages
// named, and the counters follow.
func TestAckSparseAndRepeated(t *testing.T) {
	ob := open(t, Options{Routes: []Route{{Name: "a"}, {Name: "b"}}})
	a := appendN(t, ob, "a", 100, "x")
	b := appendN(t, ob, "b", 10, "y")
	var refs []Ref
	want := map[uint64]bool{} // a's sequence numbers that stay
	for i, s := range a {
		// Acknowledge 0-9 (a run), then every 7th (gaps longer than the
		// walk), and 60-61 twice.
		if i < 10 || i%7 == 0 || i == 60 || i == 61 {
			refs = append(refs, Ref{Route: "a", Seq: s})
			continue
		}
		want[s] = true
	}
	refs = append(refs, Ref{Route: "a", Seq: a[60]}, Ref{Route: "a", Seq: a[61]})
	refs = append(refs, Ref{Route: "a", Seq: a[99] + 1000}, Ref{Route: "b", Seq: b[9]}, Ref{Route: "b", Seq: b[0]})
	if err := ob.Ack(refs...); err != nil {
		t.Fatal(err)
	}
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	got := drain(t, ob, false)
	left := map[uint64]bool{}
	nb := 0
	for _, m := range got {
		if m.Route == "b" {
			nb++
			if m.Seq == b[0] || m.Seq == b[9] {
				t.Errorf("b seq %d still stored after its ack", m.Seq)
			}
			continue
		}
		left[m.Seq] = true
	}
	if len(left) != len(want) || nb != 8 {
		t.Fatalf("%d of route a left, want %d; %d of b, want 8", len(left), len(want), nb)
	}
	for s := range want {
		if !left[s] {
			t.Errorf("a seq %d was deleted but never acknowledged", s)
		}
	}
	st := ob.Stats()
	if st.Messages != int64(len(want)+8) {
		t.Fatalf("stats count %d messages, want %d", st.Messages, len(want)+8)
	}
	if bytesLeft := storedBytes(t, ob); st.Bytes != bytesLeft {
		t.Fatalf("stats count %d bytes, the messages left hold %d", st.Bytes, bytesLeft)
	}
}

// TestCompressionChangeKeepsMessages: a store written with compression
// and reopened without (and back) reads every message: each Badger table
// keeps the compression it was written with.
func TestCompressionChangeKeepsMessages(t *testing.T) {
	dir := t.TempDir()
	want := 0
	for i, off := range []bool{false, true, false} {
		ob, err := Open(Options{Dir: dir, Routes: []Route{{Name: "r"}}, NoCompression: off})
		if err != nil {
			t.Fatalf("open %d (no compression: %v): %v", i, off, err)
		}
		appendN(t, ob, "r", 2000, fmt.Sprintf("run%d-%0500d-", i, 0))
		want += 2000
		// Writes the memtable to a table now, in this run's compression.
		if err := ob.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if tables, _ := filepath.Glob(filepath.Join(dir, "*.sst")); len(tables) < 3 {
		t.Fatalf("%d tables after three runs, want one per run at least", len(tables))
	}
	ob := open(t, Options{Dir: dir, NoCompression: true})
	got := drain(t, ob, false)
	if len(got) != want {
		t.Fatalf("read %d messages after changing compression twice, want %d", len(got), want)
	}
	for i, m := range got {
		run, n := i/2000, i%2000
		if p := fmt.Sprintf("run%d-%0500d-%d", run, 0, n); string(m.Payload) != p {
			t.Fatalf("message %d: payload %.30q..., want %.30q...", i, m.Payload, p)
		}
	}
}

// TestValueLogMessages: messages larger than the value threshold (512 KiB)
// go to Badger's value log; they read back whole, survive a reopen, and once
// acknowledged leave the totals at zero.
func TestValueLogMessages(t *testing.T) {
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	big := bytes.Repeat([]byte("0123456789"), 70<<10) // 700 KiB
	for i := range 3 {
		big[0] = byte('a' + i)
		if err := ob.Append(&Message{Route: "r", Topic: "t", QoS: 1, Payload: big}); err != nil {
			t.Fatal(err)
		}
	}
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	ob = open(t, Options{Dir: dir})
	if st := ob.Stats(); st.Messages != 3 || st.Bytes < 3*int64(len(big)) {
		t.Fatalf("after reopening: %d messages, %d bytes; want 3 of at least %d", st.Messages, st.Bytes, len(big))
	}
	msgs := drain(t, ob, true)
	if len(msgs) != 3 {
		t.Fatalf("read %d, want 3", len(msgs))
	}
	for i, m := range msgs {
		big[0] = byte('a' + i)
		if !bytes.Equal(m.Payload, big) {
			t.Fatalf("message %d differs from what was stored", i)
		}
	}
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("after acknowledging all: %d messages, %d bytes; want 0 and 0", st.Messages, st.Bytes)
	}
	// Counted at append, not at reopen: Badger sizes a value in the value
	// log only approximately when it is deleted.
	if err := ob.Append(&Message{Route: "r", Topic: "t", QoS: 1, Payload: big}); err != nil {
		t.Fatal(err)
	}
	drain(t, ob, true)
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("after acknowledging a fresh one: %d messages, %d bytes; want 0 and 0", st.Messages, st.Bytes)
	}
}

// TestAckRacingClose: acknowledgements made while the outbox closes are
// either written before it closes or refused with ErrClosed; none that
// returned nil is dropped (it would only be sent again, but Ack promised).
func TestAckRacingClose(t *testing.T) {
	dir := t.TempDir()
	ob, err := Open(Options{Dir: dir, Routes: []Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	seqs := appendN(t, ob, "r", 4000, "m")
	const P = 4
	accepted := make([][]uint64, P)
	var wg sync.WaitGroup
	for g := range P {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < len(seqs); i += P {
				if err := ob.Ack(Ref{Route: "r", Seq: seqs[i]}); err == nil {
					accepted[g] = append(accepted[g], seqs[i])
				} else if !errors.Is(err, ErrClosed) {
					t.Errorf("ack: %v", err)
					return
				}
			}
		}()
	}
	time.Sleep(time.Millisecond)
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	ob = open(t, Options{Dir: dir})
	left := map[uint64]bool{}
	for _, m := range drain(t, ob, false) {
		left[m.Seq] = true
	}
	n := 0
	for _, acc := range accepted {
		for _, s := range acc {
			n++
			if left[s] {
				t.Fatalf("seq %d: Ack returned nil before Close, but it is still stored", s)
			}
		}
	}
	t.Logf("%d of %d acknowledgements accepted before Close", n, len(seqs))
}

// TestAcksFlushedInBackground: acknowledgements are deleted without any
// explicit flush, both when a few gather until the flusher's timer and when
// a full batch arrives at once.
func TestAcksFlushedInBackground(t *testing.T) {
	ob := open(t, Options{})
	seqs := appendN(t, ob, "r", ackBatch+10, "m")
	waitMessages := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for ob.Stats().Messages != want {
			if time.Now().After(deadline) {
				t.Fatalf("%d messages stored, want %d: the acknowledgements were not deleted", ob.Stats().Messages, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for _, s := range seqs[:3] { // fewer than a batch: the gathering time ends it
		if err := ob.Ack(Ref{Route: "r", Seq: s}); err != nil {
			t.Fatal(err)
		}
	}
	waitMessages(int64(len(seqs) - 3))
	refs := make([]Ref, 0, len(seqs)-3)
	for _, s := range seqs[3:] { // a full batch in one call
		refs = append(refs, Ref{Route: "r", Seq: s})
	}
	if err := ob.Ack(refs...); err != nil {
		t.Fatal(err)
	}
	waitMessages(0)
}

// storedBytes sums the sizes (key and value) of the stored message entries.
func storedBytes(t *testing.T, ob *Outbox) int64 {
	t.Helper()
	var n int64
	err := ob.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixMsg}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n += int64(len(it.Item().Key())) + it.Item().ValueSize()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestOldest(t *testing.T) {
	clk := newClock()
	ob := open(t, Options{Routes: []Route{{Name: "a"}, {Name: "b"}, {Name: "empty"}}, Now: clk.Now})
	t0 := clk.Now()
	appendN(t, ob, "a", 1, "x")
	clk.Add(time.Minute)
	appendN(t, ob, "a", 1, "x")
	appendN(t, ob, "b", 2, "y")
	old, err := ob.Oldest()
	if err != nil {
		t.Fatal(err)
	}
	if len(old) != 2 || !old["a"].Equal(t0) || !old["b"].Equal(t0.Add(time.Minute)) {
		t.Fatalf("Oldest = %v; want a at %v, b a minute later, nothing for empty", old, t0)
	}
	// Once a's first message is acknowledged, its second is the oldest.
	msgs, err := ob.Next(Cursor{}, 1)
	if err != nil || len(msgs) != 1 || msgs[0].Route != "a" {
		t.Fatal(msgs, err)
	}
	if err := ob.Ack(Ref{msgs[0].Route, msgs[0].Seq}); err != nil {
		t.Fatal(err)
	}
	ob.flushAcks()
	if old, err := ob.Oldest(); err != nil || !old["a"].Equal(t0.Add(time.Minute)) {
		t.Errorf("after an ack: %v %v; want a a minute later", old, err)
	}
	drain(t, ob, true)
	ob.flushAcks()
	if old, err := ob.Oldest(); err != nil || len(old) != 0 {
		t.Errorf("after draining: %v %v; want none", old, err)
	}
}

// TestReconfigure: while the outbox runs, a new route takes messages, a
// removed one refuses them and drains last, priorities apply to what is
// read next, and new caps apply to the next append.
func TestReconfigure(t *testing.T) {
	ob := open(t, Options{Routes: []Route{{Name: "a", Priority: 1}, {Name: "b"}}})
	appendN(t, ob, "b", 2, "b")
	appendN(t, ob, "a", 2, "a")
	if err := ob.Append(&Message{Route: "c", Topic: "t"}); !errors.Is(err, ErrUnknownRoute) {
		t.Fatalf("append to c before: %v", err)
	}
	if err := ob.Reconfigure([]Route{{Name: "b", Priority: 5}, {Name: "c", Priority: 2}}, Limits{MaxMessages: 6, WhenFull: RejectNew}); err != nil {
		t.Fatal(err)
	}
	appendN(t, ob, "c", 1, "c")
	// The removed route a still takes an append (a router not yet
	// replaced), and drains last.
	if err := ob.Append(&Message{Route: "a", Topic: "t", Payload: []byte("late")}); err != nil {
		t.Errorf("append to the removed route a: %v", err)
	}
	// 6 stored: the cap refuses the seventh.
	if err := ob.Append(&Message{Route: "b", Topic: "t"}); !errors.Is(err, ErrFull) {
		t.Errorf("a seventh message under a cap of 6: %v, want ErrFull", err)
	}
	var order []string
	for _, m := range drain(t, ob, true) {
		order = append(order, m.Route)
	}
	if got := strings.Join(order, ","); got != "b,b,c,a,a,a" {
		t.Errorf("drain order %s, want b,b,c,a,a,a (b now first, a drains last)", got)
	}
	for name, rs := range map[string][]Route{"none": nil, "twice": {{Name: "x"}, {Name: "x"}}, "unnamed": {{}}} {
		if err := ob.Reconfigure(rs, Limits{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
