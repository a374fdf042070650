package storage

import (
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// prefixState keys the agent's own state: 's' | len(ns) | ns | key.
const prefixState = 's'

// State is a namespace of the agent's own durable state (the command
// journal, the twin, the device-management state), apart from the
// plugins' key/value namespaces. Writes are as durable as appends. Safe for
// concurrent use; a read-modify-write needs the caller's own lock.
type State struct {
	o      *Outbox
	prefix []byte
}

// State returns the namespace ns (1 to 255 bytes).
func (o *Outbox) State(ns string) (*State, error) {
	if ns == "" || len(ns) > 255 {
		return nil, fmt.Errorf("storage: state: namespace %q: want 1 to 255 bytes", ns)
	}
	return &State{o: o, prefix: append([]byte{prefixState, byte(len(ns))}, ns...)}, nil
}

func (s *State) key(k string) []byte { return append(append([]byte(nil), s.prefix...), k...) }

// Get returns the value of k, or ErrNotFound.
func (s *State) Get(k string) ([]byte, error) {
	v, err := s.o.value(s.key(k))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("storage: state: get: %w", err)
	}
	return v, err
}

// Put stores v under k. A positive ttl makes the entry disappear after
// that long.
func (s *State) Put(k string, v []byte, ttl time.Duration) error {
	return s.update(func(txn *badger.Txn) error {
		e := badger.NewEntry(s.key(k), v)
		if ttl > 0 {
			e = e.WithTTL(ttl)
		}
		return txn.SetEntry(e)
	})
}

// Delete removes k; deleting a missing key is not an error.
func (s *State) Delete(k string) error {
	return s.update(func(txn *badger.Txn) error { return txn.Delete(s.key(k)) })
}

// Scan calls fn for each entry whose key starts with prefix, in key
// order, until fn returns an error (which Scan returns).
func (s *State) Scan(prefix string, fn func(k string, v []byte) error) error {
	if s.o.closed.Load() {
		return ErrClosed
	}
	p := s.key(prefix)
	return s.o.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: p, PrefetchValues: true, PrefetchSize: 16})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return fmt.Errorf("storage: state: scan: %w", err)
			}
			if err := fn(string(it.Item().Key()[len(s.prefix):]), v); err != nil {
				return err
			}
		}
		return nil
	})
}

// update runs fn in a write transaction and syncs in fsync mode.
func (s *State) update(fn func(txn *badger.Txn) error) error {
	if s.o.closed.Load() {
		return ErrClosed
	}
	if err := s.o.db.Update(fn); err != nil {
		return fmt.Errorf("storage: state: %w", err)
	}
	if s.o.opts.Durability == DurabilityFsync {
		if err := s.o.db.Sync(); err != nil {
			return fmt.Errorf("storage: state: sync: %w", err)
		}
	}
	return nil
}
