package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// appendSegment writes n messages to route in one commit, as the committer
// does with appends that wait together, and returns their sequence numbers.
func appendSegment(t *testing.T, ob *Outbox, route string, n int) []uint64 {
	t.Helper()
	rs := ob.routes[route]
	var batch []*appendReq
	var seqs []uint64
	for i := range n {
		m := Message{Route: route, Topic: "t", QoS: 1, Payload: fmt.Appendf(nil, "m%d", i), Created: ob.now()}
		val := encodeRecord(nil, &m)
		size := int64(2+len(route)+8) + int64(len(val))
		ob.pendingCount.Add(1)
		ob.pendingBytes.Add(size)
		batch = append(batch, &appendReq{rs: rs, val: val, size: size, done: func(seq uint64, err error) {
			if err != nil {
				t.Errorf("append: %v", err)
			}
			seqs = append(seqs, seq)
		}})
	}
	ob.commitBatch(batch)
	if len(seqs) != n {
		t.Fatalf("%d appends reported, want %d", len(seqs), n)
	}
	return seqs
}

// entries counts the stored message entries.
func entries(t *testing.T, ob *Outbox) int {
	t.Helper()
	n := 0
	err := ob.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixMsg}, PrefetchValues: false})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func seqsOf(msgs []Message) []uint64 {
	var out []uint64
	for _, m := range msgs {
		out = append(out, m.Seq)
	}
	return out
}

