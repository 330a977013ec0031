package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/sim"
)

var update = flag.Bool("update", false, "rewrite golden files")

func TestScenarioFilesAreValid(t *testing.T) {
	files, err := filepath.Glob("../../configs/loadtest/*.yaml")
	require.NoError(t, err)
	n := 0
	for _, f := range files {
		if strings.HasSuffix(f, "rules.yaml") || strings.HasSuffix(f, "server.yaml") {
			continue
		}
		n++
		t.Run(filepath.Base(f), func(t *testing.T) {
			sc, err := LoadScenario(f)
			require.NoError(t, err)
			sc.Measure.WebhookSecret = "a-secret-of-16-bytes-or-more"
			require.NoError(t, sc.Validate())
		})
	}
	require.GreaterOrEqual(t, n, 3)
}

func TestScenarioValidate(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Scenario)
		want string
	}{
		{"defaults are valid", func(*Scenario) {}, ""},
		{"no devices", func(s *Scenario) { s.Fleet.PerDistrict = map[devices.Kind]int{} }, "no devices"},
		{"unknown kind", func(s *Scenario) { s.Fleet.PerDistrict["tram"] = 1 }, `unknown kind "tram"`},
		{"bad protocol", func(s *Scenario) { s.Transport.Protocol = "amqp" }, "want mqtt or coap"},
		{"qos 2", func(s *Scenario) { s.Transport.QoS = 2 }, "want 0 or 1"},
		{"unbounded", func(s *Scenario) { s.Duration = 0 }, "every run stops by itself"},
		{"share over 1", func(s *Scenario) { s.Hostile.Malformed = 1.5 }, "hostile.malformed"},
		{"remote target", func(s *Scenario) { s.Target.MQTT = "10.0.0.1:1883" }, "not loopback"},
		{"remote allowed", func(s *Scenario) { s.Target.MQTT = "10.0.0.1:1883"; s.Target.AllowRemote = true }, ""},
		{"incident without receiver", func(s *Scenario) {
			s.Incidents = []Incident{{Incident: sim.Incident{Type: "burst_main", Lasts: time.Second}, Alert: "burst_main"}}
		}, "measure.webhook"},
		{"unknown incident", func(s *Scenario) {
			s.Incidents = []Incident{{Incident: sim.Incident{Type: "flood", Lasts: time.Second}}}
		}, `type "flood"`},
		{"negative district", func(s *Scenario) {
			s.Incidents = []Incident{{Incident: sim.Incident{Type: "burst_main", Lasts: time.Second, District: -1}}}
		}, "must be >= 0"},
		{"every shorter than lasts", func(s *Scenario) {
			s.Incidents = []Incident{{Incident: sim.Incident{Type: "burst_main", Lasts: time.Minute, Every: time.Second}}}
		}, "want more than lasts"},
		{"unique ids need provisioning", func(s *Scenario) { s.Target.Provision = false }, "fleet.unique"},
		{"bare broker with a check", func(s *Scenario) { s.Target.HTTP = "" }, "target.http is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sc := DefaultScenario()
			tt.edit(&sc)
			err := sc.Validate()
			if tt.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tt.want)
		})
	}
}

func TestLoadScenarioRejectsUnknownKeys(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.yaml")
	require.NoError(t, os.WriteFile(p, []byte("name: x\nrat: 5\n"), 0o600))
	_, err := LoadScenario(p)
	require.ErrorContains(t, err, "field rat not found")
}

func TestHistogramQuantiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var h Histogram
	var vals []int64
	for range 100_000 {
		us := int64(math.Exp(rng.NormFloat64()*1.5 + 7)) // log-normal around 1 ms
		vals = append(vals, us)
		h.Record(time.Duration(us) * time.Microsecond)
	}
	slices.Sort(vals)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999, 1} {
		exact := vals[min(len(vals)-1, int(q*float64(len(vals))))]
		got := h.Quantile(q)
		require.InDelta(t, float64(exact), float64(got), math.Max(2, 0.01*float64(exact)), "q=%v", q)
	}
	require.Equal(t, vals[len(vals)-1], h.Summary().Max)
	var total int64
	for _, b := range h.Summary().Buckets {
		total += b[1]
	}
	require.Equal(t, int64(len(vals)), total)
}

