// Package twin keeps the device twin in the store: the desired properties
// and their version, the reported properties and theirs, and the reported
// patches the hub has not yet acknowledged, in order. Handlers and local
// clients read it whether or not the hub is reachable; a dialect brings it
// in line with the hub when it is.
//
// Patches are JSON merge patches (RFC 7396): a member set to null is
// deleted. Versions are the hub's ($version).
package twin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/outpost-edge/outpost/storage"
)

// MaxPatch bounds a reported patch, and MaxSection the desired or reported
// document, in bytes: the hub's limits (32 KiB a section).
const (
	MaxPatch   = 32 << 10
	MaxSection = 32 << 10
	// MaxPending bounds the reported patches waiting for the hub.
	MaxPending = 1000
)

// Errors of the twin.
var (
	ErrBadPatch = errors.New("twin: a patch must be a JSON object")
	ErrTooLarge = errors.New("twin: over the hub's 32 KiB")
	ErrFull     = errors.New("twin: too many reported patches waiting for the hub")
)

// Doc is one section of the twin: its properties and version.
type Doc struct {
	Props   map[string]any
	Version int64 // 0 = never read from the hub
}

// Pending is a reported patch waiting for the hub's acknowledgement.
type Pending struct {
	Seq   uint64
	Patch json.RawMessage
}

// Twin is the cached twin. Safe for concurrent use.
type Twin struct {
	st *storage.State

	mu       sync.Mutex
	desired  Doc
	reported Doc
	pending  []Pending
	nextSeq  uint64
	watchers []chan struct{}
}

// Keys in the state namespace.
const (
	keyDesired  = "desired"
	keyReported = "reported"
	keyPending  = "pending/" // + 20-digit sequence
)

// stored is a section as kept in the store.
type stored struct {
	Props   map[string]any `json:"props"`
	Version int64          `json:"version"`
}

// Open loads the twin kept in st.
func Open(st *storage.State) (*Twin, error) {
	t := &Twin{st: st, desired: Doc{Props: map[string]any{}}, reported: Doc{Props: map[string]any{}}}
	for key, d := range map[string]*Doc{keyDesired: &t.desired, keyReported: &t.reported} {
		b, err := st.Get(key)
		if errors.Is(err, storage.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("twin: open: %w", err)
		}
		var s stored
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		if err := dec.Decode(&s); err != nil {
			return nil, fmt.Errorf("twin: open: %s is corrupt: %w", key, err)
		}
		if s.Props == nil {
			s.Props = map[string]any{}
		}
		*d = Doc{Props: s.Props, Version: s.Version}
	}
	err := st.Scan(keyPending, func(k string, v []byte) error {
		seq, err := strconv.ParseUint(strings.TrimPrefix(k, keyPending), 10, 64)
		if err != nil {
			return fmt.Errorf("twin: open: bad key %q", k)
		}
		t.pending = append(t.pending, Pending{Seq: seq, Patch: v})
		t.nextSeq = seq
		return nil
	})
	if err != nil {
		return nil, err
	}
	return t, nil
}

// Desired returns a copy of the desired section.
func (t *Twin) Desired() Doc {
	t.mu.Lock()
	defer t.mu.Unlock()
	return Doc{Props: clone(t.desired.Props), Version: t.desired.Version}
}

// Reported returns a copy of the reported section as the device sees it:
// the hub's last known document with the pending patches applied. Its
// version is the hub's last known one.
func (t *Twin) Reported() Doc {
	t.mu.Lock()
	defer t.mu.Unlock()
	return Doc{Props: t.reportedViewLocked(), Version: t.reported.Version}
}

func (t *Twin) reportedViewLocked() map[string]any {
	view := clone(t.reported.Props)
	for _, p := range t.pending {
		if patch, err := object(p.Patch); err == nil {
			Merge(view, patch)
		}
	}
	return view
}

