package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMakeInstall stages make install in a directory (DESTDIR) and checks
// what it installs: the agent, the first-party handlers, a unit that
// systemd accepts with an exposure of at most 2.5 by systemd-analyze
// security, the system user, and a default configuration the agent
// accepts, kept on a second install.
func TestMakeInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed")
	}
	dest := t.TempDir()
	bin := filepath.Join(t.TempDir(), "outpost")
	install := func() string {
		t.Helper()
		cmd := exec.Command("make", "-s", "-C", "../..", "install", "DESTDIR="+dest, "PREFIX=/usr", "BIN="+bin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
		return string(out)
	}
	install()
	for _, f := range []string{"usr/bin/outpost", "etc/systemd/system/outpost.service", "etc/outpost/config.yaml",
		"usr/lib/sysusers.d/outpost.conf", "usr/share/outpost/plugins/firmware/module.wasm",
		"usr/share/outpost/plugins/firmware/manifest.yaml", "usr/share/outpost/plugins/device/module.wasm",
		"usr/share/doc/outpost/OPERATIONS.md"} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: %s", f)
		}
	}
	if fi, err := os.Stat(filepath.Join(dest, "etc/outpost/config.yaml")); err == nil && fi.Mode().Perm() != 0o640 {
		t.Errorf("config.yaml mode %v, want 0640 (it may hold keys)", fi.Mode().Perm())
	}
	agent := filepath.Join(dest, "usr/bin/outpost")
	if out, err := exec.Command(agent, "config", "validate", filepath.Join(dest, "etc/outpost/config.yaml")).CombinedOutput(); err != nil {
		t.Errorf("the installed configuration: %v\n%s", err, out)
	}
	out, err := exec.Command(agent, "plugin", "inspect", filepath.Join(dest, "usr/share/outpost/plugins/firmware/module.wasm")).CombinedOutput()
	if err != nil {
		t.Errorf("the installed firmware handler: %v\n%s", err, out)
	}
	unit, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/outpost.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/outpost run --config /etc/outpost/config.yaml") {
		t.Errorf("the unit does not run the installed agent on the installed configuration:\n%s", unit)
	}
	// A second install keeps the operator's configuration.
	if err := os.WriteFile(filepath.Join(dest, "etc/outpost/config.yaml"), []byte("device_id: mine\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if out := install(); !strings.Contains(out, "kept") {
		t.Errorf("the second install does not say it kept the configuration:\n%s", out)
	}
	if b, _ := os.ReadFile(filepath.Join(dest, "etc/outpost/config.yaml")); string(b) != "device_id: mine\n" {
		t.Errorf("the second install replaced the configuration: %q", b)
	}

	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze is not installed: the unit's checks are skipped")
		return
	}
	// verify needs the binary where the unit says: a copy of the unit
	// pointing at the staged one.
	local := filepath.Join(t.TempDir(), "outpost.service")
	if err := os.WriteFile(local, []byte(strings.ReplaceAll(string(unit), "/usr/bin/outpost", agent)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", local).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	if out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "--threshold=25", "--root="+dest,
		"outpost.service").CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze security: exposure above 2.5: %v\n%s", err, out)
	}
}
