package rules

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

// benchRules is 200 rules: the realistic set that a water-main pressure
// reading and a traffic light's state reading in district d7 select (a
// threshold with hysteresis, a 60 s rate rule, a deadman for each kind, two
// state rules), and 193 threshold rules on other districts that they do not.
func benchRules(tb testing.TB) []*Rule {
	y := `rules:
- {name: low_pressure, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180, for: 30s}
- {name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}
- {name: pipe_silent, type: deadman, select: {kind: pipe}, factor: 3}
- {name: light_dark, type: state, select: {kind: traffic_light, metric: state}, equals: "off", for: 30s}
- {name: light_flashing, type: state, select: {kind: traffic_light, metric: state}, equals: flashing, outside_hours: [22, 6]}
- {name: light_silent, type: deadman, select: {kind: traffic_light}, factor: 3}
- {name: lights_out, type: fleet, select: {kind: traffic_light}, silent_ratio: 0.5}
`
	kinds := []string{"pipe", "power", "water", "traffic_light", "parking"}
	metrics := map[string]string{"pipe": "pressure", "power": "voltage", "water": "ph", "traffic_light": "queue_length", "parking": "available_spot_number"}
	for i := 0; i < 193; i++ {
		k := kinds[i%5]
		y += fmt.Sprintf("- {name: r%d, type: threshold, select: {kind: %s, metric: %s, district: \"d%d\"}, above: 1000000}\n", i, k, metrics[k], 8+i%32)
	}
	rules, err := ParseRules([]byte(y), "bench")
	require.NoError(tb, err)
	require.Len(tb, rules, 200)
	return rules
}

// BenchmarkRuleEvaluation: a water-main pressure reading and a traffic
// light's state reading, both at 10 Hz, against 200 loaded rules, as the
// shard loop evaluates them; the rate rule's 60 s window is full (600
// readings) before the clock starts. It reports the rules evaluated per
// reading (6 of 200: threshold, rate, deadman; two state rules, deadman), so
// a benchmark that evaluates nothing shows it.
func BenchmarkRuleEvaluation(b *testing.B) {
	e := NewEngine(Default(), benchRules(b), EngineOptions{Shards: 1, Notifier: &recorder{}})
	r := rand.New(rand.NewPCG(1, 2))
	at := t0
	batch := func() []pipeline.Reading {
		at = at.Add(100 * time.Millisecond)
		return []pipeline.Reading{
			reading("pipe-0007", "pipe", "d7", "pressure", 400+r.NormFloat64()*5, at),
			reading("tl-0007", "traffic_light", "d7", "state", 1, at), // green
		}
	}
	for range 600 {
		e.Observe(0, batch())
	}
	rs := make([][]pipeline.Reading, 4096)
	for i := range rs {
		rs[i] = batch()
	}
	evals0 := testutil.ToFloat64(e.m.evals)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	b.ResetTimer()
	n := 0
	for b.Loop() {
		if n%len(rs) == 0 && n > 0 {
			b.StopTimer()
			for i := range rs {
				rs[i] = batch()
			}
			b.StartTimer()
		}
		e.Observe(0, rs[n%len(rs)])
		n++
	}
	b.StopTimer()
	runtime.ReadMemStats(&ms1)
	readings := float64(2 * n)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/readings, "ns/reading")
	b.ReportMetric((testutil.ToFloat64(e.m.evals)-evals0)/readings, "rules_evaluated/reading")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/readings, "allocs/reading")
	require.Equal(b, 0, len(e.Alerts()), "steady readings: no alert (the benchmark measures evaluation, not notification)")
}

// ratePattern makes the values of a 10 Hz series.
type ratePattern struct {
	name string
	v    func(r *rand.Rand, i int) float64
}

var ratePatterns = []ratePattern{
	{"noise", func(r *rand.Rand, _ int) float64 { return 400 + r.NormFloat64()*5 }},
	// A steady fall is the window's worst case: every bucket's maximum stays.
	{"falling", func(_ *rand.Rand, i int) float64 { return 1e6 - float64(i)*0.01 }},
}

// BenchmarkRate: one 10 Hz series through a drop rule with a 60 s window,
// the window full before the clock starts: the window kept before (every
// point, scanned on every reading: "baseline") against RateWindow, in the
// same run. state-bytes is the alert's state as saved (JSON) at the end.
func BenchmarkRate(b *testing.B) {
	rule := mustRule(b, "{name: burst, type: rate, drop: 80, window: 60s}")
	for _, pat := range ratePatterns {
		for _, impl := range []string{"baseline", "window"} {
			b.Run(pat.name+"/"+impl, func(b *testing.B) {
				r := rand.New(rand.NewPCG(1, 2))
				var old baselineState
				var s State
				eval := func(v float64, at time.Time) {
					if impl == "baseline" {
						baselineRate(rule, &old, v, at)
					} else {
						rule.condition(&s, v, at)
					}
				}
				i := 0
				for ; i < 600; i++ {
					eval(pat.v(r, i), t0.Add(time.Duration(i)*100*time.Millisecond))
				}
				vs := make([]float64, 4096)
				for j := range vs {
					vs[j] = pat.v(r, i+j)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					eval(vs[i%len(vs)], t0.Add(time.Duration(i)*100*time.Millisecond))
					i++
				}
				b.StopTimer()
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/reading")
				var st any = s
				if impl == "baseline" {
					st = old
				}
				enc, err := json.Marshal(st)
				require.NoError(b, err)
				b.ReportMetric(float64(len(enc)), "state-bytes")
			})
		}
	}
}