// TestSegmentPartlyAcknowledged: messages appended together share one
// entry; acknowledging some of them hides exactly those, the entry goes
// when the last is acknowledged, and the counters follow throughout.
func TestSegmentPartlyAcknowledged(t *testing.T) {
	ob := open(t, Options{})
	seqs := appendSegment(t, ob, "r", 10)
	if got := entries(t, ob); got != 1 {
		t.Fatalf("10 messages appended together are in %d entries, want 1", got)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] != seqs[i-1]+1 {
			t.Fatalf("sequence numbers %v are not consecutive", seqs)
		}
	}
	var odd []uint64
	for i, s := range seqs {
		if i%2 == 0 {
			_ = ob.Ack(Ref{"r", s}, Ref{"r", s}) // twice: idempotent
		} else {
			odd = append(odd, s)
		}
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 5 {
		t.Fatalf("%d messages after acknowledging 5 of 10, want 5", st.Messages)
	}
	if got := seqsOf(drain(t, ob, false)); !slices.Equal(got, odd) {
		t.Fatalf("read %v, want the unacknowledged %v", got, odd)
	}
	// A read from the middle of the segment starts at the right message.
	msgs, err := ob.Next(Cursor{"r": odd[1]}, 2)
	if err != nil || !slices.Equal(seqsOf(msgs), odd[2:4]) {
		t.Fatalf("read after %d: %v, %v; want %v", odd[1], seqsOf(msgs), err, odd[2:4])
	}
	for _, s := range odd {
		_ = ob.Ack(Ref{"r", s})
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 || entries(t, ob) != 0 {
		t.Fatalf("after acknowledging all: %d messages, %d bytes, %d entries; want none", st.Messages, st.Bytes, entries(t, ob))
	}
}

// TestSegmentPartlyAcknowledgedSurvivesRestart: which messages of an entry
// were acknowledged is kept in memory only; after a restart the entry's
// acknowledged messages are sent again (at-least-once), and none is lost.
func TestSegmentPartlyAcknowledgedSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	ob, err := Open(Options{Dir: dir, Routes: []Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	seqs := appendSegment(t, ob, "r", 6)
	_ = ob.Ack(Ref{"r", seqs[0]}, Ref{"r", seqs[1]})
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	ob = open(t, Options{Dir: dir})
	if got := seqsOf(drain(t, ob, true)); !slices.Equal(got, seqs) {
		t.Fatalf("after a restart read %v, want all of %v again", got, seqs)
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("after acknowledging all: %d messages, %d bytes", st.Messages, st.Bytes)
	}
}

// TestEvictPartlyAcknowledgedSegment: eviction frees whole entries and
// counts as evicted only the messages in them that were not acknowledged.
func TestEvictPartlyAcknowledgedSegment(t *testing.T) {
	ob := open(t, Options{MaxMessages: 10, WhenFull: DropOldest})
	seqs := appendSegment(t, ob, "r", 10)
	_ = ob.Ack(Ref{"r", seqs[0]}, Ref{"r", seqs[1]}, Ref{"r", seqs[2]})
	ob.flushAcks()
	later := appendN(t, ob, "r", 4, "later") // the fourth needs room
	st := ob.Stats()
	if st.Dropped[ReasonEvicted] != 7 {
		t.Fatalf("evicted %d, want the 7 unacknowledged messages of the oldest entry", st.Dropped[ReasonEvicted])
	}
	if got := seqsOf(drain(t, ob, false)); !slices.Equal(got, later) {
		t.Fatalf("left %v, want %v", got, later)
	}
	if st.Messages != 4 || st.Bytes != storedBytes(t, ob) {
		t.Fatalf("stats: %d messages, %d bytes; want 4 and %d", st.Messages, st.Bytes, storedBytes(t, ob))
	}
}

// TestSegmentBounds: a commit's messages are split into entries of at most
// segMaxMsgs messages and segMaxBytes bytes, per route, and a message larger
// than segMaxBytes is an entry of its own.
func TestSegmentBounds(t *testing.T) {
	ob := open(t, Options{Routes: []Route{{Name: "a"}, {Name: "b"}}})
	var batch []*appendReq
	add := func(route string, payload int) {
		m := Message{Route: route, Topic: "t", Payload: make([]byte, payload), Created: ob.now()}
		val := encodeRecord(nil, &m)
		size := int64(2+len(route)+8) + int64(len(val))
		ob.pendingCount.Add(1)
		ob.pendingBytes.Add(size)
		batch = append(batch, &appendReq{rs: ob.routes[route], val: val, size: size, done: func(_ uint64, err error) {
			if err != nil {
				t.Errorf("append: %v", err)
			}
		}})
	}
	for range segMaxMsgs + 1 { // a: two entries
		add("a", 10)
		add("b", 1) // interleaved: b's go to entries of their own route
	}
	add("b", segMaxBytes) // one entry of its own
	add("b", 10)          // and the next one starts a new entry
	ob.commitBatch(batch)
	if got, want := entries(t, ob), 2+2+1+1; got != want {
		t.Fatalf("%d entries, want %d", got, want)
	}
	msgs := drain(t, ob, true)
	if len(msgs) != 2*(segMaxMsgs+1)+2 {
		t.Fatalf("read %d messages, want %d", len(msgs), 2*(segMaxMsgs+1)+2)
	}
	for i := 1; i < len(msgs); i++ {
		if msgs[i].Route == msgs[i-1].Route && msgs[i].Seq <= msgs[i-1].Seq {
			t.Fatalf("route %s out of order: %d after %d", msgs[i].Route, msgs[i].Seq, msgs[i-1].Seq)
		}
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 || entries(t, ob) != 0 {
		t.Fatalf("after acknowledging all: %d messages, %d bytes, %d entries", st.Messages, st.Bytes, entries(t, ob))
	}
}

// TestReadsOneMessageEntries: a store written with one message per entry
// (keyed by its sequence number, the record as the value) opens with its
// counters right, reads in order, and acknowledges and expires them.
func TestReadsOneMessageEntries(t *testing.T) {
	dir := t.TempDir()
	clock := newClock()
	ob, err := Open(Options{Dir: dir, Routes: []Route{{Name: "r"}}, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	var want []uint64
	err = ob.db.Update(func(txn *badger.Txn) error {
		for seq := uint64(1); seq <= 5; seq++ {
			m := Message{Topic: "t", Payload: []byte{byte(seq)}, Created: clock.Now()}
			var meta byte
			if seq == 5 {
				m.Expires = clock.Now().Add(time.Minute)
				meta = metaHasExpiry
			} else {
				want = append(want, seq)
			}
			e := badger.NewEntry(binary.BigEndian.AppendUint64(routePrefix("r"), seq), encodeRecord(nil, &m)).WithMeta(meta)
			if err := txn.SetEntry(e); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	ob = open(t, Options{Dir: dir, Now: clock.Now})
	if st := ob.Stats(); st.Messages != 5 || st.Bytes != storedBytes(t, ob) {
		t.Fatalf("reopened: %d messages, %d bytes; want 5 and %d", st.Messages, st.Bytes, storedBytes(t, ob))
	}
	clock.Add(2 * time.Minute)
	if err := ob.Maintain(); err != nil {
		t.Fatal(err)
	}
	if st := ob.Stats(); st.Messages != 4 || st.Dropped[ReasonTTL] != 1 {
		t.Fatalf("after expiry: %d messages, %d dropped for ttl; want 4 and 1", st.Messages, st.Dropped[ReasonTTL])
	}
	if got := seqsOf(drain(t, ob, true)); !slices.Equal(got, want) {
		t.Fatalf("read %v, want %v", got, want)
	}
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("after acknowledging all: %d messages, %d bytes", st.Messages, st.Bytes)
	}
	m := &Message{Route: "r", Topic: "t"}
	if err := ob.Append(m); err != nil || m.Seq <= 5 {
		t.Fatalf("next append: seq %d, %v; want after 5", m.Seq, err)
	}
}

// BenchmarkDrainAppendedTogether is BenchmarkDrain with the messages
// appended without waiting for each other: the committer writes them in
// batches of hundreds, so entries hold the most a segment may (64); from one
// mosquitto_pub -l they held 9 on average.
func BenchmarkDrainAppendedTogether(b *testing.B) {
	ob := open(b, Options{})
	payload := make([]byte, 200)
	var wg sync.WaitGroup
	for range b.N {
		wg.Add(1)
		if err := ob.AppendAsync(&Message{Route: "r", Topic: "t", QoS: 1, Payload: payload}, func(uint64, error) { wg.Done() }); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
	perCommit := float64(b.N) / float64(ob.commits.Load())
	benchDrain(b, ob)
	b.ReportMetric(perCommit, "msg/commit")
}

// TestFailedDeleteIsRetried: when deleting an acknowledged segment fails
// (a full disk), the messages stay acknowledged and the segment is deleted
// by a later flush.
func TestFailedDeleteIsRetried(t *testing.T) {
	ob := open(t, Options{})
	seqs := appendSegment(t, ob, "r", 4)
	_ = ob.Ack(Ref{"r", seqs[0]}) // a partial segment: state kept in memory
	ob.flushAcks()
	ob.delMu.Lock()
	ob.failDeletes = func() error { return errors.New("disk full") }
	ob.delMu.Unlock()
	for _, s := range seqs[1:] {
		_ = ob.Ack(Ref{"r", s})
	}
	ob.flushAcks() // completes the segment; its deletion fails
	if st := ob.Stats(); st.Messages != 0 || entries(t, ob) != 1 {
		t.Fatalf("after a failed delete: %d messages, %d entries; want 0 and the entry still stored", st.Messages, entries(t, ob))
	}
	if got := drain(t, ob, false); len(got) != 0 {
		t.Fatalf("acknowledged messages read again: %v", seqsOf(got))
	}
	ob.delMu.Lock()
	ob.failDeletes = nil
	ob.delMu.Unlock()
	ob.flushAcks()
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 || entries(t, ob) != 0 {
		t.Fatalf("after the retry: %d messages, %d bytes, %d entries", st.Messages, st.Bytes, entries(t, ob))
	}
}
