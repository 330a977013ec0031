package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"
)

// ReportVersion is bumped whenever the JSON schema changes incompatibly.
const ReportVersion = 1

// Report is the machine-readable result of a run (stable schema: see
// testdata/loadtest/report.schema.golden).
type Report struct {
	Version  int       `json:"version"`
	Tool     string    `json:"tool"`
	Started  time.Time `json:"started"`
	Duration float64   `json:"duration_s"`
	Host     Host      `json:"host"`
	Scenario Scenario  `json:"scenario"`
	Fleet    FleetInfo `json:"fleet"`

	Totals     Totals         `json:"totals"`
	Rates      Rates          `json:"rates"`
	Ack        Summary        `json:"ack_latency"`
	Queryable  Summary        `json:"queryable_latency"`
	Alerts     AlertReport    `json:"alerts"`
	Store      StoreCheck     `json:"store"`
	Rejects    map[string]int `json:"server_rejects"`
	Errors     []CountedError `json:"errors"`
	Timeline   []Second       `json:"timeline"`
	Verdict    string         `json:"verdict"`
	ExitReason string         `json:"exit_reason"`
}

// Host is where the harness ran.
type Host struct {
	GOOS   string `json:"goos"`
	GOARCH string `json:"goarch"`
	CPUs   int    `json:"cpus"`
	Go     string `json:"go"`
}

// FleetInfo is the size of the simulated city.
type FleetInfo struct {
	Devices     int            `json:"devices"`
	Connections int            `json:"connections"`
	ByKind      map[string]int `json:"by_kind"`
}

// Totals counts what was sent and what came back.
type Totals struct {
	Messages         int64 `json:"messages"`
	Readings         int64 `json:"readings"`
	Acked            int64 `json:"acked"`
	ReadingsAcked    int64 `json:"readings_acked"`
	Failed           int64 `json:"failed"`
	Unacknowledged   int64 `json:"unacknowledged"`
	Duplicates       int64 `json:"duplicates_sent"`
	OutOfOrder       int64 `json:"out_of_order_sent"`
	Late             int64 `json:"late_sent"`
	Backfilled       int64 `json:"backfilled"`
	Malformed        int64 `json:"malformed_sent"`
	MalformedRefused int64 `json:"malformed_refused"`
	// MalformedUnanswered got no answer (the connection dropped): the server
	// may or may not have seen them.
	MalformedUnanswered int64 `json:"malformed_unanswered"`
	Reconnects          int64 `json:"reconnects"`
	ProbesDropped       int64 `json:"probes_dropped"`
	// Retransmits are the CoAP CON requests sent again for want of an ACK
	// (plain UDP client).
	Retransmits int64 `json:"coap_retransmits"`
	// MessageIDWaits are the CoAP requests that waited for a message ID the
	// server no longer deduplicates (one client sends at most 65,536 per
	// EXCHANGE_LIFETIME, 247 s).
	MessageIDWaits int64 `json:"coap_message_id_waits"`
}

// Rates are the averages over the run.
type Rates struct {
	Messages float64 `json:"messages_per_s"`
	Readings float64 `json:"readings_per_s"`
	Acked    float64 `json:"acked_per_s"`
}

