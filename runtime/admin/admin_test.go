package admin

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestListenSocketMode: the socket is made for its owner only (0600), and a
// path that holds something other than a socket is left alone.
func TestListenSocketMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "outpost.sock")
	s, err := Listen(path, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, mode %v", err, fi.Mode())
	}
	if _, err := Listen(path, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "another agent is listening there") {
		t.Fatalf("a second agent on the socket: %v", err)
	}
	_ = s.Close(context.Background())

	file := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("a regular file at the path: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me" {
		t.Fatalf("the file at the path was changed: %q, %v", b, err)
	}
}
