package twin

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/storage"
)

func openTwin(t *testing.T, dir string) (*Twin, func()) {
	t.Helper()
	ob, err := storage.Open(storage.Options{Dir: dir, Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := ob.State("twin")
	tw, err := Open(st)
	if err != nil {
		t.Fatal(err)
	}
	return tw, func() { _ = ob.Close() }
}

func js(v any) string { b, _ := json.Marshal(v); return string(b) }

func TestDesiredInOrderAndGaps(t *testing.T) {
	tw, closeFn := openTwin(t, t.TempDir())
	defer closeFn()
	if r, _ := tw.ApplyDesired([]byte(`{"a":1}`), 1); r != Gap {
		t.Fatalf("a patch before any full read: %v, want Gap", r)
	}
	d, r, err := ParseDoc([]byte(`{"properties":{"desired":{"a":1,"n":{"x":1,"y":2},"$version":4},"reported":{"b":true,"$version":7}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if d.Version != 4 || r.Version != 7 {
		t.Fatalf("versions %d %d", d.Version, r.Version)
	}
	if err := tw.SetFull(d, r); err != nil {
		t.Fatal(err)
	}
	w := tw.Watch()
	if res, err := tw.ApplyDesired([]byte(`{"a":2,"n":{"x":null,"z":3},"$version":5}`), 5); res != Applied || err != nil {
		t.Fatalf("next version: %v %v", res, err)
	}
	select {
	case <-w:
	default:
		t.Fatal("Watch not woken by a desired patch")
	}
	if res, _ := tw.ApplyDesired([]byte(`{"a":0}`), 5); res != Stale {
		t.Fatalf("same version again: %v, want Stale", res)
	}
	if res, _ := tw.ApplyDesired([]byte(`{"a":9}`), 7); res != Gap {
		t.Fatalf("version 7 after 5: %v, want Gap", res)
	}
	if got := js(tw.Desired().Props); got != `{"a":2,"n":{"y":2,"z":3}}` {
		t.Fatalf("desired %s", got)
	}
	// A full read older than what is cached (a patch applied while it was
	// out) does not take the twin back.
	if err := tw.SetFull(Doc{Props: map[string]any{"a": 1}, Version: 4}, Doc{Props: map[string]any{}, Version: 7}); err != nil {
		t.Fatal(err)
	}
	if d := tw.Desired(); d.Version != 5 || js(d.Props) != `{"a":2,"n":{"y":2,"z":3}}` {
		t.Fatalf("a stale full read went back to version %d: %s", d.Version, js(d.Props))
	}
	if _, err := tw.ApplyDesired([]byte(`[1]`), 6); !errors.Is(err, ErrBadPatch) {
		t.Fatalf("an array patch: %v", err)
	}
}

func TestReportedQueueSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	tw, closeFn := openTwin(t, dir)
	if err := tw.SetFull(Doc{Props: map[string]any{}, Version: 1}, Doc{Props: map[string]any{"fw": "1.0", "old": 1}, Version: 3}); err != nil {
		t.Fatal(err)
	}
	s1, err := tw.Report([]byte(`{"fw": "2.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := tw.Report([]byte(`{"old":null,"big":12345678901234567890}`))
	if got := js(tw.Reported().Props); got != `{"big":12345678901234567890,"fw":"2.0"}` {
		t.Fatalf("reported view %s (big numbers must stay exact)", got)
	}
	closeFn()

	tw, closeFn = openTwin(t, dir)
	defer closeFn()
	p := tw.Pending()
	if len(p) != 2 || p[0].Seq != s1 || p[1].Seq != s2 || string(p[0].Patch) != `{"fw":"2.0"}` {
		t.Fatalf("pending after restart: %+v", p)
	}
	if err := tw.Acked(s1, 4); err != nil {
		t.Fatal(err)
	}
	if r := tw.Reported(); r.Version != 4 || js(r.Props) != `{"big":12345678901234567890,"fw":"2.0"}` {
		t.Fatalf("after the first ack: %d %s", r.Version, js(r.Props))
	}
	s3, _ := tw.Report([]byte(`{"x":1}`))
	if s3 <= s2 {
		t.Fatalf("sequence went back: %d after %d", s3, s2)
	}
	if err := tw.Drop(s2); err != nil {
		t.Fatal(err)
	}
	if got := string(tw.JSON()); got != `{"desired":{"$version":1},"reported":{"$version":4,"fw":"2.0","old":1,"x":1}}` {
		t.Fatalf("JSON %s", got)
	}
}

func TestReportLimits(t *testing.T) {
	tw, closeFn := openTwin(t, t.TempDir())
	defer closeFn()
	for _, bad := range []string{``, `null`, `"x"`, `[1]`, `{"a":1} {}`, `{"a":`} {
		if _, err := tw.Report([]byte(bad)); !errors.Is(err, ErrBadPatch) {
			t.Errorf("Report(%q): %v, want ErrBadPatch", bad, err)
		}
	}
	if _, err := tw.Report([]byte(`{"a":"` + strings.Repeat("x", MaxPatch) + `"}`)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized patch: %v", err)
	}
	for i := range 2 {
		if _, err := tw.Report([]byte(`{"k` + string(rune('a'+i)) + `":"` + strings.Repeat("x", 20<<10) + `"}`)); i == 1 && !errors.Is(err, ErrTooLarge) {
			t.Errorf("reported section over 32 KiB: %v", err)
		} else if i == 0 && err != nil {
			t.Fatal(err)
		}
	}
}

func FuzzParseDoc(f *testing.F) {
	f.Add([]byte(`{"desired":{"a":1,"$version":2},"reported":{"$version":3}}`))
	f.Add([]byte(`{"properties":{"desired":{"$version":"x"}}}`))
	f.Add([]byte(`{"desired":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, r, err := ParseDoc(b)
		if err != nil {
			return
		}
		if d.Props == nil || r.Props == nil {
			t.Fatal("nil props without an error")
		}
	})
}

// TestReportQueueBounded: past MaxPending patches waiting for the hub, a
// report is refused with ErrFull, and nothing queued is lost.
func TestReportQueueBounded(t *testing.T) {
	tw, closeFn := openTwin(t, t.TempDir())
	defer closeFn()
	for i := range MaxPending {
		if _, err := tw.Report([]byte(`{"n":` + strconv.Itoa(i) + `}`)); err != nil {
			t.Fatalf("report %d: %v", i, err)
		}
	}
	if _, err := tw.Report([]byte(`{"n":-1}`)); !errors.Is(err, ErrFull) {
		t.Fatalf("report past %d waiting: %v, want ErrFull", MaxPending, err)
	}
	if p := tw.Pending(); len(p) != MaxPending || string(p[len(p)-1].Patch) != `{"n":999}` {
		t.Fatalf("%d pending, last %s", len(p), p[len(p)-1].Patch)
	}
}
