package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/outpost-edge/outpost/runtime/metrics"
)

// cmdStatus prints the running agent's state: a table, or the JSON of GET
// /v1/status with --json.
func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "the agent's admin `socket` (default $OUTPOST_SOCKET, else ./data/outpost.sock)")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "outpost status: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	var raw json.RawMessage
	if err := newAdminClient(*socket).do("GET", "/v1/status", nil, &raw); err != nil {
		fmt.Fprintln(stderr, "outpost status:", err)
		return 1
	}
	if *asJSON {
		var b bytes.Buffer
		_ = json.Indent(&b, raw, "", "  ")
		b.WriteByte('\n')
		_, _ = stdout.Write(b.Bytes())
		return 0
	}
	var s metrics.Snapshot
	if err := json.Unmarshal(raw, &s); err != nil {
		fmt.Fprintln(stderr, "outpost status: the agent's answer:", err)
		return 1
	}
	printStatus(stdout, &s)
	return 0
}

func printStatus(w io.Writer, s *metrics.Snapshot) {
	state := "ready"
	if !s.Ready {
		state = "NOT READY"
	}
	fmt.Fprintf(w, "outpost %s, device %s: %s\n\n", s.Version, s.DeviceID, state)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	b := s.Broker
	fmt.Fprintf(tw, "local broker\t%s\t%d clients; %d stored, %d refused (full), %d failed, %d local only\n",
		strings.Join(b.Listeners, ", "), b.Clients, b.Stored, b.Refused, b.Failed, b.LocalOnly)
	var denied []string
	for k, n := range b.Refusals {
		if n > 0 {
			denied = append(denied, fmt.Sprintf("%s %d", k, n))
		}
	}
	if len(denied) > 0 {
		sort.Strings(denied)
		fmt.Fprintf(tw, "\t\tdenied: %s\n", strings.Join(denied, ", "))
	}
	u := s.Uplink
	switch {
	case !u.Configured:
		fmt.Fprintf(tw, "uplink\tnone\tmessages are stored until uplink.url is set\n")
	default:
		st := "connected"
		if !u.Connected {
			st = "DOWN"
			if u.LastError != "" {
				st += " (" + u.LastError + ")"
			}
		}
		fmt.Fprintf(tw, "uplink\t%s %s\t%s; %d reconnects, offline %s in all\n", u.Dialect, u.URL, st, u.Reconnects, u.Offline)
		ttd := "-"
		switch {
		case s.Outbox.Messages == 0:
			ttd = "empty"
		case u.TimeToDrain >= 0:
			ttd = "about " + u.TimeToDrain.String()
		}
		fmt.Fprintf(tw, "\t\t%d forwarded, %d resent, %d rejected, %d in flight; %.1f msg/s, time to drain %s\n",
			u.Forwarded, u.Resent, u.Rejected, u.InFlight, u.DrainRate, ttd)
	}
	var drops []string
	keys := make([]string, 0, len(s.Outbox.Dropped))
	for k := range s.Outbox.Dropped {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		drops = append(drops, fmt.Sprintf("%s %d", k, s.Outbox.Dropped[k]))
	}
	if len(drops) == 0 {
		drops = []string{"none"}
	}
	fmt.Fprintf(tw, "backlog\t%d messages, %s\tdropped: %s\n", s.Outbox.Messages, bytesHuman(s.Outbox.Bytes), strings.Join(drops, ", "))
	tw.Flush()

	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tPRIORITY\tMESSAGES\tBYTES\tOLDEST")
	for _, r := range s.Outbox.Routes {
		oldest := "-"
		if r.Messages > 0 {
			oldest = r.OldestAge.String()
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\n", r.Name, r.Priority, r.Messages, bytesHuman(r.Bytes), oldest)
	}
	tw.Flush()
	if len(s.Plugins) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PLUGIN\tVERSION\tCALLS\tERRORS\tMEAN\tBREAKER")
	for _, p := range s.Plugins {
		var errs int64
		var kinds []string
		for k, n := range p.Failures {
			if n > 0 {
				errs += n
				kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
			}
		}
		sort.Strings(kinds)
		e := fmt.Sprint(errs)
		if len(kinds) > 0 {
			e += " (" + strings.Join(kinds, ", ") + ")"
		}
		mean := "-"
		if p.Calls > 0 {
			mean = metrics.Seconds(float64(p.LatencySum) / float64(p.Calls)).String()
		}
		breaker := "closed"
		if p.BreakerOpen {
			breaker = "OPEN"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", p.Name, p.Version, p.Calls, e, mean, breaker)
	}
	tw.Flush()
}

func bytesHuman(n int64) string {
	switch {
	case n < 1<<10:
		return fmt.Sprintf("%d B", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	case n < 1<<30:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
}
