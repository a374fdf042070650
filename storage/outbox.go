// Package storage holds Outpost's durable state on Badger: the outbox, a
// store-and-forward queue of messages waiting for the uplink.
//
// No Badger type appears in this package's exported API.
package storage

import (
	"errors"
	"log/slog"
	"time"
)

// Sentinel errors callers branch on.
var (
	// ErrFull is returned by Append when the outbox is at its byte or message
	// cap and the policy is RejectNew. Nothing was stored.
	ErrFull = errors.New("storage: outbox full")
	// ErrClosed is returned by every method after Close.
	ErrClosed = errors.New("storage: closed")
	// ErrUnknownRoute is returned by Append for a route the outbox was not opened with.
	ErrUnknownRoute = errors.New("storage: unknown route")
)

// Durability says when Append may return.
type Durability int

const (
	// DurabilityProcess returns once the write has reached the operating
	// system: the message survives kill -9 of the agent, not power loss.
	DurabilityProcess Durability = iota
	// DurabilityFsync returns once the write is synced to disk. Concurrent
	// appends share one sync (group commit).
	DurabilityFsync
)

// FullPolicy says what Append does when the outbox is at its cap.
type FullPolicy int

const (
	// DropOldest evicts the oldest messages of the lowest-priority route to
	// make room; each eviction is counted with reason "evicted".
	DropOldest FullPolicy = iota
	// RejectNew refuses the new message with ErrFull.
	RejectNew
)

// Drop reasons, as counted in Stats.Dropped.
const (
	ReasonTTL      = "ttl"      // the message expired before it was forwarded
	ReasonEvicted  = "evicted"  // removed to make room under DropOldest
	ReasonRejected = "rejected" // refused by Append under RejectNew
)

// Route is a FIFO lane of the outbox. Messages of one route are read in the
// order they were appended; between routes, higher Priority is read first.
type Route struct {
	Name     string        // 1 to 64 bytes, unique
	Priority int           // higher drains first
	TTL      time.Duration // default time to live of its messages; 0 = the global TTL
}

// Options configure an Outbox. Zero values take the documented defaults.
type Options struct {
	Dir        string     // Badger directory; required
	Durability Durability // default DurabilityProcess
	// NoCompression stores Badger's tables uncompressed: less CPU per
	// message when payloads do not compress, more disk and mapped memory
	// when they do. Tables already written keep their compression.
	NoCompression bool
	Routes        []Route // at least one

	MaxBytes    int64         // cap on stored bytes (keys + values); 0 = no cap
	MaxMessages int64         // cap on stored messages; 0 = no cap
	WhenFull    FullPolicy    // default DropOldest
	TTL         time.Duration // global default time to live; 0 = none

	// MaintenanceInterval is how often expired messages are swept and disk
	// space is reclaimed (Badger value-log GC and compaction). Default 1m.
	MaintenanceInterval time.Duration

	Logger *slog.Logger     // nil = discard
	Now    func() time.Time // clock, for tests; nil = time.Now
}

// Property is an MQTT 5 user property.
type Property struct {
	Key, Value string
}

// Message is one stored message. Memory returned by the outbox belongs to the
// caller.
type Message struct {
	Seq   uint64 // assigned by Append; strictly increasing across all routes, never reused
	Route string

	Topic           string
	Payload         []byte
	QoS             byte
	Retain          bool
	ContentType     string
	ResponseTopic   string
	CorrelationData []byte
	PayloadUTF8     bool // MQTT 5 Payload Format Indicator = 1
	UserProps       []Property

	Created time.Time // set by Append when zero
	Expires time.Time // zero = never; Append fills it from the route or global TTL when zero
}

// Ref names one stored message.
type Ref struct {
	Route string
	Seq   uint64
}

// Cursor is a read position: for each route, the highest sequence number
// already read. The zero Cursor (nil map) reads from the start.
type Cursor map[string]uint64

// RouteStats describe one route.
type RouteStats struct {
	Name     string
	Priority int
	Messages int64
	Bytes    int64
}

// Stats describe the whole outbox. Bytes is the stored size (keys and
// values) of the entries that hold the messages: messages appended together
// share an entry, which counts until all of them are acknowledged.
type Stats struct {
	Messages int64
	Bytes    int64
	Routes   []RouteStats     // in priority order, highest first
	Dropped  map[string]int64 // by reason: ReasonTTL, ReasonEvicted, ReasonRejected
}

// Compile-time guard that the implementation keeps this API.
var _ interface {
	Append(m *Message) error
	Next(c Cursor, max int) ([]Message, error)
	Ack(refs ...Ref) error
	Notify() <-chan struct{}
	Stats() Stats
	ID() string
	Close() error
} = (*Outbox)(nil)