func TestHistogramBuckets(t *testing.T) {
	for _, us := range []int64{0, 1, 255, 256, 257, 511, 512, 1000, 123456, 1 << 40} {
		b := bucketOf(us)
		require.GreaterOrEqual(t, bucketTop(b), us, "top of the bucket of %d", us)
		if b > 0 {
			require.Less(t, bucketTop(b-1), us, "the bucket below %d ends before it", us)
		}
	}
}

// The harness's encoders must produce what the server's decoder reads back
// exactly: the same metric, value and millisecond for every reading.
func TestEncodeDecodesExactly(t *testing.T) {
	now := time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC)
	sc := DefaultScenario()
	for _, format := range []string{"senml-json", "senml-cbor", "json"} {
		t.Run(format, func(t *testing.T) {
			sc.Format = format
			r := newRunner(sc, nil)
			for _, dev := range r.fleet {
				for i := range 20 {
					m, body, err := r.build(dev, now.Add(time.Duration(i)*1234567*time.Microsecond), sim.Conditions{}, i%7 == 3)
					require.NoError(t, err)
					f := payload.Sniff(body)
					if format == "senml-cbor" {
						f = payload.FromContentType(sim.ContentType(format))
					}
					recs, rejects, err := payload.Decode(f, body, dev.ID, now)
					require.NoError(t, err)
					require.Empty(t, rejects)
					require.Len(t, recs, m.n)
					want := map[string]sentReading{}
					for _, rd := range dev.readings[m.first : m.first+m.n] {
						want[fmt.Sprintf("%s@%d", dev.Metrics[rd.metric].Name, rd.ts)] = rd
					}
					for _, rec := range recs {
						key := fmt.Sprintf("%s@%d", rec.Metric, rec.Time/int64(time.Millisecond))
						rd, ok := want[key]
						require.True(t, ok, "decoded %s not among the sent readings %v", key, want)
						require.Equal(t, rd.value, rec.Value)
					}
				}
			}
		})
	}
}

// The incident schedule moves to the next district each time it repeats.
func TestIncidentSchedule(t *testing.T) {
	sc := DefaultScenario()
	sc.Incidents = []Incident{{Incident: sim.Incident{Type: "burst_main", At: 10 * time.Second, Every: 10 * time.Second, Lasts: 3 * time.Second}}}
	r := newRunner(sc, nil)
	pipeIn := func(district int) *simDevice {
		for _, d := range r.fleet {
			if d.Kind == devices.KindPipe && d.District == district {
				return d
			}
		}
		return nil
	}
	tests := []struct {
		el       time.Duration
		district int
		want     bool
	}{
		{5 * time.Second, 0, false},
		{11 * time.Second, 0, true},
		{11 * time.Second, 1, false},
		{14 * time.Second, 0, false},
		{21 * time.Second, 1, true},
		{51 * time.Second, 0, true}, // occurrence 4 in district 4 % 4 = 0
	}
	for _, tt := range tests {
		st, _ := r.incidentAt(pipeIn(tt.district), tt.el)
		require.Equal(t, tt.want, st.Burst, "at %v in d%02d", tt.el, tt.district)
	}
}

// schemaOf describes a JSON value's shape: every path with its type.
func schemaOf(prefix string, v any, out map[string]string) {
	switch x := v.(type) {
	case map[string]any:
		out[prefix] = "object"
		for k, e := range x {
			schemaOf(prefix+"."+k, e, out)
		}
	case []any:
		out[prefix] = "array"
		if len(x) > 0 {
			schemaOf(prefix+"[]", x[0], out)
		}
	case float64:
		out[prefix] = "number"
	case string:
		out[prefix] = "string"
	case bool:
		out[prefix] = "bool"
	case nil:
		out[prefix] = "null"
	}
}

