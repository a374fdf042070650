//go:build !wasip1

package guest

// Outside wasm there is no host: these let the package build, and its tests
// run, on the development machine.

func readPayload(p []byte, offset int) int { return 0 }

func hostLog(level int, msg string) {}

func logEnabled(level int) bool { return false }
