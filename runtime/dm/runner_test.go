package dm

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// scriptActions runs the install command as a real process.
type scriptActions struct {
	cmds    Commands
	mu      sync.Mutex
	dropped []string
}

func (s *scriptActions) Has(a string) bool { return s.cmds.Has(a) }
func (s *scriptActions) Run(ctx context.Context, a string, env map[string]string) error {
	return s.cmds.Run(ctx, a, env)
}
func (s *scriptActions) Drop(b string) { s.mu.Lock(); s.dropped = append(s.dropped, b); s.mu.Unlock() }

func runner(t *testing.T, m *Machine, acts Actions, ctx context.Context) (*Runner, chan Result) {
	done := make(chan Result, 4)
	return &Runner{Machine: m, Actions: acts, Blob: "img", Log: slog.New(slog.DiscardHandler), Ctx: ctx,
		Call: func(name string, _ []byte, fin func(Result)) {
			go func() { fin(Result{Status: 200}); done <- Result{Status: 200} }()
		}}, done
}

func staged(t *testing.T, m *Machine) {
	t.Helper()
	_ = m.SetParams(Params{Version: "2", URI: "http://fw/2"})
	_ = m.StartDownload()
	_ = m.Downloaded("img")
	if err := m.StartUpdate(); err != nil {
		t.Fatal(err)
	}
}

func waitState(t *testing.T, m *Machine, s, u int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for su(m) != [2]int{s, u} {
		if time.Now().After(deadline) {
			t.Fatalf("state %v, want (%d,%d)", su(m), s, u)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInstallOutcomes: the install command's success installs and drops
// the image, its failure fails the update, and an install ended by a
// signal (the reboot it asked for) or by the agent stopping stays in
// progress for the next start to decide.
func TestInstallOutcomes(t *testing.T) {
	for _, c := range []struct {
		name   string
		script string
		cancel bool
		want   [2]int
		drop   bool
	}{
		{"success", "exit 0", false, [2]int{0, 0}, true},
		{"failure", "exit 3", false, [2]int{0, UpdateUnsupportedImage}, true},
		{"killed by a signal", "kill -TERM $$; sleep 5", false, [2]int{2, UpdateInProgress}, false},
		{"agent stopping", "sleep 5", true, [2]int{2, UpdateInProgress}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, closeFn := open(t, t.TempDir())
			defer closeFn()
			staged(t, m)
			acts := &scriptActions{cmds: Commands{"install": {"sh", "-c", c.script}}}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r, _ := runner(t, m, acts, ctx)
			finished := make(chan bool, 1)
			r.Update(func(ok bool) { finished <- ok })
			if c.cancel {
				time.Sleep(200 * time.Millisecond)
				cancel()
			}
			if c.want == [2]int{2, UpdateInProgress} {
				time.Sleep(500 * time.Millisecond)
				if su(m) != c.want {
					t.Fatalf("state %v, want it left in progress", su(m))
				}
				select {
				case <-finished:
					t.Fatal("the update was reported finished")
				default:
				}
				return
			}
			<-finished
			waitState(t, m, c.want[0], c.want[1])
			if got := len(acts.dropped) == 1; got != c.drop {
				t.Fatalf("dropped %v", acts.dropped)
			}
		})
	}
}