// JSON returns the twin as the hub writes it:
// {"desired":{...,"$version":n},"reported":{...,"$version":m}}, with the
// pending reported patches applied.
func (t *Twin) JSON() []byte {
	t.mu.Lock()
	d := clone(t.desired.Props)
	d["$version"] = t.desired.Version
	r := t.reportedViewLocked()
	r["$version"] = t.reported.Version
	t.mu.Unlock()
	b, _ := json.Marshal(map[string]any{"desired": d, "reported": r})
	return b
}

// SetFull replaces both sections with the hub's (after a full read). A
// section older than the cached one (a desired patch applied while the
// read was out) is kept as cached: a version never goes back.
func (t *Twin) SetFull(desired, reported Doc) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if desired.Version < t.desired.Version {
		desired = t.desired
	}
	if reported.Version < t.reported.Version {
		reported = t.reported
	}
	if err := t.saveLocked(keyDesired, desired); err != nil {
		return err
	}
	if err := t.saveLocked(keyReported, reported); err != nil {
		return err
	}
	t.desired, t.reported = Doc{Props: clone(desired.Props), Version: desired.Version}, Doc{Props: clone(reported.Props), Version: reported.Version}
	t.notifyLocked()
	return nil
}

// Apply is the result of ApplyDesired.
type Apply int

// Results of ApplyDesired.
const (
	Applied Apply = iota // the patch was the next version
	Stale                // the version is not newer: ignored
	Gap                  // versions were missed: read the whole twin
)

// ApplyDesired applies a desired patch of the given version: in order, or
// not at all (Gap: the caller reads the whole twin).
func (t *Twin) ApplyDesired(patch []byte, version int64) (Apply, error) {
	p, err := object(patch)
	if err != nil {
		return 0, err
	}
	delete(p, "$version")
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case version <= t.desired.Version:
		return Stale, nil
	case version != t.desired.Version+1 || t.desired.Version == 0:
		return Gap, nil
	}
	next := clone(t.desired.Props)
	Merge(next, p)
	d := Doc{Props: next, Version: version}
	if err := t.saveLocked(keyDesired, d); err != nil {
		return 0, err
	}
	t.desired = d
	t.notifyLocked()
	return Applied, nil
}

// Report queues a reported patch for the hub. It is part of Reported at
// once, and stays queued, across restarts, until Acked.
func (t *Twin) Report(patch []byte) (uint64, error) {
	if len(patch) > MaxPatch {
		return 0, fmt.Errorf("%w: a patch of %d bytes", ErrTooLarge, len(patch))
	}
	p, err := object(patch)
	if err != nil {
		return 0, err
	}
	compact := new(bytes.Buffer)
	if err := json.Compact(compact, patch); err != nil {
		return 0, ErrBadPatch
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.pending) >= MaxPending {
		return 0, fmt.Errorf("%w (%d)", ErrFull, len(t.pending))
	}
	view := t.reportedViewLocked()
	Merge(view, p)
	if b, _ := json.Marshal(view); len(b) > MaxSection {
		return 0, fmt.Errorf("%w: the reported section would be %d bytes", ErrTooLarge, len(b))
	}
	seq := t.nextSeq + 1
	if err := t.st.Put(pendingKey(seq), compact.Bytes(), 0); err != nil {
		return 0, fmt.Errorf("twin: report: %w", err)
	}
	t.nextSeq = seq
	t.pending = append(t.pending, Pending{Seq: seq, Patch: compact.Bytes()})
	t.notifyLocked()
	return seq, nil
}

// Pending returns the reported patches waiting for the hub, oldest first.
func (t *Twin) Pending() []Pending {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]Pending(nil), t.pending...)
}

