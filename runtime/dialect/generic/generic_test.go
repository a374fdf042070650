package generic

import "testing"

func TestTelemetryTopic(t *testing.T) {
	tests := []struct {
		prefix, device, local, want string
	}{
		{"outpost/{device_id}/", "gw-1", "plant/line1/temp", "outpost/gw-1/plant/line1/temp"},
		{"", "gw-1", "a/b", "a/b"},
		{"site/{device_id}/{device_id}/", "x", "t", "site/x/x/t"},
		{"fixed/", "gw", "/lead", "fixed//lead"},
	}
	for _, tc := range tests {
		if got := New(tc.prefix, tc.device).TelemetryTopic(tc.local); got != tc.want {
			t.Errorf("New(%q, %q).TelemetryTopic(%q) = %q, want %q", tc.prefix, tc.device, tc.local, got, tc.want)
		}
	}
}
