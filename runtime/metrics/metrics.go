// Package metrics describes the agent's state: a Snapshot that `outpost
// status` prints, and the same as Prometheus metrics. It reads counters the
// parts already keep; nothing on the message path is instrumented for it.
package metrics

import (
	"math"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Snapshot is the agent's state at one moment.
type Snapshot struct {
	Time     time.Time `json:"time"`
	Version  string    `json:"version"`
	DeviceID string    `json:"device_id"`
	// Ready: the store is open and the local broker listens.
	Ready   bool     `json:"ready"`
	Broker  Broker   `json:"broker"`
	Outbox  Outbox   `json:"outbox"`
	Uplink  Uplink   `json:"uplink"`
	Plugins []Plugin `json:"plugins"`
}

// Broker is the local broker's state.
type Broker struct {
	Listeners []string `json:"listeners"`
	Clients   int      `json:"clients"` // connected now
	Stored    int64    `json:"stored"`  // publishes stored in the outbox
	Refused   int64    `json:"refused"` // publishes refused: the outbox was full
	Failed    int64    `json:"failed"`  // publishes refused: the store failed
	LocalOnly int64    `json:"local"`   // publishes that matched no route
	// Refusals counts what the broker's security refused, by reason:
	// auth (wrong username or password), locked (the address is locked
	// out after failures), anonymous, busy (max_clients), acl (publishes,
	// subscriptions and deliveries), rate (over a client's rate limit),
	// tls (failed handshakes).
	Refusals map[string]int64 `json:"refusals"`
}

// Outbox is the store-and-forward queue's state.
type Outbox struct {
	Messages int64            `json:"messages"`
	Bytes    int64            `json:"bytes"`
	Routes   []Route          `json:"routes"`
	Dropped  map[string]int64 `json:"dropped"` // by reason: ttl, evicted, rejected
}

// Route is one outbox route's state.
type Route struct {
	Name     string `json:"name"`
	Priority int    `json:"priority"`
	Messages int64  `json:"messages"`
	Bytes    int64  `json:"bytes"`
	// OldestAge is how long the oldest message has waited; 0 when empty.
	OldestAge Seconds `json:"oldest_age_seconds"`
}

// Uplink is the upstream connection's state.
type Uplink struct {
	Configured bool   `json:"configured"`
	Dialect    string `json:"dialect"`
	URL        string `json:"url,omitempty"` // without credentials
	Connected  bool   `json:"connected"`
	Reconnects int64  `json:"reconnects"`
	Forwarded  int64  `json:"forwarded"` // acknowledged upstream
	Resent     int64  `json:"resent"`    // sent again after a lost connection: possible duplicates
	Rejected   int64  `json:"rejected"`  // refused upstream for good
	InFlight   int    `json:"in_flight"`
	// Offline is the time spent without a connection since the agent
	// started (an uplink that never connected is offline from the start).
	Offline Seconds `json:"offline_seconds"`
	// DrainRate is the messages forwarded per second, over the last
	// RateWindow.
	DrainRate float64 `json:"drain_rate"`
	// TimeToDrain estimates when the backlog is empty at the current net
	// rate (forwarded less accepted); -1 when it does not shrink.
	TimeToDrain Seconds `json:"time_to_drain_seconds"`
	LastError   string  `json:"last_error,omitempty"`
}

// Plugin is one wasm handler's state.
type Plugin struct {
	Name        string           `json:"name"`
	Version     string           `json:"version"`
	Calls       int64            `json:"calls"`
	Failures    map[string]int64 `json:"failures"` // by kind: trap, timeout, abi, limit, rejected, instance
	Running     int              `json:"running"`
	BreakerOpen bool             `json:"breaker_open"`
	// LatencyBuckets counts calls by duration, per LatencyBounds, the last
	// element being those above every bound; LatencySum is their total.
	LatencyBuckets []int64         `json:"latency_buckets"`
	LatencyBounds  []time.Duration `json:"-"`
	LatencySum     Seconds         `json:"latency_sum_seconds"`
}

// Seconds is a duration that JSON and the metrics show in seconds.
type Seconds float64

// Handler serves the snapshot that snap returns, per request, as
// Prometheus metrics (with the Go runtime's and the process's).
func Handler(snap func() Snapshot) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&collector{snap: snap})
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// collector turns a Snapshot into metrics at each scrape.
type collector struct{ snap func() Snapshot }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("outpost_"+name, help, labels, nil)
}

