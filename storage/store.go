package storage

import (
	"bytes"
	stdcmp "cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// Key layout: 'o' | len(route) | route | last (8 bytes, big-endian) |
// count (4 bytes, big-endian) for a segment, the messages last-count+1 to
// last of one route, appended in one commit (record.go); 'm' | name for
// metadata. Ordered by last, a scan from 'o' | len | route | seq starts at
// the segment that holds seq, if one does. Stores written before segments
// hold one message per entry, keyed 'o' | len(route) | route | seq, with
// the bare record as the value; they are read as segments of one.
const (
	prefixMsg  = 'o'
	prefixMeta = 'm'
)

var metaStoreID = []byte{prefixMeta, 'i', 'd'}

func routePrefix(route string) []byte {
	k := make([]byte, 0, 2+len(route)+12)
	k = append(k, prefixMsg, byte(len(route)))
	return append(k, route...)
}

// seekKey is where a scan for the message seq of route starts.
func seekKey(route string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(routePrefix(route), seq)
}

// segment names one message entry.
type segment struct {
	route string
	last  uint64 // sequence number of its last message
	n     uint32 // messages in it, with consecutive sequence numbers
	bare  bool   // written before segments: one bare record, no count in the key
}

func (s segment) first() uint64 { return s.last - uint64(s.n) + 1 }

func (s segment) holds(seq uint64) bool { return seq >= s.first() && seq <= s.last }

func (s segment) key() []byte {
	k := seekKey(s.route, s.last)
	if s.bare {
		return k
	}
	return binary.BigEndian.AppendUint32(k, s.n)
}

func (s segment) id() segID { return segID{s.route, s.last} }

// parseKey reads a message entry's key.
func parseKey(k []byte) (segment, bool) {
	if len(k) < 2 || k[0] != prefixMsg {
		return segment{}, false
	}
	rl := int(k[1])
	if len(k) < 2+rl+8 {
		return segment{}, false
	}
	s := segment{route: string(k[2 : 2+rl]), last: binary.BigEndian.Uint64(k[2+rl:])}
	switch len(k) - 2 - rl {
	case 8:
		s.n, s.bare = 1, true
	case 12:
		s.n = binary.BigEndian.Uint32(k[2+rl+8:])
		if s.n == 0 || uint64(s.n) > s.last {
			return segment{}, false
		}
	default:
		return segment{}, false
	}
	return s, true
}

// segID identifies a segment in Outbox.done.
type segID struct {
	route string
	last  uint64
}

// segState records which messages of a segment are done (acknowledged,
// expired): bit i is its message first+i.
type segState struct {
	first uint64
	bits  []uint64
	left  uint32 // messages not done
}

func isDone(bits []uint64, first, seq uint64) bool {
	i := seq - first
	return bits != nil && bits[i/64]&(1<<(i%64)) != 0
}

// Bounds of a segment: a commit's messages for one route are split into
// segments of at most segMaxMsgs messages and segMaxBytes bytes (a larger
// message is a segment of its own). Eviction frees whole segments, so these
// also bound how many messages one eviction drops beyond what it must.
const (
	segMaxMsgs  = 64
	segMaxBytes = 64 << 10
)

// userMeta bit on a message entry: the record has an expiry.
const metaHasExpiry = 1

// routeState is the in-memory view of one route. Guarded by Outbox.mu.
type routeState struct {
	Route
	configured bool   // in Options.Routes; adopted routes only drain
	removed    bool   // configured until Reconfigure left it out
	prefix     []byte // key prefix
	count      int64
	bytes      int64
	last       uint64 // highest seq ever stored in this route
	hint       uint64 // no live message has a smaller seq
}

// Outbox is the durable store-and-forward queue. All methods are safe for
// concurrent use. Close it when done.
type Outbox struct {
	db   *badger.DB
	opts Options
	log  *slog.Logger
	now  func() time.Time
	id   string

	seq atomic.Uint64 // last assigned
	lim atomic.Pointer[Limits]

	mu      sync.Mutex // guards routes, order, served
	routes  map[string]*routeState
	order   []*routeState // priority, highest first
	served  int           // consecutive Next calls that passed over a lower-priority route
	dropped [3]atomic.Int64

	delMu sync.Mutex // serializes deletions, so existence checks and accounting agree

	// done holds, for each segment with some of its messages acknowledged
	// or expired, which ones; a segment is deleted when all are. Guarded by
	// mu. Lost on a restart: the segment's messages are sent again.
	done map[segID]*segState
	// retry holds segments all of whose messages are done but whose
	// deletion failed. Guarded by delMu.
	retry []segRef
	// failDeletes, set by tests, makes deletions fail when it returns an
	// error. Guarded by delMu.
	failDeletes func() error

	kvMu sync.Mutex
	kvs  map[string]*kvSpace // plugin namespaces, shared by their KV handles

	ackMu   sync.Mutex
	acks    []Ref
	ackWake chan struct{}

	// Appends go to one committer goroutine, which writes every append
	// waiting at that moment in one transaction (group commit) and assigns
	// sequence numbers in commit order, so they become visible in order.
	enqMu         sync.RWMutex // held for reading while enqueueing; Close takes it to close appendCh
	roomMu        sync.Mutex   // serializes checking the caps with reserving room for an append
	appendCh      chan *appendReq
	committerDone chan struct{}
	pendingCount  atomic.Int64 // enqueued, not yet committed: counted against the caps
	pendingBytes  atomic.Int64
	commits       atomic.Int64 // write transactions committed (for tests)

	notify chan struct{}
	closed atomic.Bool
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type appendReq struct {
	rs   *routeState
	val  []byte
	meta byte
	size int64
	seq  uint64 // set by the committer
	done func(seq uint64, err error)
}

var reasonIndex = map[string]int{ReasonTTL: 0, ReasonEvicted: 1, ReasonRejected: 2}

// Open opens (or creates) the outbox in opts.Dir and rebuilds its counters
// from what is stored.
func Open(opts Options) (*Outbox, error) {
	if opts.Dir == "" {
		return nil, errors.New("storage: no directory")
	}
	if len(opts.Routes) == 0 {
		return nil, errors.New("storage: no route")
	}
	if opts.MaintenanceInterval <= 0 {
		opts.MaintenanceInterval = time.Minute
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	o := &Outbox{
		opts:    opts,
		log:     log,
		now:     now,
		routes:  map[string]*routeState{},
		done:    map[segID]*segState{},
		ackWake: make(chan struct{}, 1),
		notify:  make(chan struct{}, 1),
	}
	o.lim.Store(&Limits{MaxBytes: opts.MaxBytes, MaxMessages: opts.MaxMessages, WhenFull: opts.WhenFull, TTL: opts.TTL})
	for _, r := range opts.Routes {
		if r.Name == "" || len(r.Name) > 64 {
			return nil, fmt.Errorf("storage: route %q: name must be 1 to 64 bytes", r.Name)
		}
		if o.routes[r.Name] != nil {
			return nil, fmt.Errorf("storage: route %q defined twice", r.Name)
		}
		o.routes[r.Name] = &routeState{Route: r, configured: true, prefix: routePrefix(r.Name)}
	}

	db, err := badger.Open(badgerOptions(opts, log))
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", opts.Dir, err)
	}
	o.db = db
	if err := o.load(); err != nil {
		db.Close()
		return nil, err
	}
	o.sortRoutes()

	o.ctx, o.cancel = context.WithCancel(context.Background())
	o.appendCh = make(chan *appendReq, appendQueue)
	o.committerDone = make(chan struct{})
	go o.committer()
	o.wg.Add(2)
	go o.ackFlusher()
	go o.maintainer()
	return o, nil
}

// badgerOptions sizes Badger for a gateway: small memtables and caches keep
// RSS low with a large backlog and leave the Go collector room under the
// agent's memory limit (docs/DECISIONS.md); values up to 512 KiB live in the
// LSM tree, larger ones in the value log.
func badgerOptions(opts Options, log *slog.Logger) badger.Options {
	return badger.DefaultOptions(opts.Dir).
		WithLogger(badgerLogger{log}).
		WithSyncWrites(opts.Durability == DurabilityFsync).
		// Badger allows a value threshold up to 15% of the memtable.
		WithMemTableSize(4 << 20).
		WithValueThreshold(512 << 10).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBlockCacheSize(8 << 20).
		WithIndexCacheSize(8 << 20).
		WithValueLogFileSize(64 << 20).
		WithNumCompactors(2).
		WithNumVersionsToKeep(1).
		WithCompression(compression(opts.NoCompression)).
		// Appends write fresh keys and deletions are serialized by delMu, so
		// transactions never conflict: skip the bookkeeping.
		WithDetectConflicts(false).
		WithMetricsEnabled(false)
}

func compression(off bool) options.CompressionType {
	if off {
		return options.None
	}
	return options.Snappy
}

// load reads the store id and rebuilds every route's counters with a
// key-only scan.
func (o *Outbox) load() error {
	err := o.db.Update(func(txn *badger.Txn) error {
		item, err := txn.Get(metaStoreID)
		if err == nil {
			return item.Value(func(v []byte) error { o.id = string(v); return nil })
		}
		if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		var b [8]byte
		_, _ = rand.Read(b[:])
		o.id = hex.EncodeToString(b[:])
		return txn.Set(metaStoreID, []byte(o.id))
	})
	if err != nil {
		return fmt.Errorf("storage: store id: %w", err)
	}
	var maxSeq uint64
	err = o.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixMsg}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			s, ok := parseKey(item.Key())
			if !ok {
				continue
			}
			rs := o.routes[s.route]
			if rs == nil {
				// A route no longer configured: keep draining it, last.
				rs = &routeState{Route: Route{Name: s.route, Priority: math.MinInt32}, prefix: routePrefix(s.route)}
				o.routes[s.route] = rs
				o.log.Warn("draining messages of a route that is no longer configured", "route", s.route)
			}
			if rs.count == 0 {
				rs.hint = s.first()
			}
			rs.count += int64(s.n)
			rs.bytes += int64(len(item.Key())) + int64(item.ValueSize())
			rs.last = max(rs.last, s.last)
			maxSeq = max(maxSeq, s.last)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: scan: %w", err)
	}
	o.seq.Store(maxSeq)
	return nil
}

