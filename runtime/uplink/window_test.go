package uplink

import (
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/storage"
)

func pend(seq uint64) pending { return pending{ref: storage.Ref{Route: "r", Seq: seq}} }

func seqs(ps []pending) []uint64 {
	var out []uint64
	for _, p := range ps {
		out = append(out, p.ref.Seq)
	}
	return out
}

// TestWindowIdentifiers: identifiers run 1 to 65535 and wrap to 1, never 0;
// a PUBACK finds its publish across the wrap, and an identifier that is not
// in flight (never sent, or acknowledged already) finds nothing.
func TestWindowIdentifiers(t *testing.T) {
	w := window{first: 65530, next: 65530}
	var ids []uint16
	for seq := range uint64(10) {
		ids = append(ids, w.add(pend(seq)))
	}
	want := []uint16{65531, 65532, 65533, 65534, 65535, 1, 2, 3, 4, 5}
	if !reflect.DeepEqual(ids, want) {
		t.Fatalf("identifiers %v, want %v", ids, want)
	}
	for i, id := range ids {
		p, skipped, ok := w.take(id)
		if !ok || p.ref.Seq != uint64(i) || len(skipped) != 0 {
			t.Fatalf("take(%d) = seq %d, skipped %v, %v; want seq %d alone", id, p.ref.Seq, seqs(skipped), ok, i)
		}
		if _, _, again := w.take(id); again {
			t.Fatalf("take(%d) found it twice", id)
		}
	}
	if _, _, ok := w.take(6); ok || w.len() != 0 {
		t.Fatalf("an identifier never sent was found (len %d)", w.len())
	}
	if _, _, ok := w.take(0); ok {
		t.Fatal("identifier 0 was found")
	}
}

// TestWindowTakeSkipsEarlier: a PUBACK that overtakes earlier publishes
// returns them, oldest first, to be sent again; they keep their
// identifiers until their own late PUBACK, which frees them without
// acknowledging anything. Later publishes stay in flight.
func TestWindowTakeSkipsEarlier(t *testing.T) {
	var w window
	var ids []uint16
	for seq := range uint64(5) {
		ids = append(ids, w.add(pend(seq)))
	}
	p, skipped, ok := w.take(ids[2])
	if !ok || p.ref.Seq != 2 || !reflect.DeepEqual(seqs(skipped), []uint64{0, 1}) {
		t.Fatalf("take = seq %d, skipped %v, %v; want 2 with 0 and 1 skipped", p.ref.Seq, seqs(skipped), ok)
	}
	if w.len() != 4 || !reflect.DeepEqual(seqs(w.all()), []uint64{0, 1, 3, 4}) {
		t.Fatalf("left %v (len %d), want [0 1 3 4]: the skipped ones still hold their identifiers", seqs(w.all()), w.len())
	}
	if _, _, ok := w.take(ids[0]); ok {
		t.Fatal("the late PUBACK of a skipped publish acknowledged something")
	}
	if w.len() != 3 || w.first != 1 {
		t.Fatalf("after the late PUBACK: len %d, first %d; want 3 and 1", w.len(), w.first)
	}
	if p, skipped, ok := w.take(ids[4]); !ok || p.ref.Seq != 4 || !reflect.DeepEqual(seqs(skipped), []uint64{3}) {
		t.Fatalf("take(last) = %d, skipped %v, %v; want 4 with 3 skipped (1 was skipped already)", p.ref.Seq, seqs(skipped), ok)
	}
}

// TestWindowSkippedIdentifierNotReused: while a skipped publish may still
// be acknowledged, the window cannot span the identifier space, so its
// identifier is not given to a new publish; its late PUBACK frees it and
// acknowledges nothing else.
func TestWindowSkippedIdentifierNotReused(t *testing.T) {
	var w window
	id0 := w.add(pend(0))
	id1 := w.add(pend(1))
	if _, skipped, ok := w.take(id1); !ok || len(skipped) != 1 {
		t.Fatalf("take(id1): ok %v, %d skipped", ok, len(skipped))
	}
	seq := uint64(2)
	for w.span() < idSpace { // as the publish loop waits for room
		id := w.add(pend(seq))
		if id == id0 {
			t.Fatalf("identifier %d of the skipped publish was given to seq %d", id0, seq)
		}
		if _, _, ok := w.take(id); !ok {
			t.Fatalf("take(%d) of seq %d failed", id, seq)
		}
		seq++
	}
	if w.len() != 1 || seq != idSpace {
		t.Fatalf("len %d after %d publishes, want only the skipped one left after %d", w.len(), seq, idSpace)
	}
	if _, _, ok := w.take(id0); ok || w.len() != 0 || w.span() != 0 {
		t.Fatalf("late PUBACK: ok %v, len %d, span %d; want nothing acknowledged and an empty window", ok, w.len(), w.span())
	}
	if id := w.add(pend(seq)); id != id0 {
		t.Fatalf("after the late PUBACK the next identifier is %d, want %d again", id, id0)
	}
}

// TestWindowGrowsAndClears: the ring grows past its first size without
// losing order, and a cleared window finds nothing while later identifiers
// go on from where they were.
func TestWindowGrowsAndClears(t *testing.T) {
	var w window
	var ids []uint16
	for seq := range uint64(1000) {
		ids = append(ids, w.add(pend(seq)))
	}
	if w.len() != 1000 || len(w.all()) != 1000 || w.all()[999].ref.Seq != 999 {
		t.Fatalf("after 1000 adds: len %d", w.len())
	}
	if p, skipped, ok := w.take(ids[500]); !ok || p.ref.Seq != 500 || len(skipped) != 500 {
		t.Fatalf("take(500) = %d with %d skipped, %v", p.ref.Seq, len(skipped), ok)
	}
	w.clear()
	if _, _, ok := w.take(ids[700]); ok || w.len() != 0 {
		t.Fatal("a cleared window still finds a publish")
	}
	if id := w.add(pend(1000)); id != 1001 {
		t.Fatalf("first identifier after clear %d, want 1001", id)
	}
}
