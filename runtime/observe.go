package runtime

import (
	"encoding/json"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/metrics"
)

// observer keeps what the metrics derive over time, and whether the agent
// is ready.
type observer struct {
	rates metrics.Rates
	ready atomic.Bool
	stop  chan struct{}
	done  chan struct{}
}

// sampleEvery is how often the uplink's state is sampled for the offline
// time and the drain rate.
const sampleEvery = time.Second

// startObserving samples the uplink once a second until close.
func (a *Agent) startObserving() {
	o := &a.obs
	o.stop, o.done = make(chan struct{}), make(chan struct{})
	a.sample(time.Now())
	go func() {
		defer close(o.done)
		t := time.NewTicker(sampleEvery)
		defer t.Stop()
		for {
			select {
			case now := <-t.C:
				a.sample(now)
			case <-o.stop:
				return
			}
		}
	}()
}

func (a *Agent) stopObserving() {
	if a.obs.stop != nil {
		close(a.obs.stop)
		<-a.obs.done
		a.obs.stop = nil
	}
}

func (a *Agent) sample(now time.Time) {
	var connected bool
	var forwarded int64
	if a.uplink != nil {
		us := a.uplink.Stats()
		connected, forwarded = us.Connected, us.Forwarded
	}
	a.obs.rates.Observe(now, connected, forwarded, a.broker.Stored())
}

// Snapshot returns the agent's state: the local broker, the outbox by
// route, the uplink and the plugins.
func (a *Agent) Snapshot() metrics.Snapshot {
	now := time.Now()
	bs := a.broker.Stats()
	ob := a.outbox.Stats()
	s := metrics.Snapshot{Time: now, Version: Version, DeviceID: a.cfg.DeviceID, Ready: a.obs.ready.Load(),
		Broker: metrics.Broker{Listeners: bs.Listener, Clients: bs.Clients, Stored: bs.Stored, Refused: bs.Refused,
			Failed: bs.Failed, LocalOnly: bs.Local, Refusals: map[string]int64{"auth": bs.AuthFailures, "locked": bs.AuthLocked,
				"anonymous": bs.Anonymous, "busy": bs.Busy, "acl": bs.ACLDenied, "rate": bs.RateLimited, "tls": bs.TLSFailures}},
		Outbox: metrics.Outbox{Messages: ob.Messages, Bytes: ob.Bytes, Dropped: ob.Dropped},
		Uplink: metrics.Uplink{Dialect: a.cfg.Uplink.Dialect},
	}
	if ob.Messages > 0 {
		s.Uplink.TimeToDrain = -1 // no uplink: it does not drain
	}
	oldest, err := a.outbox.Oldest()
	if err != nil {
		a.log.Debug("oldest messages not read", "error", err)
	}
	for _, r := range ob.Routes {
		mr := metrics.Route{Name: r.Name, Priority: r.Priority, Messages: r.Messages, Bytes: r.Bytes}
		if t, ok := oldest[r.Name]; ok && r.Messages > 0 {
			mr.OldestAge = metrics.Seconds(max(now.Sub(t), 0).Seconds())
		}
		s.Outbox.Routes = append(s.Outbox.Routes, mr)
	}
	if a.uplink != nil {
		us := a.uplink.Stats()
		rate, ttd := a.obs.rates.Drain(ob.Messages)
		s.Uplink = metrics.Uplink{Configured: true, Dialect: a.cfg.Uplink.Dialect, Connected: us.Connected,
			Reconnects: us.Reconnects, Forwarded: us.Forwarded, Resent: us.Resent, Rejected: us.Rejected,
			InFlight: us.InFlight, Offline: metrics.Seconds(a.obs.rates.Offline(now).Seconds()), DrainRate: rate,
			TimeToDrain: metrics.Seconds(ttd.Seconds()), LastError: us.LastError}
		if ttd < 0 {
			s.Uplink.TimeToDrain = -1
		}
		if u, err := ParseUplinkURL(a.cfg.Uplink.URL); err == nil {
			s.Uplink.URL = u.Redacted()
		}
	}
	if a.plugins != nil {
		bounds := sandbox.LatencyBounds[:]
		for _, p := range a.plugins.List() {
			s.Plugins = append(s.Plugins, metrics.Plugin{Name: p.Name, Version: p.Version, Calls: p.Stats.Calls,
				Failures: p.Stats.Failures, Running: p.Stats.Running, BreakerOpen: p.Stats.BreakerOpen,
				LatencyBuckets: p.Stats.LatencyBuckets, LatencyBounds: bounds,
				LatencySum: metrics.Seconds(p.Stats.Latency.Seconds())})
		}
	}
	return s
}

// observeHandler serves /v1/status (the Snapshot as JSON), /metrics,
// /healthz (the process serves) and /readyz (200 when ready, else 503;
// the body says why, and reports the uplink without depending on it).
func (a *Agent) observeHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics.Handler(a.Snapshot))
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(a.Snapshot())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ready := a.obs.ready.Load()
		body := map[string]any{"ready": ready, "store": "open", "broker": a.broker.Addrs()}
		if !ready {
			body["store"], body["broker"] = "not ready", "not listening"
		}
		switch {
		case a.uplink == nil:
			body["uplink"] = "not configured"
		case a.uplink.Stats().Connected:
			body["uplink"] = "connected"
		default:
			body["uplink"] = "down (messages are stored)"
		}
		w.Header().Set("Content-Type", "application/json")
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(w).Encode(body)
	})
	return mux
}

// AdminHTTPAddr is the bound address of the read-only HTTP listener
// (admin.http), or "" when it is off.
func (a *Agent) AdminHTTPAddr() string {
	if a.adminTCP == nil {
		return ""
	}
	return a.adminTCP.Addr()
}
