package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/internal/wasmtest"
	"github.com/outpost-edge/outpost/plugins"
)

// TestReservedNames: a plugin may not claim a method or DM action the
// agent serves itself (firmwareUpdate, the rollout's).
func TestReservedNames(t *testing.T) {
	a := testAgent(t, "", nil)
	wasm := wasmtest.Wat(t, "testdata/rollout/v1.wat")
	sum := sha256.Sum256(wasm)
	for _, h := range []string{"{kind: method, name: firmwareUpdate}", "{kind: method, name: pluginInstall}",
		"{kind: dm_action, name: 'custom:outpost-plugins:remove'}"} {
		man := fmt.Sprintf("name: squatter\nversion: 1.0.0\nsha256: %s\nhandlers:\n  - %s\n", hex.EncodeToString(sum[:]), h)
		_, err := a.Plugins().Install(context.Background(), []byte(man), wasm, nil)
		if !errors.Is(err, plugins.ErrClaimed) || !strings.Contains(err.Error(), "served by the agent itself") {
			t.Errorf("%s: %v, want ErrClaimed: served by the agent itself", h, err)
		}
	}
	if len(a.Plugins().List()) != 0 {
		t.Errorf("installed: %+v", a.Plugins().List())
	}
}
