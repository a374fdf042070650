package uplink

// window is the QoS 1 publishes in flight on one connection, in the order
// they were sent. Each publish has an order number, one more than the
// previous one's, and its packet identifier follows from it:
// order%65535 + 1. A window never spans more than Receive Maximum (at most
// 65535) orders, so no identifier is in flight twice, and a PUBACK finds its
// publish by arithmetic instead of a map: a profile of a drain showed the
// map and the list kept beside it at a tenth of the publish loop's and the
// PUBACK reader's time.
//
// The publishes in [first, next) are all still in flight: a PUBACK removes
// its publish and every one sent before it (see take), so the window never
// has a gap. Not safe for concurrent use; the uplink guards it with its
// mutex.
type window struct {
	first, next uint64    // orders in flight: [first, next)
	ring        []pending // the publish of order o is at o & (len(ring)-1)
}

// idSpace is the number of packet identifiers: 1 to 65535.
const idSpace = 65535

// len is the number of publishes in flight.
func (w *window) len() int { return int(w.next - w.first) }

// add puts p in flight and returns its packet identifier.
func (w *window) add(p pending) uint16 {
	if w.len() == len(w.ring) {
		w.grow()
	}
	o := w.next
	w.next++
	w.ring[o&uint64(len(w.ring)-1)] = p
	return uint16(o%idSpace) + 1
}

func (w *window) grow() {
	ring := make([]pending, max(16, 2*len(w.ring)))
	for o := w.first; o < w.next; o++ {
		ring[o&uint64(len(ring)-1)] = w.ring[o&uint64(len(w.ring)-1)]
	}
	w.ring = ring
}

// take removes the publish with packet identifier id and returns it with
// the publishes sent before it, which are removed too: a receiver
// acknowledges QoS 1 publishes in the order it received them
// [MQTT-4.6.0-2], so those never reached it. found is false when id is not
// in flight.
func (w *window) take(id uint16) (p pending, skipped []pending, found bool) {
	if id == 0 || w.len() == 0 {
		return pending{}, nil, false
	}
	// The order in [first, first+idSpace) whose identifier is id.
	o := w.first + (uint64(id-1)+idSpace-w.first%idSpace)%idSpace
	if o >= w.next {
		return pending{}, nil, false
	}
	mask := uint64(len(w.ring) - 1)
	for ; w.first < o; w.first++ {
		skipped = append(skipped, w.ring[w.first&mask])
		w.ring[w.first&mask] = pending{}
	}
	p = w.ring[o&mask]
	w.ring[o&mask] = pending{}
	w.first++
	return p, skipped, true
}

// all returns the publishes in flight, oldest first.
func (w *window) all() []pending {
	out := make([]pending, 0, w.len())
	mask := uint64(len(w.ring) - 1)
	for o := w.first; o < w.next; o++ {
		out = append(out, w.ring[o&mask])
	}
	return out
}

// clear empties the window. Order numbers go on from where they were.
func (w *window) clear() {
	clear(w.ring)
	w.first = w.next
}
