package storage

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestState(t *testing.T) {
	dir := t.TempDir()
	ob := open(t, Options{Dir: dir})
	a, err := ob.State("journal")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := ob.State("journ") // a prefix of a's name: no overlap
	for i := range 3 {
		if err := a.Put(fmt.Sprintf("q/%03d", 2-i), []byte{byte(i)}, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Put("x", []byte("short-lived"), time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get("alq/000"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("another namespace sees a key: %v", err)
	}
	var keys []string
	if err := a.Scan("q/", func(k string, v []byte) error { keys = append(keys, fmt.Sprintf("%s=%d", k, v[0])); return nil }); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(keys) != "[q/000=2 q/001=1 q/002=0]" {
		t.Fatalf("scan: %v", keys)
	}
	if err := a.Delete("q/001"); err != nil {
		t.Fatal(err)
	}
	appendN(t, ob, "r", 2, "m") // state entries do not disturb the outbox
	if err := ob.Close(); err != nil {
		t.Fatal(err)
	}

	ob = open(t, Options{Dir: dir})
	if st := ob.Stats(); st.Messages != 2 {
		t.Fatalf("outbox after reopen: %d messages, want 2", st.Messages)
	}
	a, _ = ob.State("journal")
	if v, err := a.Get("q/002"); err != nil || v[0] != 0 {
		t.Fatalf("after reopen: %v %v", v, err)
	}
	if _, err := a.Get("q/001"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted key: %v", err)
	}
	time.Sleep(1100 * time.Millisecond)
	if _, err := a.Get("x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("entry past its TTL: %v", err)
	}
	if _, err := ob.State(""); err == nil {
		t.Fatal("empty namespace accepted")
	}
}