// syntheticReport is a report from a runner that never touched a network.
func syntheticReport(t *testing.T) Report {
	sc := DefaultScenario()
	sc.Incidents = []Incident{{Incident: sim.Incident{Type: "burst_main", At: time.Second, Lasts: time.Second}, Alert: "burst_main", Per: "device"}}
	r := newRunner(sc, nil)
	r.start = time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC)
	r.end = r.start.Add(10 * time.Second)
	r.sent.Store(100)
	r.readingsSent.Store(1000)
	r.acked.Store(100)
	for i := range 100 {
		r.ack.Record(time.Duration(i) * 37 * time.Microsecond)
		r.queryable.Record(time.Duration(i) * time.Millisecond)
	}
	r.timeline = []Second{{T: 1, Messages: 50, Readings: 500, Acked: 50, AckP50: 0.5, AckP99: 1.2, AckMax: 2}, {T: 2, Messages: 50, Readings: 500, Acked: 50, AckP50: 0.6, AckP99: 1.1, AckMax: 3}}
	r.countErr(fmt.Errorf("mqtt: not connected"))
	r.alerts.note("burst_main", "device=x", 0, r.start)
	var msg webhookMessage
	require.NoError(t, json.Unmarshal([]byte(`{"alerts":[{"status":"firing","labels":{"alertname":"burst_main","device":"x"}}]}`), &msg))
	r.alerts.receive(msg, r.start.Add(3*time.Millisecond))
	return r.report(StoreCheck{Checked: true, Expected: 1000, Acked: 1000, Found: 1000, Examples: []string{}}, map[string]int{"malformed": 3})
}

// The JSON report's schema is stable: a change shows up here and needs a new
// golden file (and, if incompatible, a new ReportVersion).
func TestReportSchemaGolden(t *testing.T) {
	rep := syntheticReport(t)
	b, err := json.Marshal(rep)
	require.NoError(t, err)
	var v any
	require.NoError(t, json.Unmarshal(b, &v))
	shape := map[string]string{}
	schemaOf("", v, shape)
	var lines []string
	for k, typ := range shape {
		if strings.Contains(k, ".per_district.") || strings.Contains(k, ".by_alert.") || strings.Contains(k, ".by_kind.") ||
			strings.Contains(k, ".server_rejects.") || strings.Contains(k, ".unexplained.") || strings.Contains(k, ".outside_run.") {
			continue // maps keyed by data, not schema
		}
		lines = append(lines, k+" "+typ)
	}
	sort.Strings(lines)
	got := []byte(strings.Join(lines, "\n") + "\n")
	golden := "../../testdata/loadtest/report.schema.golden"
	if *update {
		require.NoError(t, os.MkdirAll(filepath.Dir(golden), 0o755))
		require.NoError(t, os.WriteFile(golden, got, 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err, "run go test ./cmd/loadtest -run TestReportSchemaGolden -args -update")
	require.Equal(t, string(want), string(got))

	require.Equal(t, "pass", rep.Verdict)
	require.Equal(t, int64(1), rep.Alerts.Matched)
	require.Equal(t, int64(3000), rep.Alerts.Latency.P50)
}

func TestVerdict(t *testing.T) {
	base := syntheticReport(t)
	tests := []struct {
		name string
		edit func(*Report)
		want string
	}{
		{"clean", func(*Report) {}, "pass"},
		{"lost", func(r *Report) { r.Store.Lost = 1 }, "fail"},
		{"duplicated", func(r *Report) { r.Store.Duplicated = 1 }, "fail"},
		{"unexpected", func(r *Report) { r.Store.Unexpected = 1 }, "fail"},
		{"check failed", func(r *Report) { r.Store.Error = "connection refused" }, "fail"},
		{"bad signature", func(r *Report) { r.Alerts.BadSignature = 1 }, "fail"},
		{"unacked missing is no loss", func(r *Report) { r.Store.UnackedMissing = 10 }, "pass"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := base
			tt.edit(&r)
			got, why := verdict(r)
			require.Equal(t, tt.want, got, why)
		})
	}
}

func TestHTMLReportIsSelfContained(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, writeHTML(&b, syntheticReport(t)))
	page := b.String()
	require.Contains(t, page, "<svg")
	require.Contains(t, page, "Rate over time")
	require.Contains(t, page, "Ack latency over time")
	require.Contains(t, page, "publish → ack (n=100)")
	for _, ext := range []string{"<script", "src=", "href=", "@import"} {
		require.NotContains(t, page, ext, "no external resources")
	}
}