// Acked records that the hub applied the pending patch seq, making the
// reported version version: the patch joins the hub's document.
func (t *Twin) Acked(seq uint64, version int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := 0
	for i < len(t.pending) && t.pending[i].Seq != seq {
		i++
	}
	if i == len(t.pending) {
		return nil
	}
	next := clone(t.reported.Props)
	if p, err := object(t.pending[i].Patch); err == nil {
		Merge(next, p)
	}
	r := Doc{Props: next, Version: max(version, t.reported.Version)}
	if err := t.saveLocked(keyReported, r); err != nil {
		return err
	}
	if err := t.st.Delete(pendingKey(seq)); err != nil {
		return fmt.Errorf("twin: ack: %w", err)
	}
	t.reported = r
	t.pending = append(t.pending[:i], t.pending[i+1:]...)
	return nil
}

// Drop removes a pending patch the hub refused for good.
func (t *Twin) Drop(seq uint64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, p := range t.pending {
		if p.Seq == seq {
			if err := t.st.Delete(pendingKey(seq)); err != nil {
				return fmt.Errorf("twin: drop: %w", err)
			}
			t.pending = append(t.pending[:i], t.pending[i+1:]...)
			t.notifyLocked()
			return nil
		}
	}
	return nil
}

// Watch returns a channel that is closed at the next change of the twin
// (a desired patch, a full read, a queued report).
func (t *Twin) Watch() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	ch := make(chan struct{})
	t.watchers = append(t.watchers, ch)
	return ch
}

func (t *Twin) notifyLocked() {
	for _, ch := range t.watchers {
		close(ch)
	}
	t.watchers = nil
}

func (t *Twin) saveLocked(key string, d Doc) error {
	b, err := json.Marshal(stored{Props: d.Props, Version: d.Version})
	if err != nil {
		return fmt.Errorf("twin: save %s: %w", key, err)
	}
	if err := t.st.Put(key, b, 0); err != nil {
		return fmt.Errorf("twin: save %s: %w", key, err)
	}
	return nil
}

func pendingKey(seq uint64) string { return fmt.Sprintf("%s%020d", keyPending, seq) }

// ParseDoc reads a hub's twin document: {"desired":{...},"reported":{...}},
// each with its "$version", also when wrapped in a "properties" object.
func ParseDoc(b []byte) (desired, reported Doc, err error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return Doc{}, Doc{}, fmt.Errorf("twin: document: %w", err)
	}
	if p, ok := raw["properties"]; ok {
		raw = nil
		if err := json.Unmarshal(p, &raw); err != nil {
			return Doc{}, Doc{}, fmt.Errorf("twin: document: properties: %w", err)
		}
	}
	section := func(name string) (Doc, error) {
		d := Doc{Props: map[string]any{}}
		r, ok := raw[name]
		if !ok {
			return d, nil
		}
		dec := json.NewDecoder(bytes.NewReader(r))
		dec.UseNumber()
		if err := dec.Decode(&d.Props); err != nil || d.Props == nil {
			return d, fmt.Errorf("twin: document: %s is not an object", name)
		}
		if v, ok := d.Props["$version"]; ok {
			n, ok := v.(json.Number)
			if !ok {
				return d, fmt.Errorf("twin: document: %s.$version is not a number", name)
			}
			if d.Version, err = n.Int64(); err != nil {
				return d, fmt.Errorf("twin: document: %s.$version: %w", name, err)
			}
			delete(d.Props, "$version")
		}
		return d, nil
	}
	if desired, err = section("desired"); err != nil {
		return
	}
	reported, err = section("reported")
	return
}

// object decodes a JSON object, numbers kept exact.
func object(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil || m == nil || dec.More() {
		return nil, ErrBadPatch
	}
	return m, nil
}

// Merge applies a JSON merge patch (RFC 7396) to dst.
func Merge(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			sub, ok := dst[k].(map[string]any)
			if !ok {
				sub = map[string]any{}
			}
			Merge(sub, pv)
			dst[k] = sub
		default:
			dst[k] = v
		}
	}
}

// clone deep-copies a JSON object.
func clone(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			out[k] = clone(sub)
		} else {
			out[k] = v
		}
	}
	return out
}
