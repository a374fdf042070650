package storage

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestBlobs(t *testing.T) {
	dir := t.TempDir()
	b, err := OpenBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	w, err := b.Create("fw-1")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write([]byte("hello "))
	if _, err := b.Open("fw-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a blob being written is visible: %v", err)
	}
	_, _ = w.Write([]byte("world"))
	if err := w.Commit(); err != nil || w.Size() != 11 {
		t.Fatalf("commit: %v size %d", err, w.Size())
	}
	p := make([]byte, 5)
	if n, err := b.ReadAt("fw-1", p, 6); err != nil || string(p[:n]) != "world" {
		t.Fatalf("read: %q %v", p[:n], err)
	}
	w2, _ := b.Create("fw-1")
	_, _ = w2.Write([]byte("partial"))
	w2.Abort()
	if n, _ := b.ReadAt("fw-1", p, 0); string(p[:n]) != "hello" {
		t.Fatalf("an aborted write replaced the blob: %q", p[:n])
	}
	// A crash in the middle of a write leaves a temporary file, which the
	// next open removes.
	w3, _ := b.Create("fw-2")
	_, _ = w3.Write([]byte("cut"))
	if _, err := OpenBlobs(dir); err != nil {
		t.Fatal(err)
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, ".tmp-*")); len(tmp) != 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
	if err := b.Remove("fw-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "fw-1")); !os.IsNotExist(err) {
		t.Fatal("removed blob still there")
	}
	for _, bad := range []string{"", "../x", ".hidden", "a/b", string(make([]byte, 201))} {
		if _, err := b.Create(bad); !errors.Is(err, ErrBadBlob) {
			t.Errorf("name %q: %v", bad, err)
		}
	}
}
