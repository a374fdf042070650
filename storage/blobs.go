package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// Blobs are large staged files (firmware images), one file each in a
// directory, written whole or not at all: a blob being written is a
// temporary file until Commit renames it into place, so a crash leaves no
// half image under a blob's name.
type Blobs struct {
	dir string
}

var blobName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$`)

// ErrBadBlob is returned for a blob name that is not 1 to 200 of A-Z a-z
// 0-9 . _ - starting with a letter or digit.
var ErrBadBlob = errors.New("storage: blob: bad name")

// OpenBlobs uses dir (created 0700), removing the temporary files a crash
// left.
func OpenBlobs(dir string) (*Blobs, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("storage: blobs: %w", err)
	}
	tmp, _ := filepath.Glob(filepath.Join(dir, ".tmp-*"))
	for _, f := range tmp {
		_ = os.Remove(f)
	}
	return &Blobs{dir: dir}, nil
}

// Path is where the blob name is (or would be) kept.
func (b *Blobs) Path(name string) (string, error) {
	if !blobName.MatchString(name) {
		return "", fmt.Errorf("%w: %q", ErrBadBlob, name)
	}
	return filepath.Join(b.dir, name), nil
}

// BlobWriter writes a blob; Commit makes it visible, Abort drops it.
type BlobWriter struct {
	f    *os.File
	path string
	n    int64
}

// Create starts writing the blob name, replacing any blob of that name at
// Commit.
func (b *Blobs) Create(name string) (*BlobWriter, error) {
	p, err := b.Path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(b.dir, ".tmp-"+name+"-")
	if err != nil {
		return nil, fmt.Errorf("storage: blob %s: %w", name, err)
	}
	return &BlobWriter{f: f, path: p}, nil
}

// Write appends to the blob.
func (w *BlobWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.n += int64(n)
	return n, err
}

// Size is the number of bytes written.
func (w *BlobWriter) Size() int64 { return w.n }

// Commit syncs the blob and renames it into place.
func (w *BlobWriter) Commit() error {
	err := w.f.Sync()
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(w.f.Name(), w.path)
	}
	if err != nil {
		_ = os.Remove(w.f.Name())
		return fmt.Errorf("storage: blob %s: %w", filepath.Base(w.path), err)
	}
	return syncDir(filepath.Dir(w.path))
}

// Abort drops what was written.
func (w *BlobWriter) Abort() {
	_ = w.f.Close()
	_ = os.Remove(w.f.Name())
}

// Open opens the blob name for reading; ErrNotFound when there is none.
func (b *Blobs) Open(name string) (*os.File, error) {
	p, err := b.Path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: blob %s", ErrNotFound, name)
	}
	return f, err
}

// Size is the size of the blob name; ErrNotFound when there is none.
func (b *Blobs) Size(name string) (int64, error) {
	p, err := b.Path(name)
	if err != nil {
		return 0, err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("%w: blob %s", ErrNotFound, name)
	}
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// List returns the names of the blobs that start with prefix.
func (b *Blobs) List(prefix string) []string {
	ents, _ := os.ReadDir(b.dir)
	var out []string
	for _, e := range ents {
		if n := e.Name(); !e.IsDir() && !strings.HasPrefix(n, ".") && strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

// Remove deletes the blob name; a missing blob is not an error.
func (b *Blobs) Remove(name string) error {
	p, err := b.Path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("storage: blob %s: %w", name, err)
	}
	return nil
}

// ReadAt reads the blob name at off into p, as io.ReaderAt does.
func (b *Blobs) ReadAt(name string, p []byte, off int64) (int, error) {
	f, err := b.Open(name)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("storage: sync %s: %w", dir, err)
	}
	return nil
}
