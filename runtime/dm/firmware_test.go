package dm

import (
	"errors"
	"testing"

	"github.com/outpost-edge/outpost/storage"
)

func open(t *testing.T, dir string) (*Machine, func()) {
	t.Helper()
	ob, err := storage.Open(storage.Options{Dir: dir, Routes: []storage.Route{{Name: "r"}}})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := ob.State("dm")
	m, err := Open(st, "fw/self")
	if err != nil {
		t.Fatal(err)
	}
	return m, func() { _ = ob.Close() }
}

func rc(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.RC
	}
	if err != nil {
		return -1
	}
	return 0
}

func su(m *Machine) [2]int { r := m.Get(); return [2]int{r.State, r.UpdateStatus} }

// TestTransitions follows the transition table of PROTOCOLS.md 2.4.
func TestTransitions(t *testing.T) {
	m, done := open(t, t.TempDir())
	defer done()
	if got := rc(m.StartDownload()); got != 400 {
		t.Fatalf("download without a uri: rc %d, want 400", got)
	}
	if got := rc(m.SetParams(Params{Version: "2.0", URI: "ftp://x/fw"})); got != 0 {
		t.Fatal(got)
	}
	if got := rc(m.StartDownload()); got != 400 {
		t.Fatalf("download from an invalid uri: rc %d, want 400", got)
	}
	if got := rc(m.StartUpdate()); got != 400 || su(m) != [2]int{0, 0} {
		t.Fatalf("update before download: rc %d state %v, want 400 and unchanged", got, su(m))
	}
	_ = m.SetParams(Params{Version: "2.0", URI: "https://fw.example/2.0.bin", Verifier: "sha256:" + zeros})
	if got := rc(m.StartDownload()); got != 0 || su(m) != [2]int{1, 0} {
		t.Fatalf("download: rc %d state %v", got, su(m))
	}
	if got := rc(m.StartDownload()); got != 400 {
		t.Fatalf("download while downloading: %d, want 400", got)
	}
	if got := rc(m.SetParams(Params{URI: "https://other"})); got != 400 {
		t.Fatalf("new parameters while downloading: %d, want 400", got)
	}
	if err := m.DownloadFailed(UpdateVerificationFailed); err != nil || su(m) != [2]int{0, 4} {
		t.Fatalf("verification failed: %v %v", err, su(m))
	}
	_ = m.StartDownload()
	if err := m.Downloaded("fw-2.0"); err != nil || su(m) != [2]int{2, 4} || m.Get().Blob != "fw-2.0" {
		t.Fatalf("downloaded: %v %+v", err, m.Get())
	}
	if got := rc(m.StartDownload()); got != 400 {
		t.Fatalf("download with an image waiting: %d, want 400", got)
	}
	if got := rc(m.SetParams(Params{Version: "9", URI: "https://other"})); got != 400 || m.Get().Version != "2.0" {
		t.Fatalf("new parameters with an image waiting: %d %+v, want 400 and unchanged", got, m.Get())
	}
	if err := m.StartUpdate(); err != nil || su(m) != [2]int{2, 1} {
		t.Fatalf("update: %v %v", err, su(m))
	}
	if got := rc(m.StartUpdate()); got != 400 {
		t.Fatalf("update while updating: %d", got)
	}
	if err := m.Updated(); err != nil || su(m) != [2]int{0, 0} || m.Get().Installed != "2.0" || m.Get().Blob != "" {
		t.Fatalf("updated: %v %+v", err, m.Get())
	}
	_ = m.StartDownload()
	_ = m.Downloaded("b")
	_ = m.StartUpdate()
	if err := m.UpdateFailed(UpdateUnsupportedImage); err != nil || su(m) != [2]int{0, 5} || m.Get().Installed != "2.0" {
		t.Fatalf("update failed: %v %+v", err, m.Get())
	}
}

const zeros = "0000000000000000000000000000000000000000000000000000000000000000"

// TestRecover: a download cut by a restart starts again, at most
// MaxAttempts times, then fails as Connection Lost; an update cut by a
// restart is handed to the caller to check; the state survives reopening.
func TestRecover(t *testing.T) {
	dir := t.TempDir()
	m, done := open(t, dir)
	_ = m.SetParams(Params{Version: "3", URI: "http://fw/3"})
	_ = m.StartDownload()
	done()
	for i := 2; i <= MaxAttempts; i++ {
		m, done = open(t, dir)
		if res, err := m.Recover(); err != nil || res != RestartDownload || m.Get().Attempts != i {
			t.Fatalf("restart %d: %v %v %+v", i, res, err, m.Get())
		}
		done()
	}
	m, done = open(t, dir)
	if res, _ := m.Recover(); res != Nothing || su(m) != [2]int{0, UpdateConnectionLost} {
		t.Fatalf("after %d starts: %v %v, want failed with connection lost", MaxAttempts, res, su(m))
	}
	_ = m.StartDownload()
	_ = m.Downloaded("img")
	_ = m.StartUpdate()
	done()
	m, done = open(t, dir)
	defer done()
	if res, _ := m.Recover(); res != CheckUpdate || su(m) != [2]int{2, 1} {
		t.Fatalf("update cut by a restart: %v %v", res, su(m))
	}
}

func TestParseVerifier(t *testing.T) {
	for in, want := range map[string]string{"": "", "sha256:" + zeros: zeros, "ABCDEF" + zeros[6:]: "abcdef" + zeros[6:]} {
		if got, err := ParseVerifier(in); err != nil || got != want {
			t.Errorf("%q: %q %v", in, got, err)
		}
	}
	for _, bad := range []string{"md5:abc", "sha256:xyz", zeros[1:]} {
		if _, err := ParseVerifier(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