func (o *Outbox) sortRoutes() {
	o.order = o.order[:0]
	for _, r := range o.routes {
		o.order = append(o.order, r)
	}
	slices.SortStableFunc(o.order, func(a, b *routeState) int {
		if a.Priority != b.Priority {
			return b.Priority - a.Priority
		}
		return bytes.Compare(a.prefix, b.prefix)
	})
}

// Limits are the outbox's caps and default time to live, which
// Reconfigure can change while it runs.
type Limits struct {
	MaxBytes    int64         // 0 = no cap
	MaxMessages int64         // 0 = no cap
	WhenFull    FullPolicy    // DropOldest or RejectNew
	TTL         time.Duration // global default time to live; 0 = none
}

// Reconfigure changes the routes and the limits while the outbox runs.
// A new route takes messages at once; a route left out drains what it
// holds, last (it still takes what a router not yet replaced sends it); the priority and TTL of a route apply to
// what is read and appended from then on (a stored message keeps its
// expiry). Messages already stored are neither moved nor dropped, even
// when the new caps are lower: the next append makes room.
func (o *Outbox) Reconfigure(routes []Route, lim Limits) error {
	seen := map[string]bool{}
	for _, r := range routes {
		if r.Name == "" || len(r.Name) > 64 {
			return fmt.Errorf("storage: route %q: name must be 1 to 64 bytes", r.Name)
		}
		if seen[r.Name] {
			return fmt.Errorf("storage: route %q defined twice", r.Name)
		}
		seen[r.Name] = true
	}
	if len(routes) == 0 {
		return errors.New("storage: at least one route is required")
	}
	if o.closed.Load() {
		return ErrClosed
	}
	o.mu.Lock()
	for name, rs := range o.routes {
		if !seen[name] && rs.configured {
			rs.configured, rs.removed = false, true
			rs.Priority, rs.TTL = math.MinInt32, 0
			o.log.Info("route removed: it drains what it holds, last", "route", name, "messages", rs.count)
		}
	}
	for _, r := range routes {
		if rs := o.routes[r.Name]; rs != nil {
			rs.Priority, rs.TTL, rs.configured, rs.removed = r.Priority, r.TTL, true, false
		} else {
			o.routes[r.Name] = &routeState{Route: r, configured: true, prefix: routePrefix(r.Name)}
		}
	}
	o.sortRoutes()
	o.mu.Unlock()
	l := lim
	o.lim.Store(&l)
	return nil
}