func TestCompareAndCLI(t *testing.T) {
	dir := t.TempDir()
	old, cur := syntheticReport(t), syntheticReport(t)
	cur.Rates.Messages *= 2
	cur.Ack.P99 *= 3
	require.NoError(t, writeJSON(filepath.Join(dir, "old.json"), old))
	require.NoError(t, writeJSON(filepath.Join(dir, "new.json"), cur))
	var out, errb bytes.Buffer
	code := mainCode(t.Context(), []string{"compare", filepath.Join(dir, "old.json"), filepath.Join(dir, "new.json")}, &out, &errb)
	require.Equal(t, 0, code, errb.String())
	require.Regexp(t, `messages/s\s+10\.00\s+20\.00\s+10\.00\s+\+100\.0%\s+better`, out.String())
	require.Regexp(t, `ack p99\s+.*\+200\.0%\s+ms worse`, out.String())

	out.Reset()
	require.Equal(t, exitSetup, mainCode(t.Context(), []string{"run", "--rate", "-1"}, &out, &errb))
	require.Contains(t, errb.String(), "rate = -1")
	require.Equal(t, exitSetup, mainCode(t.Context(), []string{"bogus"}, &out, &errb))

	out.Reset()
	require.Equal(t, 0, mainCode(t.Context(), []string{"devices", "--scenario", "../../configs/loadtest/smoke.yaml"}, &out, &errb))
	p := filepath.Join(dir, "devices.yaml")
	require.NoError(t, os.WriteFile(p, out.Bytes(), 0o600))
	reg, err := devices.LoadFile(p)
	require.NoError(t, err, "loadtest devices writes a devices file the server reads")
	require.Len(t, reg, 100)
}

func TestCurveFoldsTheTimelineIntoWindows(t *testing.T) {
	var tl []Second
	for sec := 1; sec <= 25; sec++ { // second T covers [T-1, T)
		tl = append(tl, Second{T: sec, Messages: int64(sec), Acked: 10, AckP99: float64(sec)})
	}
	ws := curve(tl, 10*time.Second)
	require.Len(t, ws, 3)
	for i, want := range []struct {
		from, to int
		msgs     int64
		p99      float64
	}{{0, 10, 55, 10}, {10, 20, 155, 20}, {20, 25, 115, 25}} {
		require.Equal(t, want.from, ws[i].From)
		require.Equal(t, want.to, ws[i].To)
		require.Equal(t, want.msgs, ws[i].Messages)
		require.Equal(t, want.p99, ws[i].AckP99)
		require.InDelta(t, 10, ws[i].AckRate(), 1e-9)
	}
	var b strings.Builder
	printCurve(&b, ws)
	require.Contains(t, b.String(), "  20-  25 s")
}

// outcomeLog gives every message its own outcome, numbered in order, that
// stays where it is while more are added (the transports' callbacks hold
// pointers into it).
func TestOutcomeLog(t *testing.T) {
	var l outcomeLog
	const n = outcomeDoubled + 3*outcomeMax + 17
	ptrs := make([]*atomic.Uint32, n)
	for i := range n {
		o, num := l.next()
		require.Equal(t, uint32(i), num)
		require.Zero(t, o.Load(), "a new message is pending")
		o.Store(uint32(i%3 + 1))
		ptrs[i] = o
	}
	for i := range n {
		require.Equal(t, uint32(i%3+1), l.load(uint32(i)), "message %d", i)
		k, off, _ := outcomeSlot(i)
		require.Same(t, ptrs[i], &l.chunks[k][off], "message %d has not moved", i)
	}
	require.Len(t, l.chunks[0], outcomeFirst, "a device that sends little costs little")
	require.Len(t, l.chunks[len(l.chunks)-1], outcomeMax)
	require.Len(t, l.chunks, bits.Len(outcomeMax/outcomeFirst)+4)
}