// writeSnapshot writes v as JSON the way the engine saves its state: to a
// temporary file, fsynced, renamed over path.
func writeSnapshot(path string, v any) (int, error) {
	enc, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return 0, err
	}
	if _, err := f.Write(enc); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	return len(enc), os.Rename(tmp, path)
}

// BenchmarkStateSnapshot: the alert-state snapshot (rules-state.json, written
// every 5 s) of rate alerts, each with a full 60 s window of a 10 Hz series:
// the window kept before ("baseline": every point) against RateWindow, in the
// same run. One op is one snapshot: encode, write, fsync, rename. It reports
// MB and ms per 100,000 alert states: RateWindow is measured with 100,000;
// the baseline, at about 30 KB an alert (3 GB for 100,000), with 5,000 and
// scaled (its size is linear in the alerts, its time about so).
func BenchmarkStateSnapshot(b *testing.B) {
	rule := mustRule(b, "{name: burst, type: rate, drop: 80, window: 60s}")
	for _, pat := range ratePatterns {
		for _, impl := range []string{"baseline", "window"} {
			alerts := 100_000
			if impl == "baseline" {
				alerts = 5_000
			}
			b.Run(pat.name+"/"+impl, func(b *testing.B) {
				r := rand.New(rand.NewPCG(1, 2))
				var old baselineState
				var s State
				for i := 0; i < 600; i++ {
					at := t0.Add(time.Duration(i) * 100 * time.Millisecond)
					if impl == "baseline" {
						baselineRate(rule, &old, pat.v(r, i), at)
					} else {
						rule.condition(&s, pat.v(r, i), at)
					}
				}
				type rec struct {
					Key   alertKey `json:"key"`
					State any      `json:"state"`
				}
				recs := make([]rec, alerts)
				for i := range recs {
					recs[i].Key = alertKey{Rule: "burst", Device: fmt.Sprintf("pipe-%06d", i), Metric: "pressure", District: "gulou", Kind: "pipe"}
					if impl == "baseline" {
						recs[i].State = old
					} else {
						recs[i].State = s
					}
				}
				file := struct {
					Seq    uint64 `json:"seq"`
					Alerts []rec  `json:"alerts"`
				}{Alerts: recs}
				path := filepath.Join(b.TempDir(), "rules-state.json")
				size := 0
				b.ResetTimer()
				for b.Loop() {
					n, err := writeSnapshot(path, file)
					if err != nil {
						b.Fatal(err)
					}
					size = n
				}
				b.StopTimer()
				scale := 100_000 / float64(alerts)
				b.ReportMetric(float64(size)*scale/1e6, "MB/100k-alerts")
				b.ReportMetric(float64(size)/float64(alerts), "bytes/alert")
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)*scale/1e6, "ms/100k-alerts")
			})
		}
	}
}

func TestBenchRulesSelectTheRealisticSet(t *testing.T) {
	// The benchmark's readings must meet the rules it claims they meet.
	var names []string
	for _, r := range benchRules(t) {
		for _, rd := range [][3]string{{"pipe", "pressure", "d7"}, {"traffic_light", "state", "d7"}} {
			if r.Type != TypeFleet && globMatch(r.Select.Kind, rd[0]) && globMatch(r.Select.District, rd[2]) &&
				(r.Type == TypeDeadman || globMatch(r.Select.Metric, rd[1])) {
				names = append(names, r.Name)
			}
		}
	}
	require.Equal(t, "low_pressure burst_main pipe_silent light_dark light_flashing light_silent", strings.Join(names, " "))
}

// BenchmarkTick: one tick over 100,000 devices (half pipes, half traffic
// lights, in 40 districts, 8 shards) with the deadman and fleet rules of
// benchRules. 99 % of the devices have reported; 1 % never have and fire
// their deadman alert at the first tick, before the clock starts. It
// reports the alerts fired, the notifications per tick after that (none:
// every tick is at the same moment, so does the same work), the devices
// judged per tick and the mean time the tick held one shard's lock (the
// pause of that shard's loop; the whole tick held every lock before).
func BenchmarkTick(b *testing.B) {
	const n = 100_000
	var list fixedDevices
	for i := range n {
		kind := devices.KindPipe
		if i%2 == 1 {
			kind = devices.KindTrafficLight
		}
		list = append(list, devices.Device{ID: fmt.Sprintf("dev-%06d", i), Kind: kind,
			District: fmt.Sprintf("d%d", i%40), Interval: 10 * time.Second})
	}
	rec := &recorder{}
	e := NewEngine(Default(), benchRules(b), EngineOptions{Shards: 8, Notifier: rec, Devices: list})
	e.started = t0
	for i, d := range list {
		if i%100 != 0 {
			e.shardFor(d.ID).lastSeen[d.ID] = t0.Add(time.Minute)
		}
	}
	at := t0.Add(time.Minute)
	e.Tick(at)
	fired := len(rec.evs)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		e.Tick(at) // the same moment: every tick does the same work
	}
	b.ReportMetric(float64(fired), "alerts-fired")
	b.ReportMetric(float64(len(rec.evs)-fired)/float64(b.N), "notifications/tick")
	b.ReportMetric(n, "devices/tick")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/device")
	var m dto.Metric
	require.NoError(b, e.m.tickHold.Write(&m))
	h := m.GetHistogram()
	b.ReportMetric(h.GetSampleSum()/float64(h.GetSampleCount())*1000, "ms/shard-hold")
}
