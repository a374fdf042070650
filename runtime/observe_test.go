package runtime

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/mosqtest"
	"github.com/outpost-edge/outpost/internal/mqtttest"
)

// scrape reads the metrics over HTTP and returns the value of each series
// named by a regular expression over its line (name and labels).
func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, b)
	}
	return string(b)
}

// metric returns the value of the series whose name and labels are exactly
// series, or fails.
func metric(t *testing.T, body, series string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no series %s in:\n%s", series, body)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestMetricsMove: under a scripted workload, scraped over HTTP, the
// metrics move as documented (docs/OPERATIONS.md): the backlog and its age
// while the upstream is down, the offline time, forwarding and the drain
// once it is back, drops by ttl, plugin calls and errors by kind, local
// clients; and /readyz stays 200 while the uplink is down.
func TestMetricsMove(t *testing.T) {
	requireClients(t)
	mosqtest.Require(t, "mosquitto_rr")
	up := mosqtest.StartT(t, mosqtest.Options{})
	if err := up.Stop(); err != nil {
		t.Fatal(err)
	}
	a := testAgent(t, up.URL(), func(c *Config) {
		c.Admin.HTTP = "127.0.0.1:0"
		c.Routes = []RouteConfig{
			{Name: "short", Match: []string{"short/#"}, TTL: Duration(200 * time.Millisecond)},
			{Name: "telemetry", Match: []string{"#"}},
		}
	})
	installGuest(t, a)
	addr := a.AdminHTTPAddr()

	body := scrape(t, addr)
	if v := metric(t, body, "outpost_uplink_connected"); v != 0 {
		t.Errorf("uplink_connected %v with the upstream down", v)
	}
	if v := metric(t, body, `outpost_outbox_messages{route="telemetry"}`); v != 0 {
		t.Errorf("outbox_messages %v at start", v)
	}
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	var ready map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&ready)
	resp.Body.Close()
	if resp.StatusCode != 200 || ready["uplink"] != "down (messages are stored)" {
		t.Errorf("/readyz with the uplink down: %d %v; want 200, the uplink reported down", resp.StatusCode, ready)
	}

	// 500 readings and 5 short-lived ones while the upstream is down; a
	// local client stays connected.
	_ = mqtttest.Client(t, a.BrokerAddrs()[0], "watcher")
	publishLines(t, a.BrokerAddrs()[0], "meter/1", 0, 500)
	publishLines(t, a.BrokerAddrs()[0], "short/1", 0, 5)
	host, port := hostPort(t, a.BrokerAddrs()[0])
	for _, m := range []string{"echo", "panic", "panic"} {
		if _, err := run(t, 30*time.Second, "mosquitto_rr", "-h", host, "-p", port, "-t", "outpost/methods/"+m, "-e", "r/"+m, "-m", "x", "-W", "20"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, func() error {
		body = scrape(t, addr)
		if v := metric(t, body, `outpost_outbox_dropped_total{reason="ttl"}`); v != 5 {
			// Expired messages are dropped when a read or the sweep meets them.
			return fmt.Errorf("dropped ttl %v, want 5", v)
		}
		if v := metric(t, body, "outpost_uplink_offline_seconds_total"); v < 0.5 {
			return fmt.Errorf("offline seconds %v", v)
		}
		return nil
	})
	for series, want := range map[string]float64{
		`outpost_outbox_messages{route="telemetry"}`:                 500,
		`outpost_broker_clients`:                                     1,
		`outpost_broker_stored_total`:                                505,
		`outpost_plugin_calls_total{plugin="tools",version="1.0.0"}`: 3,
		`outpost_plugin_errors_total{kind="trap",plugin="tools"}`:    2,
		`outpost_plugin_errors_total{kind="timeout",plugin="tools"}`: 0,
		`outpost_plugin_call_duration_seconds_count{plugin="tools"}`: 3,
		`outpost_uplink_forwarded_total`:                             0,
		`outpost_outbox_time_to_drain_seconds`:                       -1, // +Inf, below
	} {
		got := metric(t, body, series)
		if series == "outpost_outbox_time_to_drain_seconds" {
			if !regexp.MustCompile(`(?m)^outpost_outbox_time_to_drain_seconds \+Inf$`).MatchString(body) {
				t.Errorf("time to drain %v while nothing drains, want +Inf", got)
			}
			continue
		}
		if got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if v := metric(t, body, `outpost_outbox_oldest_age_seconds{route="telemetry"}`); v <= 0 {
		t.Errorf("oldest age %v with a backlog", v)
	}
	offline := metric(t, body, "outpost_uplink_offline_seconds_total")

	// The upstream returns: the backlog drains.
	if err := up.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, func() error {
		body = scrape(t, addr)
		if v := metric(t, body, `outpost_outbox_messages{route="telemetry"}`); v != 0 {
			return fmt.Errorf("backlog %v", v)
		}
		return nil
	})
	for series, want := range map[string]float64{
		"outpost_uplink_connected":                             1,
		"outpost_uplink_forwarded_total":                       500,
		`outpost_outbox_oldest_age_seconds{route="telemetry"}`: 0,
		"outpost_outbox_time_to_drain_seconds":                 0,
	} {
		if got := metric(t, body, series); got != want {
			t.Errorf("after the drain: %s = %v, want %v", series, got, want)
		}
	}
	if v := metric(t, body, "outpost_uplink_offline_seconds_total"); v < offline {
		t.Errorf("offline seconds went back from %v to %v", offline, v)
	}
	waitFor(t, 10*time.Second, func() error {
		// Within the rate window, the drain rate is above 0.
		if v := metric(t, scrape(t, addr), "outpost_uplink_drain_rate"); v <= 0 {
			return fmt.Errorf("drain rate %v after draining 500", v)
		}
		return nil
	})
	// /v1/status says the same in JSON.
	resp, err = http.Get("http://" + addr + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Ready  bool
		Uplink struct{ Forwarded int64 }
	}
	_ = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if !st.Ready || st.Uplink.Forwarded != 500 {
		t.Errorf("/v1/status: %+v", st)
	}
}