// ID returns the store's random identifier, made when it was created.
func (o *Outbox) ID() string { return o.id }

// MessageID returns the stable upstream id of the message with seq.
func (o *Outbox) MessageID(seq uint64) string {
	return o.id + "-" + strconv.FormatUint(seq, 10)
}

// Notify returns a channel that receives a value after appends. It is
// meant for one consumer.
func (o *Outbox) Notify() <-chan struct{} { return o.notify }

func (o *Outbox) drop(reason string, n int64) {
	o.dropped[reasonIndex[reason]].Add(n)
}

// appendQueue bounds the appends waiting for the committer; more block the
// caller (backpressure on the publishers).
const appendQueue = 4096

// Append stores m and assigns m.Seq. Under DurabilityProcess the write has
// reached the operating system when Append returns; under DurabilityFsync it
// is on disk. Concurrent appends share one write (group commit). Appends
// that are waiting to be written count against the caps.
func (o *Outbox) Append(m *Message) error {
	type result struct {
		seq uint64
		err error
	}
	ch := make(chan result, 1)
	if err := o.AppendAsync(m, func(seq uint64, err error) { ch <- result{seq, err} }); err != nil {
		return err
	}
	r := <-ch
	if r.err != nil {
		return r.err
	}
	m.Seq = r.seq
	return nil
}

// AppendAsync is Append without the wait: it checks m against the route and
// the caps, encodes it (m is not used after it returns), queues the write,
// and returns. done is then called exactly once, from the committer
// goroutine, when the write is as durable as Append would make it, or
// failed; it must not block. An error returned by AppendAsync itself
// (ErrClosed, ErrUnknownRoute, ErrFull) means nothing was queued and done
// is not called.
func (o *Outbox) AppendAsync(m *Message, done func(seq uint64, err error)) error {
	o.mu.Lock()
	rs := o.routes[m.Route]
	var routeTTL time.Duration
	// A route Reconfigure just removed still takes the appends of a
	// router that has not yet been replaced: it drains them last. A route
	// only adopted at Open (stored, not configured) takes none.
	known := rs != nil && (rs.configured || rs.removed)
	if known {
		routeTTL = rs.TTL
	}
	o.mu.Unlock()
	if !known {
		return fmt.Errorf("%w %q", ErrUnknownRoute, m.Route)
	}
	lim := o.lim.Load()
	if m.Created.IsZero() {
		m.Created = o.now()
	}
	if m.Expires.IsZero() {
		if ttl := cmp(routeTTL, lim.TTL); ttl > 0 {
			m.Expires = m.Created.Add(ttl)
		}
	}
	val := encodeRecord(nil, m)
	size := int64(2+len(m.Route)+8) + int64(len(val))
	var meta byte
	if !m.Expires.IsZero() {
		meta = metaHasExpiry
	}
	o.enqMu.RLock()
	defer o.enqMu.RUnlock()
	if o.closed.Load() {
		return ErrClosed
	}
	o.roomMu.Lock()
	if err := o.makeRoom(size); err != nil {
		o.roomMu.Unlock()
		return err
	}
	o.pendingCount.Add(1)
	o.pendingBytes.Add(size)
	o.roomMu.Unlock()
	o.appendCh <- &appendReq{rs: rs, val: val, meta: meta, size: size, done: done}
	return nil
}

// stored counts a written segment. It moves its messages from pending to
// stored in one step under o.mu, where totals reads both.
func (o *Outbox) stored(w *segWrite) {
	o.mu.Lock()
	w.rs.count += int64(w.seg.n)
	w.rs.bytes += w.size
	w.rs.last = max(w.rs.last, w.seg.last)
	for _, r := range w.reqs {
		o.pendingCount.Add(-1)
		o.pendingBytes.Add(-r.size)
	}
	o.mu.Unlock()
}

