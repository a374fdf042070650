package uplink

// window is the QoS 1 publishes in flight on one connection, in the order
// they were sent. Each publish has an order number, one more than the
// previous one's, and its packet identifier follows from it:
// order%65535 + 1. A PUBACK finds its publish by arithmetic instead of a
// map: a profile of a drain showed the map and the list kept beside it at a
// tenth of the publish loop's and the PUBACK reader's time.
//
// A PUBACK that overtakes earlier publishes makes them "skipped": they are
// sent again, but they keep their slot and identifier until their own PUBACK
// arrives (a server may acknowledge out of order; MQTT orders the PUBACKs of
// clients only) or the connection ends. So an identifier is never reused
// while the server may still acknowledge it: the window spans fewer than
// 65535 orders (see span), and [first, next) starts with a slot in use.
// Not safe for concurrent use; the uplink guards it with its mutex.
type window struct {
	first, next uint64 // orders in the window: [first, next)
	live        uint64 // no slot before this order is live
	ring        []slot // the slot of order o is at o & (len(ring)-1)
	n           int    // live and skipped slots
}

type slot struct {
	p     pending
	state byte
}

const (
	slotFree    = iota // acknowledged, or never used
	slotLive           // sent, not acknowledged
	slotSkipped        // a later publish was acknowledged first; sent again
)

// idSpace is the number of packet identifiers: 1 to 65535.
const idSpace = 65535

// len is the number of publishes the server may still acknowledge: what
// counts against its Receive Maximum.
func (w *window) len() int { return w.n }

// span is the number of orders from the oldest one in use to the next: it
// must stay below idSpace for identifiers to be unique.
func (w *window) span() int { return int(w.next - w.first) }

// add puts p in flight and returns its packet identifier. The caller makes
// sure that span() < idSpace.
func (w *window) add(p pending) uint16 {
	if w.span() == len(w.ring) {
		w.grow()
	}
	o := w.next
	w.next++
	w.n++
	w.ring[o&uint64(len(w.ring)-1)] = slot{p: p, state: slotLive}
	return uint16(o%idSpace) + 1
}

func (w *window) grow() {
	ring := make([]slot, max(16, 2*len(w.ring)))
	for o := w.first; o < w.next; o++ {
		ring[o&uint64(len(ring)-1)] = w.ring[o&uint64(len(w.ring)-1)]
	}
	w.ring = ring
}

// take handles the PUBACK of packet identifier id. When id is a live
// publish it returns it, found, and the live publishes sent before it,
// which become skipped: a receiver that acknowledges in order (every
// broker we know) never received them. When id is a skipped publish, its
// slot is freed and found is false: it was sent again, and that copy has
// its own PUBACK to come. Otherwise nothing changes.
func (w *window) take(id uint16) (p pending, skipped []pending, found bool) {
	if id == 0 || w.n == 0 {
		return pending{}, nil, false
	}
	// The order in [first, first+idSpace) whose identifier is id.
	o := w.first + (uint64(id-1)+idSpace-w.first%idSpace)%idSpace
	if o >= w.next {
		return pending{}, nil, false
	}
	mask := uint64(len(w.ring) - 1)
	s := &w.ring[o&mask]
	switch s.state {
	case slotFree:
		return pending{}, nil, false
	case slotSkipped:
		*s = slot{}
		w.n--
		w.trim()
		return pending{}, nil, false
	}
	for e := max(w.first, w.live); e < o; e++ {
		if q := &w.ring[e&mask]; q.state == slotLive {
			q.state = slotSkipped
			skipped = append(skipped, q.p)
		}
	}
	w.live = o + 1
	p = s.p
	*s = slot{}
	w.n--
	w.trim()
	return p, skipped, true
}

// trim moves first past the free slots at the front.
func (w *window) trim() {
	mask := uint64(len(w.ring) - 1)
	for w.first < w.next && w.ring[w.first&mask].state == slotFree {
		w.first++
	}
}

// all returns the live and skipped publishes, oldest first.
func (w *window) all() []pending {
	out := make([]pending, 0, w.n)
	mask := uint64(len(w.ring) - 1)
	for o := w.first; o < w.next; o++ {
		if s := w.ring[o&mask]; s.state != slotFree {
			out = append(out, s.p)
		}
	}
	return out
}

// clear empties the window. Order numbers go on from where they were.
func (w *window) clear() {
	clear(w.ring)
	w.first, w.live = w.next, w.next
	w.n = 0
}
