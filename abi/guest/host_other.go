//go:build !wasip1

package guest

import "github.com/outpost-edge/outpost/abi"

// Outside wasm there is no host: these let the package build, and its tests
// run, on the development machine.

func readPayload(p []byte, offset int) int { return 0 }

func hostLog(level int, msg string) {}

func logEnabled(level int) bool { return false }

func kvGetHost(string) ([]byte, error) { return nil, abi.ErrUnavailable }

func kvSetHost(string, []byte) error { return abi.ErrUnavailable }

func kvDeleteHost(string) error { return abi.ErrUnavailable }

func publishHost(string, []byte, int) error { return abi.ErrUnavailable }

func httpGetHost(string, string) (int64, error) { return 0, abi.ErrUnavailable }

func blobSizeHost(string) (int64, error) { return 0, abi.ErrUnavailable }

func blobReadHost(string, []byte, int64) (int, error) { return 0, abi.ErrUnavailable }

func blobDeleteHost(string) error { return abi.ErrUnavailable }

func progressHost(int, string) error { return abi.ErrUnavailable }

func twinGetHost() ([]byte, error) { return nil, abi.ErrUnavailable }

func twinReportHost([]byte) error { return abi.ErrUnavailable }