// cmp returns a if it is set, else b.
func cmp(a, b time.Duration) time.Duration {
	if a > 0 {
		return a
	}
	return b
}

// makeRoom applies the caps before an append of size bytes. o.roomMu must
// be held.
func (o *Outbox) makeRoom(size int64) error {
	lim := o.lim.Load()
	maxB, maxM := lim.MaxBytes, lim.MaxMessages
	if maxB <= 0 && maxM <= 0 {
		return nil
	}
	if maxB > 0 && size > maxB {
		o.drop(ReasonRejected, 1)
		return fmt.Errorf("%w: a %d-byte message is larger than the %d-byte cap", ErrFull, size, maxB)
	}
	for {
		st := o.totals(true)
		if (maxB <= 0 || st.bytes+size <= maxB) && (maxM <= 0 || st.count+1 <= maxM) {
			return nil
		}
		if lim.WhenFull == RejectNew {
			o.drop(ReasonRejected, 1)
			return ErrFull
		}
		var needBytes, needMsgs int64
		if maxB > 0 {
			needBytes = st.bytes + size - maxB
		}
		if maxM > 0 {
			needMsgs = st.count + 1 - maxM
		}
		n, err := o.evictOldest(needBytes, needMsgs)
		if err != nil {
			return err
		}
		if n == 0 {
			// Nothing left to evict (everything in flight was acked meanwhile).
			return nil
		}
	}
}

type totals struct{ count, bytes int64 }

// totals sums the stored messages, with those waiting for the committer
// (which will be stored) when pending is set. o.roomMu must be held for
// pending, so that no append reserves room meanwhile.
func (o *Outbox) totals(pending bool) totals {
	o.mu.Lock()
	defer o.mu.Unlock()
	var t totals
	for _, r := range o.routes {
		t.count += r.count
		t.bytes += r.bytes
	}
	if pending {
		t.count += o.pendingCount.Load()
		t.bytes += o.pendingBytes.Load()
	}
	return t
}

// evictOldest deletes the oldest segments of the lowest-priority non-empty
// route until at least needBytes and needMsgs are freed (or the route is
// empty), and returns how many segments it deleted.
func (o *Outbox) evictOldest(needBytes, needMsgs int64) (int, error) {
	o.flushAcks()
	o.delMu.Lock()
	defer o.delMu.Unlock()
	o.mu.Lock()
	var rs *routeState
	for i := len(o.order) - 1; i >= 0; i-- {
		if o.order[i].count > 0 {
			rs = o.order[i]
			break
		}
	}
	var from uint64
	if rs != nil {
		from = rs.hint
	}
	o.mu.Unlock()
	if rs == nil {
		return 0, nil
	}
	var segs []segRef
	err := o.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: rs.prefix})
		defer it.Close()
		var freedBytes, freedMsgs int64
		for it.Seek(seekKey(rs.Name, from)); it.Valid() && len(segs) < 1000; it.Next() {
			if freedBytes >= needBytes && freedMsgs >= needMsgs {
				break
			}
			item := it.Item()
			s, ok := parseKey(item.Key())
			if !ok {
				continue
			}
			segs = append(segs, segRef{rs: rs, seg: s, size: int64(len(item.Key())) + int64(item.ValueSize())})
			freedBytes += segs[len(segs)-1].size
			freedMsgs += o.left(s)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("storage: evict: %w", err)
	}
	n, err := o.deleteLocked(segs, ReasonEvicted)
	if len(segs) > 0 {
		o.mu.Lock()
		rs.hint = max(rs.hint, segs[len(segs)-1].seg.last+1)
		o.mu.Unlock()
	}
	if n > 0 {
		o.log.Debug("evicted oldest messages to make room", "route", rs.Name, "count", n)
	}
	return len(segs), err
}

// left returns how many messages of s are not done.
func (o *Outbox) left(s segment) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	if st := o.done[s.id()]; st != nil {
		return int64(st.left)
	}
	return int64(s.n)
}

// segRef is a stored segment: its route, name and stored size (key and
// value).
type segRef struct {
	rs   *routeState
	seg  segment
	size int64
}

