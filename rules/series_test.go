package rules

import (
	"github.com/citypulse/citypulse/internal/bymetric"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// The series cache (series.go) keeps each series' rules and alerts between
// readings: every way the alerts change off the reading path must reach it,
// and a device seen with another district must meet that district's rules.
// Each case first lets the engine cache the series with a reading.
func TestSeriesCacheFollowsTheAlerts(t *testing.T) {
	low := "{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180}"
	at := func(d time.Duration) []pipeline.Reading { return pressure("pipe-1", 400, d) }
	for _, tc := range []struct {
		name  string
		rules []string
		// change runs between the caching reading (400 kPa at t0) and the
		// one after it; the latter is read, and the notices and the alerts
		// then compared with want and alerts.
		change func(t *testing.T, e *Engine)
		next   []pipeline.Reading
		want   []string
		alerts int
	}{
		{"a deadman alert raised by the tick is resolved by the device's next reading",
			[]string{"{name: silent, type: deadman, select: {kind: pipe}, factor: 3}"},
			func(t *testing.T, e *Engine) { e.Tick(t0.Add(time.Minute)) },
			at(61 * time.Second), []string{"silent:firing", "silent:resolved"}, 0},
		{"an alert imported from another node is resolved by the next good reading",
			[]string{low},
			func(t *testing.T, e *Engine) {
				other := NewEngine(Default(), []*Rule{mustRule(t, low)}, EngineOptions{Shards: 2})
				other.Observe(other.shardOf("pipe-1"), pressure("pipe-1", 100, time.Second))
				snap, err := other.ExportState(func(string) bool { return true })
				require.NoError(t, err)
				n, err := e.ImportState(snap, nil)
				require.NoError(t, err)
				require.Equal(t, 1, n)
			},
			at(2 * time.Second), []string{"low:resolved"}, 0},
		{"an alert handed to another node and raised again here is a new one",
			[]string{low},
			func(t *testing.T, e *Engine) {
				e.Observe(e.shardOf("pipe-1"), pressure("pipe-1", 100, time.Second))
				require.Equal(t, 1, e.DropState(func(string) bool { return true }))
			},
			pressure("pipe-1", 100, 2*time.Second), []string{"low:firing", "low:firing"}, 1},
		{"a device moved to another district meets that district's rules",
			[]string{"{name: low_gulou, type: threshold, select: {kind: pipe, metric: pressure, district: gulou}, below: 150}"},
			func(*testing.T, *Engine) {},
			[]pipeline.Reading{reading("pipe-1", "pipe", "xuanwu", "pressure", 100, t0.Add(time.Second))}, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rules []*Rule
			for _, y := range tc.rules {
				rules = append(rules, mustRule(t, y))
			}
			rec := &recorder{}
			list := fixedDevices{{ID: "pipe-1", Kind: "pipe", District: "gulou", Interval: 10 * time.Second}}
			e := NewEngine(Default(), rules, EngineOptions{Shards: 2, Notifier: rec, Devices: list})
			e.started = t0
			e.Observe(e.shardOf("pipe-1"), at(0))
			tc.change(t, e)
			e.Observe(e.shardOf("pipe-1"), tc.next)
			require.Equal(t, tc.want, rec.kinds())
			require.Len(t, e.Alerts(), tc.alerts)
		})
	}
}

// manyMetrics is n metrics m0, m1, ...: more than a device's short list.
func manyMetrics(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "m" + itoa(i)
	}
	return out
}

// A device with more metrics than the short list (a district's roll-ups),
// read in one order and then in others: each reading meets its own metric's
// rules, in the engine and in the roll-ups' latest values.
func TestManyMetricsOfOneDevice(t *testing.T) {
	metrics := manyMetrics(3 * bymetric.ShortList)
	forward := func(i int) int { return i }
	reverse := func(i int) int { return len(metrics) - 1 - i }
	stride := func(i int) int { return (i * 7) % len(metrics) }
	for _, tc := range []struct {
		name   string
		orders [3]func(i int) int // the metric of the i-th reading, round by round
	}{
		{"forward, reverse, by a stride", [3]func(int) int{forward, reverse, stride}},
		{"by a stride, forward, reverse", [3]func(int) int{stride, forward, reverse}},
		{"reverse, by a stride, forward", [3]func(int) int{reverse, stride, forward}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, "{name: hot, type: threshold, select: {kind: city, metric: m17}, above: 10}")},
				EngineOptions{Shards: 1, Notifier: rec})
			v := NewVitals(DefaultVitals(), nil, nil, 1, nil, nil)
			want := map[seriesKey]float64{}
			for round := range 3 {
				rs := make([]pipeline.Reading, len(metrics))
				for i := range rs {
					m := tc.orders[round](i)
					rs[i] = reading(CityDevice, CityKind, "gulou", metrics[m], float64(100*round+m), t0.Add(time.Duration(round)*time.Second))
					want[seriesKey{CityDevice, metrics[m]}] = float64(100*round + m)
				}
				e.Observe(0, rs)
				for i := range rs {
					rs[i].Kind, rs[i].Device = "pipe", "pipe-1"
				}
				v.Observe(0, rs)
			}
			require.Equal(t, []string{"hot:firing"}, rec.kinds(), "m17 is above 10 from the first round on")
			got, seen := v.snapshot()
			wantDev := map[seriesKey]float64{}
			for k, x := range want {
				wantDev[seriesKey{"pipe-1", k.metric}] = x
			}
			require.Equal(t, wantDev, got)
			require.Equal(t, map[string]int64{"pipe-1": t0.Add(2 * time.Second).UnixNano()}, seen)
			// and each series is kept once
			require.Equal(t, len(metrics), e.shards[0].nSeries)
			require.Equal(t, len(metrics), v.shards[0].devs["pipe-1"].values.Len())
		})
	}
}
