package dm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
)

// Commands are the operator's system commands, by action (reboot,
// factory_reset, install), each an argv run without a shell. The agent
// runs them, never a handler.
type Commands map[string][]string

// Has reports whether action has a command.
func (c Commands) Has(action string) bool { return len(c[action]) > 0 }

// Run runs the command of action with env added to the agent's
// environment, and fails with the end of its output when it exits non-zero.
func (c Commands) Run(ctx context.Context, action string, env map[string]string) error {
	argv := c[action]
	if len(argv) == 0 {
		return fmt.Errorf("dm: no %s command is configured", action)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = os.Environ()
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		cmd.Env = append(cmd.Env, k+"="+env[k])
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		tail := strings.TrimSpace(out.String())
		if len(tail) > 2048 {
			tail = "..." + tail[len(tail)-2048:]
		}
		return fmt.Errorf("dm: %s command %q: %w: %s", action, strings.Join(argv, " "), err, tail)
	}
	return nil
}
