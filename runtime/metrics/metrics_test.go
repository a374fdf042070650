package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestRates(t *testing.T) {
	var r Rates
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	r.Observe(t0, false, 0, 100)
	r.Observe(t0.Add(5*time.Second), false, 0, 200)
	if d := r.Offline(t0.Add(6 * time.Second)); d != 6*time.Second {
		t.Errorf("offline %v, want 6s", d)
	}
	if rate, ttd := r.Drain(200); rate != 0 || ttd != -1 {
		t.Errorf("offline: drain %v, time to drain %v; want 0, -1", rate, ttd)
	}
	// Connected: 1000 msg/s forwarded while 200 msg/s arrive; 12 s of
	// samples, the window keeps the last 10 s or so.
	fwd, acc := int64(0), int64(200)
	for i := 1; i <= 12; i++ {
		fwd += 1000
		acc += 200
		r.Observe(t0.Add(time.Duration(5+i)*time.Second), true, fwd, acc)
	}
	rate, ttd := r.Drain(1600)
	if rate < 999 || rate > 1001 {
		t.Errorf("drain rate %v, want 1000", rate)
	}
	if ttd != 2*time.Second {
		t.Errorf("time to drain 1600 at a net 800/s: %v, want 2s", ttd)
	}
	if _, ttd := r.Drain(0); ttd != 0 {
		t.Errorf("an empty backlog: time to drain %v", ttd)
	}
	// Offline counted 5s (t0 to the first connected sample at t0+6s: the
	// state at t0+5s was still offline) and no more.
	if d := r.Offline(t0.Add(time.Hour)); d != 6*time.Second {
		t.Errorf("offline after reconnecting: %v, want 6s", d)
	}
}

func TestHandler(t *testing.T) {
	snap := Snapshot{Version: "v1", DeviceID: "gw1", Ready: true,
		Broker: Broker{Clients: 3, Stored: 10, Refusals: map[string]int64{"acl": 4}},
		Outbox: Outbox{Messages: 4, Routes: []Route{{Name: "telemetry", Messages: 4, Bytes: 400, OldestAge: 2.5}},
			Dropped: map[string]int64{"ttl": 2}},
		Uplink: Uplink{Configured: true, Dialect: "azure", Connected: true, Forwarded: 7, Resent: 1, TimeToDrain: -1},
		Plugins: []Plugin{{Name: "echo", Version: "1.0.0", Calls: 3, Failures: map[string]int64{"trap": 1},
			LatencyBounds: []time.Duration{time.Millisecond, time.Second}, LatencyBuckets: []int64{1, 1, 1}, LatencySum: 6}},
	}
	rec := httptest.NewRecorder()
	Handler(func() Snapshot { return snap }).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`outpost_info{device_id="gw1",dialect="azure",version="v1"} 1`,
		`outpost_broker_clients 3`,
		`outpost_broker_denied_total{reason="acl"} 4`,
		`outpost_outbox_messages{route="telemetry"} 4`,
		`outpost_outbox_oldest_age_seconds{route="telemetry"} 2.5`,
		`outpost_outbox_dropped_total{reason="ttl"} 2`,
		`outpost_outbox_dropped_total{reason="evicted"} 0`,
		`outpost_outbox_time_to_drain_seconds +Inf`,
		`outpost_uplink_connected 1`,
		`outpost_uplink_resent_total 1`,
		`outpost_plugin_errors_total{kind="trap",plugin="echo"} 1`,
		`outpost_plugin_call_duration_seconds_bucket{plugin="echo",le="0.001"} 1`,
		`outpost_plugin_call_duration_seconds_bucket{plugin="echo",le="1"} 2`,
		`outpost_plugin_call_duration_seconds_count{plugin="echo"} 3`,
		`go_goroutines`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