// deleteLocked deletes stored segments, updates the counters, and counts
// the messages in them that were not done yet as dropped for reason (none
// for ""). It returns that number. o.delMu must be held, so that the
// segments still exist.
func (o *Outbox) deleteLocked(segs []segRef, reason string) (int, error) {
	dropped := 0
	for len(segs) > 0 {
		chunk := segs[:min(len(segs), 1000)]
		segs = segs[len(chunk):]
		err := o.db.Update(func(txn *badger.Txn) error {
			if o.failDeletes != nil {
				if err := o.failDeletes(); err != nil {
					return err
				}
			}
			for _, s := range chunk {
				if err := txn.Delete(s.seg.key()); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			if reason != "" && dropped > 0 {
				o.drop(reason, int64(dropped))
			}
			return dropped, fmt.Errorf("storage: delete: %w", err)
		}
		o.commits.Add(1)
		o.mu.Lock()
		for _, s := range chunk {
			left := int64(s.seg.n)
			if st := o.done[s.seg.id()]; st != nil {
				left = int64(st.left)
				delete(o.done, s.seg.id())
			}
			s.rs.count -= left
			s.rs.bytes -= s.size
			if s.rs.count == 0 {
				// Badger reports the size of a value in the value log
				// within a few bytes only: do not let that add up.
				s.rs.bytes = 0
			}
			dropped += int(left)
		}
		o.mu.Unlock()
	}
	if reason != "" && dropped > 0 {
		o.drop(reason, int64(dropped))
	}
	return dropped, nil
}

// mark names one message of a stored segment.
type mark struct {
	segRef
	seq uint64
}

// finishLocked marks messages done (acknowledged for reason "", else
// dropped and counted for reason), and deletes the segments all of whose
// messages are done. Marking a message done twice has no effect. o.delMu
// must be held.
func (o *Outbox) finishLocked(marks []mark, reason string) error {
	var full []segRef
	newly := 0
	o.mu.Lock()
	for len(marks) > 0 {
		// The marks of one segment: adjacent, in order.
		id := marks[0].seg.id()
		j, ordered := 1, true
		for j < len(marks) && marks[j].seg.id() == id {
			ordered = ordered && marks[j].seq > marks[j-1].seq
			j++
		}
		group := marks[:j]
		marks = marks[j:]
		st := o.done[id]
		if st == nil && ordered && len(group) == int(group[0].seg.n) {
			// All of it at once, the usual case: no state to keep.
			// deleteLocked takes the messages off the count.
			newly += len(group)
			full = append(full, group[0].segRef)
			continue
		}
		for _, m := range group {
			if st == nil {
				st = &segState{first: m.seg.first(), bits: make([]uint64, (m.seg.n+63)/64), left: m.seg.n}
				o.done[id] = st
			}
			i := m.seq - st.first
			if st.bits[i/64]&(1<<(i%64)) != 0 {
				continue
			}
			st.bits[i/64] |= 1 << (i % 64)
			st.left--
			m.rs.count--
			newly++
			if st.left == 0 {
				full = append(full, m.segRef)
			}
		}
	}
	o.mu.Unlock()
	if reason != "" && newly > 0 {
		o.drop(reason, int64(newly))
	}
	if _, err := o.deleteLocked(full, ""); err != nil {
		// Their messages are all done: delete them later (retryDeletes).
		o.retry = append(o.retry, full...)
		return err
	}
	return nil
}

// retryDeletesLocked deletes the segments a failed deletion left, those
// still stored. o.delMu must be held.
func (o *Outbox) retryDeletesLocked() {
	if len(o.retry) == 0 {
		return
	}
	var stored []segRef
	err := o.db.View(func(txn *badger.Txn) error {
		for _, s := range o.retry {
			_, err := txn.Get(s.seg.key())
			if err == nil {
				stored = append(stored, s)
			} else if !errors.Is(err, badger.ErrKeyNotFound) {
				return err
			}
		}
		return nil
	})
	if err == nil {
		_, err = o.deleteLocked(stored, "")
	}
	if err != nil {
		o.log.Error("deleting acknowledged messages failed again; will retry", "segments", len(o.retry), "error", err)
		return
	}
	o.retry = nil
}

// committer writes the queued appends: everything waiting when it wakes
// goes into one transaction (split only where Badger's transaction limit
// requires), so concurrent appends share one write and, in fsync mode, one
// sync. It runs until Close closes appendCh, writing what was queued
// before.
func (o *Outbox) committer() {
	defer close(o.committerDone)
	batch := make([]*appendReq, 0, maxBatch)
	for r := range o.appendCh {
		batch = append(batch[:0], r)
		size := len(r.val)
	fill:
		for len(batch) < maxBatch && size < maxBatchBytes {
			select {
			case r, ok := <-o.appendCh:
				if !ok {
					break fill
				}
				batch = append(batch, r)
				size += len(r.val)
			default:
				break fill
			}
		}
		o.commitBatch(batch)
	}
}

// Bounds of one group commit.
const (
	maxBatch      = 1024
	maxBatchBytes = 4 << 20
)

// segWrite is one segment being written: consecutive appends to one route.
type segWrite struct {
	rs    *routeState
	seg   segment
	size  int64 // key and value
	reqs  []*appendReq
	entry *badger.Entry
}

// segments groups batch into segments, per route in arrival order, and
// assigns sequence numbers: consecutive within a segment, and in the order
// of the returned list, which is the order they are committed in, so they
// become visible in order.
func (o *Outbox) segments(batch []*appendReq) []*segWrite {
	var byRoute []*routeState
	groups := map[*routeState][]*appendReq{}
	for _, r := range batch {
		if _, ok := groups[r.rs]; !ok {
			byRoute = append(byRoute, r.rs)
		}
		groups[r.rs] = append(groups[r.rs], r)
	}
	var out []*segWrite
	for _, rs := range byRoute {
		reqs := groups[rs]
		for len(reqs) > 0 {
			n, bytes := 1, len(reqs[0].val)
			for n < len(reqs) && n < segMaxMsgs && bytes+len(reqs[n].val) <= segMaxBytes {
				bytes += len(reqs[n].val)
				n++
			}
			chunk := reqs[:n:n]
			reqs = reqs[n:]
			last := o.seq.Add(uint64(n))
			w := &segWrite{rs: rs, seg: segment{route: rs.Name, last: last, n: uint32(n)}, reqs: chunk}
			val := make([]byte, 0, bytes+3*n)
			var meta byte
			for i, r := range chunk {
				r.seq = last - uint64(n-1-i)
				val = appendFramed(val, r.val)
				meta |= r.meta
			}
			key := w.seg.key()
			w.size = int64(len(key) + len(val))
			w.entry = badger.NewEntry(key, val).WithMeta(meta)
			out = append(out, w)
		}
	}
	return out
}

// commitBatch writes batch, in as few transactions as Badger allows, and
// reports each append's outcome.
func (o *Outbox) commitBatch(batch []*appendReq) {
	segs := o.segments(batch)
	txn := o.db.NewTransaction(true)
	first := 0 // segs[first:] are not reported yet
	report := func(ws []*segWrite, err error) {
		for _, w := range ws {
			if err == nil {
				o.stored(w)
			} else {
				for _, r := range w.reqs {
					o.pendingCount.Add(-1)
					o.pendingBytes.Add(-r.size)
				}
			}
			for _, r := range w.reqs {
				if err != nil {
					r.done(0, fmt.Errorf("storage: append %s: %w", w.rs.Name, err))
				} else {
					r.done(r.seq, nil)
				}
			}
		}
	}
	// commit writes segs[first:upTo], which are in txn, and starts a new
	// transaction.
	commit := func(upTo int) {
		if upTo == first {
			txn.Discard()
		} else {
			err := txn.Commit()
			o.commits.Add(1)
			report(segs[first:upTo], err)
		}
		first = upTo
		txn = o.db.NewTransaction(true)
	}
	for i, w := range segs {
		err := txn.SetEntry(w.entry)
		if errors.Is(err, badger.ErrTxnTooBig) && i > first {
			commit(i) // write what fits, go on in a new transaction
			err = txn.SetEntry(w.entry)
		}
		if err != nil {
			// w alone cannot be written (larger than Badger takes in one
			// transaction): write the ones before it, refuse it.
			commit(i)
			report(segs[i:i+1], err)
			first = i + 1
		}
	}
	commit(len(segs))
	txn.Discard()
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

// Next returns up to max messages after the cursor, all from one route: the
// highest-priority route with messages after its cursor position. After 64
// calls in a row that passed over a lower-priority route with pending
// messages, that route is served once (starvation guard). Next does not move
// the cursor. Expired messages it meets are deleted and counted.
func (o *Outbox) Next(c Cursor, max int) ([]Message, error) {
	if o.closed.Load() {
		return nil, ErrClosed
	}
	if max <= 0 {
		return nil, nil
	}
	for _, rs := range o.candidates(c) {
		msgs, err := o.read(rs, c[rs.Name], max)
		if err != nil || len(msgs) > 0 {
			return msgs, err
		}
	}
	return nil, nil
}

// candidates returns the routes with messages after the cursor, in the
// order to try them.
func (o *Outbox) candidates(c Cursor) []*routeState {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []*routeState
	for _, rs := range o.order {
		if rs.count > 0 && rs.last > c[rs.Name] && rs.last >= rs.hint {
			out = append(out, rs)
		}
	}
	if len(out) > 1 && out[0].Priority > out[len(out)-1].Priority {
		o.served++
		if o.served >= 64 {
			o.served = 0
			// Serve the first route of lower priority than the top one.
			for i, rs := range out {
				if rs.Priority < out[0].Priority {
					out[0], out[i] = out[i], out[0]
					break
				}
			}
		}
	} else {
		o.served = 0
	}
	return out
}

func (o *Outbox) read(rs *routeState, after uint64, max int) ([]Message, error) {
	o.mu.Lock()
	from := after + 1
	fromHint := rs.hint >= from
	if fromHint {
		from = rs.hint
	}
	lastAtStart := rs.last
	o.mu.Unlock()
	now := o.now()
	var msgs []Message
	var expired []mark
	err := o.db.View(func(txn *badger.Txn) error {
		// No prefetching: Badger fetches each prefetched value on a goroutine
		// of its own, and the values here are small and read in order.
		it := txn.NewIterator(badger.IteratorOptions{Prefix: rs.prefix})
		defer it.Close()
		for it.Seek(seekKey(rs.Name, from)); it.Valid() && len(msgs) < max; it.Next() {
			item := it.Item()
			s, ok := parseKey(item.Key())
			if !ok {
				continue
			}
			val, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			ref := segRef{rs: rs, seg: s, size: int64(len(item.Key())) + int64(item.ValueSize())}
			first, bits := s.first(), o.doneBits(s)
			visit := func(i int, rec []byte) bool {
				seq := first + uint64(i)
				if seq < from || isDone(bits, first, seq) {
					return true
				}
				m := Message{Seq: seq, Route: rs.Name}
				if err := decodeRecord(rec, &m); err != nil {
					o.log.Error("unreadable message: skipped", "route", rs.Name, "seq", seq, "error", err)
					return true
				}
				if !m.Expires.IsZero() && !now.Before(m.Expires) {
					expired = append(expired, mark{ref, seq})
					return true
				}
				msgs = append(msgs, m)
				return len(msgs) < max
			}
			if s.bare {
				visit(0, val)
			} else if err := splitSegment(val, int(s.n), visit); err != nil {
				o.log.Error("unreadable messages: skipped", "route", rs.Name, "from", first, "to", s.last, "error", err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: read %s: %w", rs.Name, err)
	}
	if len(expired) > 0 {
		o.delMu.Lock()
		err := o.finishLocked(o.existing(expired), ReasonTTL)
		o.delMu.Unlock()
		if err != nil {
			return msgs, err
		}
	}
	if len(msgs) == 0 && fromHint {
		// Nothing live from the hint to the end of the route as it was when
		// the read started (appends become visible in order).
		o.mu.Lock()
		rs.hint = max2(rs.hint, lastAtStart+1)
		o.mu.Unlock()
	}
	return msgs, nil
}

// Oldest returns when the oldest message of each route that holds any was
// accepted (its Created time). It reads one message per route; messages
// expired on the way are dropped as Next drops them.
func (o *Outbox) Oldest() (map[string]time.Time, error) {
	if o.closed.Load() {
		return nil, ErrClosed
	}
	o.mu.Lock()
	routes := make([]*routeState, 0, len(o.order))
	for _, rs := range o.order {
		if rs.count > 0 {
			routes = append(routes, rs)
		}
	}
	o.mu.Unlock()
	out := make(map[string]time.Time, len(routes))
	for _, rs := range routes {
		msgs, err := o.read(rs, 0, 1)
		if err != nil {
			return out, err
		}
		if len(msgs) > 0 {
			out[rs.Name] = msgs[0].Created
		}
	}
	return out, nil
}

// doneBits returns a copy of which messages of s are done, or nil if none.
func (o *Outbox) doneBits(s segment) []uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	if st := o.done[s.id()]; st != nil {
		return slices.Clone(st.bits)
	}
	return nil
}

func max2(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// Ack deletes acknowledged messages. It is idempotent. Deletions are
// batched in the background within ackGather; Stats reflect them once
// written. A crash before that only makes the message be sent again.
func (o *Outbox) Ack(refs ...Ref) error {
	o.ackMu.Lock()
	// Checked under ackMu: Close marks the outbox closed before its last
	// flush takes the pending list, so an Ack is either in that list or
	// refused.
	if o.closed.Load() {
		o.ackMu.Unlock()
		return ErrClosed
	}
	before := len(o.acks)
	o.acks = append(o.acks, refs...)
	after := len(o.acks)
	o.ackMu.Unlock()
	// Wake the flusher for the first pending acknowledgement, which starts
	// its gathering time, and when a batch is full.
	if before == 0 || (before < ackBatch && after >= ackBatch) {
		select {
		case o.ackWake <- struct{}{}:
		default:
		}
	}
	return nil
}

const (
	// ackGather is how long the flusher lets acknowledgements gather
	// before it deletes them, unless ackBatch are pending sooner. One
	// Badger transaction per batch costs less than one per few: while a
	// backlog drains, flushing at once made batches of about 30.
	ackGather = 5 * time.Millisecond
	ackBatch  = 1024
)

func (o *Outbox) ackFlusher() {
	defer o.wg.Done()
	t := time.NewTimer(ackGather)
	t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-o.ackWake:
		}
		t.Reset(ackGather)
	gather:
		for o.pendingAcks() < ackBatch {
			select {
			case <-o.ctx.Done():
				t.Stop()
				return // Close writes what is pending
			case <-t.C:
				break gather
			case <-o.ackWake:
			}
		}
		t.Stop()
		o.flushAcks()
	}
}

// pendingAcks is the number of acknowledgements not yet written.
func (o *Outbox) pendingAcks() int {
	o.ackMu.Lock()
	defer o.ackMu.Unlock()
	return len(o.acks)
}

// flushAcks writes the pending acknowledgements. It holds delMu from before
// it takes the pending list, so it also waits for a flush in progress: when
// it returns, every Ack that returned before it is reflected in Stats.
func (o *Outbox) flushAcks() {
	o.delMu.Lock()
	defer o.delMu.Unlock()
	o.retryDeletesLocked()
	o.ackMu.Lock()
	refs := o.acks
	o.acks = nil
	o.ackMu.Unlock()
	if len(refs) == 0 {
		return
	}
	slices.SortFunc(refs, func(a, b Ref) int {
		if c := strings.Compare(a.Route, b.Route); c != 0 {
			return c
		}
		return stdcmp.Compare(a.Seq, b.Seq)
	})
	refs = slices.Compact(refs) // the same message may be acknowledged more than once
	var marks []mark
	err := o.db.View(func(txn *badger.Txn) error {
		var it *badger.Iterator
		defer func() {
			if it != nil {
				it.Close()
			}
		}()
		var cur segRef
		have := false
		for i, r := range refs {
			if i == 0 || r.Route != refs[i-1].Route {
				if it != nil {
					it.Close()
				}
				o.mu.Lock()
				rs := o.routes[r.Route]
				o.mu.Unlock()
				if rs == nil {
					it = nil
					continue
				}
				it = txn.NewIterator(badger.IteratorOptions{Prefix: rs.prefix})
				cur, have = segRef{rs: rs}, false
			}
			if it == nil {
				continue
			}
			if !have || !cur.seg.holds(r.Seq) {
				// Acknowledged messages are mostly consecutive: step to the
				// next entry when it is the one, seek past a gap (a seek
				// searches every level of the LSM tree).
				if have {
					it.Next()
				}
				if !have || !it.Valid() || !entryHolds(it.Item(), r.Seq) {
					it.Seek(seekKey(r.Route, r.Seq))
				}
				have = false
				if !it.Valid() {
					continue
				}
				s, ok := parseKey(it.Item().Key())
				if !ok || !s.holds(r.Seq) {
					continue // no longer stored
				}
				cur.seg, cur.size, have = s, int64(len(it.Item().Key()))+int64(it.Item().ValueSize()), true
			}
			marks = append(marks, mark{cur, r.Seq})
		}
		return nil
	})
	if err == nil {
		err = o.finishLocked(marks, "")
	}
	if err != nil {
		o.log.Error("deleting acknowledged messages failed; they will be sent again", "count", len(refs), "error", err)
	}
}

// Stats returns the counters.
func (o *Outbox) Stats() Stats {
	s := Stats{Dropped: map[string]int64{}}
	for r, i := range reasonIndex {
		s.Dropped[r] = o.dropped[i].Load()
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, rs := range o.order {
		s.Messages += rs.count
		s.Bytes += rs.bytes
		s.Routes = append(s.Routes, RouteStats{Name: rs.Name, Priority: rs.Priority, Messages: rs.count, Bytes: rs.bytes})
	}
	return s
}

func (o *Outbox) maintainer() {
	defer o.wg.Done()
	t := time.NewTicker(o.opts.MaintenanceInterval)
	defer t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
		}
		if err := o.Maintain(); err != nil {
			o.log.Warn("maintenance", "error", err)
		}
	}
}

// Maintain runs one maintenance pass now: it deletes expired messages and
// reclaims disk space (compaction and value-log GC).
func (o *Outbox) Maintain() error {
	if o.closed.Load() {
		return ErrClosed
	}
	o.flushAcks()
	if err := o.sweepExpired(); err != nil {
		return err
	}
	st := o.totals(false)
	if st.count == 0 {
		// An empty outbox: compact everything so deleted data leaves the disk.
		if err := o.db.Flatten(1); err != nil {
			return fmt.Errorf("storage: compact: %w", err)
		}
	}
	for {
		if err := o.db.RunValueLogGC(0.5); err != nil {
			if errors.Is(err, badger.ErrNoRewrite) || errors.Is(err, badger.ErrRejected) {
				return nil
			}
			return fmt.Errorf("storage: value log gc: %w", err)
		}
	}
}

// entryHolds reports whether the message entry item holds seq.
func entryHolds(item *badger.Item, seq uint64) bool {
	s, ok := parseKey(item.Key())
	return ok && s.holds(seq)
}

// sweepExpired deletes expired messages: a key-only scan finds the entries
// flagged with an expiry; only those are read.
func (o *Outbox) sweepExpired() error {
	now := o.now()
	var expired []mark
	err := o.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixMsg}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			if item.UserMeta()&metaHasExpiry == 0 {
				continue
			}
			s, ok := parseKey(item.Key())
			if !ok {
				continue
			}
			o.mu.Lock()
			rs := o.routes[s.route]
			o.mu.Unlock()
			if rs == nil {
				continue
			}
			ref := segRef{rs: rs, seg: s, size: int64(len(item.Key())) + int64(item.ValueSize())}
			first, bits := s.first(), o.doneBits(s)
			visit := func(i int, rec []byte) bool {
				seq := first + uint64(i)
				var m Message
				if !isDone(bits, first, seq) && decodeRecord(rec, &m) == nil && !m.Expires.IsZero() && !now.Before(m.Expires) {
					expired = append(expired, mark{ref, seq})
				}
				return true
			}
			err := item.Value(func(v []byte) error {
				if s.bare {
					visit(0, v)
					return nil
				}
				return splitSegment(v, int(s.n), visit)
			})
			if err != nil {
				o.log.Error("unreadable messages: not checked for expiry", "route", s.route, "from", first, "to", s.last, "error", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: sweep: %w", err)
	}
	if len(expired) == 0 {
		return nil
	}
	o.delMu.Lock()
	defer o.delMu.Unlock()
	return o.finishLocked(o.existing(expired), ReasonTTL)
}

// existing returns the marks whose segments are still stored. The marks
// were found before o.delMu was taken, which must be held now. Marks of one
// segment are adjacent.
func (o *Outbox) existing(marks []mark) []mark {
	out := marks[:0]
	err := o.db.View(func(txn *badger.Txn) error {
		var last segID
		keep := false
		for i, m := range marks {
			if i == 0 || m.seg.id() != last {
				last = m.seg.id()
				_, err := txn.Get(m.seg.key())
				if err != nil && !errors.Is(err, badger.ErrKeyNotFound) {
					return err
				}
				keep = err == nil
			}
			if keep {
				out = append(out, m)
			}
		}
		return nil
	})
	if err != nil {
		o.log.Error("checking expired messages failed; they will be checked again", "error", err)
		return nil
	}
	return out
}

// Close writes pending acknowledgements, stops the background work and
// closes the store. Later calls return ErrClosed.
func (o *Outbox) Close() error {
	if !o.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	// No append is enqueued after this; the committer writes what is queued.
	o.enqMu.Lock()
	close(o.appendCh)
	o.enqMu.Unlock()
	<-o.committerDone
	o.cancel()
	o.wg.Wait()
	o.flushAcks()
	if err := o.db.Close(); err != nil {
		return fmt.Errorf("storage: close: %w", err)
	}
	return nil
}

// badgerLogger sends Badger's warnings and errors to slog.
type badgerLogger struct{ log *slog.Logger }

func (l badgerLogger) Errorf(f string, a ...any) {
	l.log.Error("badger: " + trim(fmt.Sprintf(f, a...)))
}
func (l badgerLogger) Warningf(f string, a ...any) {
	l.log.Warn("badger: " + trim(fmt.Sprintf(f, a...)))
}
func (l badgerLogger) Infof(string, ...any)  {}
func (l badgerLogger) Debugf(string, ...any) {}

func trim(s string) string { return string(bytes.TrimSpace([]byte(s))) }