var (
	dInfo        = desc("info", "The agent's version, device id and uplink dialect (always 1).", "version", "device_id", "dialect")
	dReady       = desc("ready", "1 when the store is open and the local broker listens.")
	dClients     = desc("broker_clients", "Local MQTT clients connected.")
	dStored      = desc("broker_stored_total", "Local publishes stored in the outbox.")
	dRefused     = desc("broker_refused_total", "Local publishes refused, by reason (full: the outbox was full, failed: the store failed).", "reason")
	dLocal       = desc("broker_local_total", "Local publishes that matched no route (delivered locally only).")
	dDenied      = desc("broker_denied_total", "What the local broker's security refused, by reason: auth (wrong username or password), locked (address locked out), anonymous, busy (max_clients), acl, rate (over the client's rate limit), tls (failed handshake).", "reason")
	dDepth       = desc("outbox_messages", "Messages waiting in the outbox.", "route")
	dBytes       = desc("outbox_bytes", "Bytes the outbox holds.", "route")
	dOldest      = desc("outbox_oldest_age_seconds", "How long the oldest message of the route has waited (0 when empty).", "route")
	dDropped     = desc("outbox_dropped_total", "Messages dropped without being forwarded, by reason: ttl, evicted (full, drop_oldest), rejected (refused upstream for good).", "reason")
	dTTD         = desc("outbox_time_to_drain_seconds", "Estimated time until the backlog is empty at the current net rate; +Inf when it does not shrink.")
	dConnected   = desc("uplink_connected", "1 when the uplink is connected.")
	dReconnects  = desc("uplink_reconnects_total", "Successful connections after the first.")
	dForwarded   = desc("uplink_forwarded_total", "Messages acknowledged upstream.")
	dResent      = desc("uplink_resent_total", "Messages sent again after a lost connection (possible duplicates upstream).")
	dInFlight    = desc("uplink_in_flight", "Messages sent and not yet acknowledged.")
	dOffline     = desc("uplink_offline_seconds_total", "Time spent without an uplink connection since the agent started.")
	dDrain       = desc("uplink_drain_rate", "Messages forwarded per second over the last 10 seconds.")
	dCalls       = desc("plugin_calls_total", "Calls to a wasm handler.", "plugin", "version")
	dErrors      = desc("plugin_errors_total", "Failed calls to a wasm handler, by kind.", "plugin", "kind")
	dRunning     = desc("plugin_running", "Calls in the guest now.", "plugin")
	dBreaker     = desc("plugin_breaker_open", "1 while the plugin's breaker is open (calls answered 503).", "plugin")
	dLatency     = desc("plugin_call_duration_seconds", "Time in a wasm handler's call, from the host's side.", "plugin")
	allDescs     = []*prometheus.Desc{dInfo, dReady, dClients, dStored, dRefused, dLocal, dDenied, dDepth, dBytes, dOldest, dDropped, dTTD, dConnected, dReconnects, dForwarded, dResent, dInFlight, dOffline, dDrain, dCalls, dErrors, dRunning, dBreaker, dLatency}
	droppedNames = []string{"ttl", "evicted", "rejected"}
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.snap()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(dInfo, 1, s.Version, s.DeviceID, s.Uplink.Dialect)
	gauge(dReady, b2f(s.Ready))
	gauge(dClients, float64(s.Broker.Clients))
	counter(dStored, float64(s.Broker.Stored))
	counter(dRefused, float64(s.Broker.Refused), "full")
	counter(dRefused, float64(s.Broker.Failed), "failed")
	counter(dLocal, float64(s.Broker.LocalOnly))
	for _, k := range sortedKeys(s.Broker.Refusals) {
		counter(dDenied, float64(s.Broker.Refusals[k]), k)
	}
	for _, r := range s.Outbox.Routes {
		gauge(dDepth, float64(r.Messages), r.Name)
		gauge(dBytes, float64(r.Bytes), r.Name)
		gauge(dOldest, float64(r.OldestAge), r.Name)
	}
	reasons := append([]string(nil), droppedNames...)
	for k := range s.Outbox.Dropped {
		if !slices.Contains(reasons, k) {
			reasons = append(reasons, k)
		}
	}
	for _, k := range reasons {
		counter(dDropped, float64(s.Outbox.Dropped[k]), k)
	}
	ttd := float64(s.Uplink.TimeToDrain)
	if ttd < 0 {
		ttd = math.Inf(1)
	}
	gauge(dTTD, ttd)
	if s.Uplink.Configured {
		gauge(dConnected, b2f(s.Uplink.Connected))
		counter(dReconnects, float64(s.Uplink.Reconnects))
		counter(dForwarded, float64(s.Uplink.Forwarded))
		counter(dResent, float64(s.Uplink.Resent))
		gauge(dInFlight, float64(s.Uplink.InFlight))
		counter(dOffline, float64(s.Uplink.Offline))
		gauge(dDrain, s.Uplink.DrainRate)
	}
	for _, p := range s.Plugins {
		counter(dCalls, float64(p.Calls), p.Name, p.Version)
		kinds := make([]string, 0, len(p.Failures))
		for k := range p.Failures {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		for _, k := range kinds {
			counter(dErrors, float64(p.Failures[k]), p.Name, k)
		}
		gauge(dRunning, float64(p.Running), p.Name)
		gauge(dBreaker, b2f(p.BreakerOpen), p.Name)
		if len(p.LatencyBuckets) == len(p.LatencyBounds)+1 {
			buckets := make(map[float64]uint64, len(p.LatencyBounds))
			var cum uint64
			for i, b := range p.LatencyBounds {
				cum += uint64(p.LatencyBuckets[i])
				buckets[b.Seconds()] = cum
			}
			cum += uint64(p.LatencyBuckets[len(p.LatencyBounds)])
			ch <- prometheus.MustNewConstHistogram(dLatency, cum, float64(p.LatencySum), buckets, p.Name)
		}
	}
}

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// String formats s for people: "1.5s", "3m20s".
func (s Seconds) String() string {
	if s < 0 {
		return "-"
	}
	d := time.Duration(float64(s) * float64(time.Second))
	switch {
	case d < time.Second:
		return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}