// report assembles the result of r.
func (r *runner) report(store StoreCheck, rejects map[string]int) Report {
	el := r.end.Sub(r.start).Seconds()
	byKind := map[string]int{}
	for _, d := range r.fleet {
		byKind[string(d.Kind)]++
	}
	rep := Report{
		Version: ReportVersion, Tool: "citypulse loadtest", Started: r.start.UTC().Truncate(time.Millisecond), Duration: round3(el),
		Host:     Host{GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, CPUs: runtime.NumCPU(), Go: runtime.Version()},
		Scenario: r.sc,
		Fleet:    FleetInfo{Devices: len(r.fleet), Connections: len(r.partition()), ByKind: byKind},
		Totals: Totals{Messages: r.sent.Load(), Readings: r.readingsSent.Load(), Acked: r.acked.Load(), ReadingsAcked: r.readingsAcked.Load(),
			Failed: r.failed.Load(), Unacknowledged: r.unackedOK.Load(), Duplicates: r.dupSent.Load(), OutOfOrder: r.oooSent.Load(),
			Late: r.lateSent.Load(), Backfilled: r.backfilled.Load(), Malformed: r.malformedSent.Load(), MalformedRefused: r.malformedRefused.Load(), MalformedUnanswered: r.malformedLost.Load(),
			Retransmits: r.retransmits.Load(), MessageIDWaits: r.midWaits.Load(),
			Reconnects: r.reconnects.Load(), ProbesDropped: r.probesDropped.Load()},
		Ack: r.ack.Summary(), Queryable: r.queryable.Summary(), Alerts: r.alerts.report(),
		Store: store, Rejects: rejects, Errors: r.errorList(),
	}
	if rep.Rejects == nil {
		rep.Rejects = map[string]int{}
	}
	r.tlMu.Lock()
	rep.Timeline = append([]Second{}, r.timeline...)
	r.tlMu.Unlock()
	if el > 0 {
		rep.Rates = Rates{Messages: round3(float64(rep.Totals.Messages) / el), Readings: round3(float64(rep.Totals.Readings) / el),
			Acked: round3(float64(rep.Totals.Acked) / el)}
	}
	rep.Verdict, rep.ExitReason = verdict(rep)
	return rep
}

func round3(f float64) float64 { return float64(int64(f*1000+0.5)) / 1000 }

// verdict decides the run: any acknowledged reading lost, a duplicate or an
// unexpected sample in the store, or a check that could not run, fails it.
func verdict(r Report) (string, string) {
	switch {
	case r.Store.Error != "":
		return "fail", "store check failed: " + r.Store.Error
	case r.Store.Lost > 0:
		return "fail", fmt.Sprintf("%d acknowledged readings lost", r.Store.Lost)
	case r.Store.Duplicated > 0:
		return "fail", fmt.Sprintf("%d duplicated readings in the store", r.Store.Duplicated)
	case r.Store.Unexpected > 0:
		return "fail", fmt.Sprintf("%d unexpected samples in the store", r.Store.Unexpected)
	case r.Alerts.BadSignature > 0:
		return "fail", fmt.Sprintf("%d webhooks with a bad signature", r.Alerts.BadSignature)
	case r.Totals.Messages == 0:
		return "fail", "nothing was sent"
	}
	if !r.Store.Checked {
		return "pass", "no store check (bare broker); nothing failed"
	}
	return "pass", "nothing acknowledged was lost"
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func readReport(path string) (Report, error) {
	var r Report
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("%s: %w", path, err)
	}
	if r.Version != ReportVersion {
		return r, fmt.Errorf("%s: report version %d, this loadtest reads %d", path, r.Version, ReportVersion)
	}
	return r, nil
}

