package storage

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestKV: values survive a reopen, namespaces are apart, the quota counts
// keys and values and is freed by deletes and overwrites, and the outbox
// does not see the entries.
func TestKV(t *testing.T) {
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	a, err := ob.KV("plugin-a", 100)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := ob.KV("plugin-b", 100)
	if err := a.Set([]byte("count"), []byte("41")); err != nil {
		t.Fatal(err)
	}
	if err := a.Set([]byte("count"), []byte("42")); err != nil { // an overwrite replaces its bytes
		t.Fatal(err)
	}
	if _, err := b.Get([]byte("count")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("another namespace sees the key: %v", err)
	}
	if used, _ := a.Used(); used != 7 {
		t.Fatalf("used %d, want 7 (key and value)", used)
	}
	if err := a.Set([]byte("big"), bytes.Repeat([]byte("x"), 91)); !errors.Is(err, ErrQuota) || !strings.Contains(err.Error(), "7 of 100 bytes used") {
		t.Fatalf("over the quota: %v", err)
	}
	if err := a.Set([]byte("big"), bytes.Repeat([]byte("x"), 90)); err != nil { // exactly the quota
		t.Fatal(err)
	}
	if err := a.Delete([]byte("big")); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete([]byte("never")); err != nil {
		t.Fatalf("deleting a missing key: %v", err)
	}
	if err := a.Set(nil, []byte("v")); err == nil {
		t.Fatal("an empty key was accepted")
	}
	if err := a.Set([]byte(strings.Repeat("k", MaxKVKey+1)), nil); err == nil {
		t.Fatal("a long key was accepted")
	}
	if st := ob.Stats(); st.Messages != 0 || st.Bytes != 0 {
		t.Fatalf("the outbox counts kv entries: %+v", st)
	}
	// A second handle on a namespace (an upgrade of the plugin) shares its
	// count, with its own quota; the first keeps its own.
	usedA, _ := a.Used()
	a2, _ := ob.KV("plugin-a", 10)
	if err := a2.Set([]byte("more"), []byte("x")); !errors.Is(err, ErrQuota) {
		t.Fatalf("over the second handle's quota: %v", err)
	}
	if used2, _ := a2.Used(); used2 != usedA {
		t.Fatalf("the handles count %d and %d bytes", usedA, used2)
	}
	if err := a.Set([]byte("more"), []byte("x")); err != nil {
		t.Fatalf("the first handle lost its quota to the second: %v", err)
	}
	if err := a.Delete([]byte("more")); err != nil {
		t.Fatal(err)
	}
	if err := a.Set([]byte("v"), make([]byte, MaxKVValue+1)); !errors.Is(err, ErrTooBig) {
		t.Fatalf("a value over the maximum: %v", err)
	}
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}
	ob = open(t, Options{Dir: dir})
	a, _ = ob.KV("plugin-a", 100)
	if v, err := a.Get([]byte("count")); err != nil || string(v) != "42" {
		t.Fatalf("after reopen: %q, %v", v, err)
	}
	if used, _ := a.Used(); used != 7 {
		t.Fatalf("after reopen used %d, want 7", used)
	}
	if st := ob.Stats(); st.Messages != 0 {
		t.Fatalf("the outbox loaded kv entries as messages: %+v", st)
	}
}