// An incident reading the server never took owes no alert: CI saw 5 of 6
// incidents alerted when the run ended while the message carrying the sixth
// was being sent (it was never sent, so never stored).
func TestAlertBookOwesOnlyWhatMayHaveArrived(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 1, 52, 0, 0, time.UTC)
	firing := func(dev string) webhookMessage {
		var msg webhookMessage
		require.NoError(t, json.Unmarshal([]byte(`{"alerts":[{"status":"firing","labels":{"alertname":"burst_main","device":"`+dev+`"}}]}`), &msg))
		return msg
	}
	for _, tc := range []struct {
		name      string
		steps     func(b *alertBook)
		want      [2]int64 // matched, expected
		unexplain [2]int64 // in the run, outside it
	}{
		{"sent and alerted", func(b *alertBook) {
			b.note("burst_main", "device=a", 0, t0)
			b.receive(firing("a"), t0.Add(time.Millisecond))
		}, [2]int64{1, 1}, [2]int64{0, 0}},
		{"sent, no alert", func(b *alertBook) {
			b.note("burst_main", "device=a", 0, t0)
		}, [2]int64{0, 1}, [2]int64{0, 0}},
		{"never sent: not owed", func(b *alertBook) {
			b.withdraw(b.note("burst_main", "device=a", 0, t0))
		}, [2]int64{0, 0}, [2]int64{0, 0}},
		{"one of two messages failed: still owed", func(b *alertBook) {
			b.note("burst_main", "device=a", 0, t0)
			b.withdraw(b.note("burst_main", "device=a", 0, t0.Add(time.Millisecond)))
		}, [2]int64{0, 1}, [2]int64{0, 0}},
		{"withdrawn, then a later message of the occurrence: owed again", func(b *alertBook) {
			b.withdraw(b.note("burst_main", "device=a", 0, t0))
			b.note("burst_main", "device=a", 0, t0.Add(time.Second))
			b.receive(firing("a"), t0.Add(time.Second+time.Millisecond))
		}, [2]int64{1, 1}, [2]int64{0, 0}},
		{"alerted anyway after a failure: matched, not unexplained", func(b *alertBook) {
			b.withdraw(b.note("burst_main", "device=a", 0, t0))
			b.receive(firing("a"), t0.Add(time.Millisecond))
		}, [2]int64{1, 1}, [2]int64{0, 0}},
		{"an alert for nothing injected is unexplained", func(b *alertBook) {
			b.started(t0.Add(-time.Minute))
			b.receive(firing("b"), t0)
		}, [2]int64{0, 0}, [2]int64{1, 0}},
		{"before the fleet started: outside the run", func(b *alertBook) {
			b.receive(firing("b"), t0)
		}, [2]int64{0, 0}, [2]int64{0, 1}},
		{"within the grace after the start: outside the run", func(b *alertBook) {
			b.started(t0)
			b.receive(firing("b"), t0.Add(outsideGrace-time.Millisecond))
		}, [2]int64{0, 0}, [2]int64{0, 1}},
		{"within the grace after the end: unexplained", func(b *alertBook) {
			b.started(t0)
			b.stopped(t0.Add(time.Minute))
			b.receive(firing("b"), t0.Add(time.Minute+outsideGrace))
		}, [2]int64{0, 0}, [2]int64{1, 0}},
		{"past the grace after the end: outside the run", func(b *alertBook) {
			b.started(t0)
			b.stopped(t0.Add(time.Minute))
			b.receive(firing("b"), t0.Add(time.Minute+outsideGrace+time.Millisecond))
		}, [2]int64{0, 0}, [2]int64{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newAlertBook()
			tc.steps(b)
			rep := b.report()
			require.Equal(t, tc.want, [2]int64{rep.Matched, rep.Expected})
			require.Equal(t, tc.unexplain, [2]int64{rep.Unexplained["burst_main"], rep.OutsideRun["burst_main"]})
		})
	}
}
