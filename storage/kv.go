package storage

import (
	"errors"
	"fmt"
	"sync"

	"github.com/dgraph-io/badger/v4"
)

// prefixKV keys a plugin's key/value entries: 'k' | len(ns) | ns | key.
const prefixKV = 'k'

// Errors of KV.
var (
	ErrNotFound = errors.New("storage: kv: no such key")
	ErrQuota    = errors.New("storage: kv: over the quota")
	ErrBadKV    = errors.New("storage: kv: bad key")
	ErrTooBig   = errors.New("storage: kv: value too large")
)

// Bounds of a KV entry.
const (
	MaxKVKey   = 256
	MaxKVValue = 64 << 10
)

// KV is a handle on one plugin's key/value namespace in the store, bounded
// by its quota on the bytes of the namespace's keys and values. Writes are
// as durable as appends (DurabilityProcess or DurabilityFsync). Safe for
// concurrent use.
type KV struct {
	*kvSpace
	quota int64
}

// kvSpace is a namespace, shared by its handles: one count of its usage.
type kvSpace struct {
	o      *Outbox
	prefix []byte

	mu    sync.Mutex // serializes writes, so the usage stays exact
	used  int64
	ready bool
}

// KV returns a handle on the namespace ns (a plugin name, at most 255
// bytes) with a quota in bytes (keys and values). Handles on one namespace
// share its usage, so two versions of a plugin count the same bytes, each
// against its own quota: a version that is refused leaves the serving
// one's quota as it was.
func (o *Outbox) KV(ns string, quota int64) (*KV, error) {
	if ns == "" || len(ns) > 255 {
		return nil, fmt.Errorf("storage: kv: namespace %q: want 1 to 255 bytes", ns)
	}
	o.kvMu.Lock()
	defer o.kvMu.Unlock()
	if o.kvs == nil {
		o.kvs = map[string]*kvSpace{}
	}
	sp := o.kvs[ns]
	if sp == nil {
		sp = &kvSpace{o: o, prefix: append([]byte{prefixKV, byte(len(ns))}, ns...)}
		o.kvs[ns] = sp
	}
	return &KV{kvSpace: sp, quota: quota}, nil
}

func (kv *KV) key(k []byte) []byte { return append(append([]byte(nil), kv.prefix...), k...) }

func checkKey(k []byte) error {
	if len(k) == 0 || len(k) > MaxKVKey {
		return fmt.Errorf("%w: a key of %d bytes (want 1 to %d)", ErrBadKV, len(k), MaxKVKey)
	}
	return nil
}

// Get returns the value of k, or ErrNotFound.
func (kv *KV) Get(k []byte) ([]byte, error) {
	if kv.o.closed.Load() {
		return nil, ErrClosed
	}
	if err := checkKey(k); err != nil {
		return nil, err
	}
	v, err := kv.o.value(kv.key(k))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("storage: kv: get: %w", err)
	}
	return v, err
}

// value reads one key's value: ErrNotFound when it has none, ErrClosed
// once the store is closed.
func (o *Outbox) value(k []byte) ([]byte, error) {
	if o.closed.Load() {
		return nil, ErrClosed
	}
	var v []byte
	err := o.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(k)
		if err != nil {
			return err
		}
		v, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	return v, err
}

// Set stores v under k, or returns ErrQuota when the namespace would pass
// its quota.
func (kv *KV) Set(k, v []byte) error {
	if err := checkKey(k); err != nil {
		return err
	}
	if len(v) > MaxKVValue {
		return fmt.Errorf("%w: %d bytes (at most %d)", ErrTooBig, len(v), MaxKVValue)
	}
	return kv.write(k, func(txn *badger.Txn, old int64) (int64, error) {
		n := int64(len(k) + len(v))
		if kv.used-old+n > kv.quota {
			return 0, fmt.Errorf("%w: %d of %d bytes used, %d more asked", ErrQuota, kv.used, kv.quota, n-old)
		}
		return n, txn.Set(kv.key(k), v)
	})
}

// Delete removes k; deleting a missing key is not an error.
func (kv *KV) Delete(k []byte) error {
	if err := checkKey(k); err != nil {
		return err
	}
	return kv.write(k, func(txn *badger.Txn, _ int64) (int64, error) {
		return 0, txn.Delete(kv.key(k))
	})
}

// write runs fn in a write transaction, with the size the key holds now;
// fn returns the size it will hold.
func (kv *KV) write(k []byte, fn func(txn *badger.Txn, old int64) (int64, error)) error {
	if kv.o.closed.Load() {
		return ErrClosed
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	if err := kv.load(); err != nil {
		return err
	}
	var old, now int64
	err := kv.o.db.Update(func(txn *badger.Txn) error {
		item, err := txn.Get(kv.key(k))
		switch {
		case err == nil:
			old = int64(len(k)) + item.ValueSize()
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		now, err = fn(txn, old)
		return err
	})
	if err != nil {
		if errors.Is(err, ErrQuota) {
			return err
		}
		return fmt.Errorf("storage: kv: %w", err)
	}
	if kv.o.opts.Durability == DurabilityFsync {
		if err := kv.o.db.Sync(); err != nil {
			return fmt.Errorf("storage: kv: sync: %w", err)
		}
	}
	kv.used += now - old
	return nil
}

// load sums the namespace's usage once. kv.mu must be held.
func (kv *KV) load() error {
	if kv.ready {
		return nil
	}
	var used int64
	err := kv.o.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: kv.prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			used += int64(len(it.Item().Key())-len(kv.prefix)) + it.Item().ValueSize()
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: kv: %w", err)
	}
	kv.used, kv.ready = used, true
	return nil
}

// Used returns the bytes the namespace holds.
func (kv *KV) Used() (int64, error) {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	err := kv.load()
	return kv.used, err
}