// printSummary writes the human summary of a run.
func printSummary(w io.Writer, r Report) {
	fmt.Fprintf(w, "scenario %s: %d devices over %d connections, %s %s, %.0f s\n", r.Scenario.Name, r.Fleet.Devices, r.Fleet.Connections,
		r.Scenario.Transport.Protocol, r.Scenario.Format, r.Duration)
	fmt.Fprintf(w, "sent      %d messages, %d readings (%.0f msg/s, %.0f readings/s)\n", r.Totals.Messages, r.Totals.Readings, r.Rates.Messages, r.Rates.Readings)
	fmt.Fprintf(w, "acked     %d messages (%d readings); failed %d; unacknowledged %d", r.Totals.Acked, r.Totals.ReadingsAcked, r.Totals.Failed, r.Totals.Unacknowledged)
	if r.Totals.Retransmits > 0 || r.Totals.MessageIDWaits > 0 {
		fmt.Fprintf(w, "; CoAP retransmissions %d, waits for a message ID %d", r.Totals.Retransmits, r.Totals.MessageIDWaits)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "hostile   dup %d, out-of-order %d, late %d, backfilled %d, malformed %d (refused %d), reconnects %d\n",
		r.Totals.Duplicates, r.Totals.OutOfOrder, r.Totals.Late, r.Totals.Backfilled, r.Totals.Malformed, r.Totals.MalformedRefused, r.Totals.Reconnects)
	lat := func(name string, s Summary) {
		if s.Count == 0 {
			fmt.Fprintf(w, "%-9s -\n", name)
			return
		}
		fmt.Fprintf(w, "%-9s n=%d p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  p99.9 %.2f ms  max %.2f ms\n", name, s.Count,
			ms(s.P50), ms(s.P90), ms(s.P99), ms(s.P999), ms(s.Max))
	}
	lat("ack", r.Ack)
	lat("queryable", r.Queryable)
	lat("webhook", r.Alerts.Latency)
	for _, name := range sortedKeys(r.Alerts.ByAlert) {
		lat("  "+name, r.Alerts.ByAlert[name])
	}
	fmt.Fprintf(w, "alerts    %d/%d injected incidents alerted; %d webhooks (%d firing, %d resolved), %d repeats, %d bad signatures; unexplained %v (outside the run %v)\n",
		r.Alerts.Matched, r.Alerts.Expected, r.Alerts.Webhooks, r.Alerts.Firing, r.Alerts.Resolved, r.Alerts.Repeats, r.Alerts.BadSignature, r.Alerts.Unexplained, r.Alerts.OutsideRun)
	if r.Store.Checked {
		fmt.Fprintf(w, "store     expected %d, acked %d, found %d: LOST %d, duplicated %d, unexpected %d (unacked missing %d, unacked stored %d; settled in %.1f s)\n",
			r.Store.Expected, r.Store.Acked, r.Store.Found, r.Store.Lost, r.Store.Duplicated, r.Store.Unexpected, r.Store.UnackedMissing, r.Store.UnackedStored, r.Store.SettledIn)
		for _, e := range r.Store.Examples {
			fmt.Fprintf(w, "          %s\n", e)
		}
	}
	if len(r.Rejects) > 0 {
		fmt.Fprint(w, "rejects  ")
		for _, k := range sortedKeys(r.Rejects) {
			fmt.Fprintf(w, " %s=%d", k, r.Rejects[k])
		}
		fmt.Fprintln(w)
	}
	for i, e := range r.Errors {
		if i == 5 {
			fmt.Fprintf(w, "          … %d more kinds of error\n", len(r.Errors)-5)
			break
		}
		fmt.Fprintf(w, "error     %dx %s\n", e.Count, e.Error)
	}
	fmt.Fprintf(w, "verdict   %s: %s\n", r.Verdict, r.ExitReason)
}

// compare prints the deltas from old to cur.
func compare(w io.Writer, old, cur Report) {
	row := func(name string, a, b float64, unit string, lowerBetter bool) {
		d := b - a
		pct := ""
		if a != 0 {
			pct = fmt.Sprintf("%+.1f%%", 100*d/a)
		}
		mark := ""
		if d != 0 && (d < 0) == lowerBetter {
			mark = "better"
		} else if d != 0 {
			mark = "worse"
		}
		fmt.Fprintf(w, "%-22s %14.2f %14.2f %14.2f %9s  %s %s\n", name, a, b, d, pct, unit, mark)
	}
	fmt.Fprintf(w, "%-22s %14s %14s %14s %9s\n", "", "old", "new", "delta", "")
	row("messages/s", old.Rates.Messages, cur.Rates.Messages, "", false)
	row("readings/s", old.Rates.Readings, cur.Rates.Readings, "", false)
	row("acked/s", old.Rates.Acked, cur.Rates.Acked, "", false)
	row("ack p50", ms(old.Ack.P50), ms(cur.Ack.P50), "ms", true)
	row("ack p99", ms(old.Ack.P99), ms(cur.Ack.P99), "ms", true)
	row("ack p99.9", ms(old.Ack.P999), ms(cur.Ack.P999), "ms", true)
	row("queryable p50", ms(old.Queryable.P50), ms(cur.Queryable.P50), "ms", true)
	row("queryable p99", ms(old.Queryable.P99), ms(cur.Queryable.P99), "ms", true)
	row("webhook p50", ms(old.Alerts.Latency.P50), ms(cur.Alerts.Latency.P50), "ms", true)
	row("webhook p99", ms(old.Alerts.Latency.P99), ms(cur.Alerts.Latency.P99), "ms", true)
	row("failed", float64(old.Totals.Failed), float64(cur.Totals.Failed), "", true)
	row("lost", float64(old.Store.Lost), float64(cur.Store.Lost), "", true)
	fmt.Fprintf(w, "verdict: %s -> %s\n", old.Verdict, cur.Verdict)
}
