package rules

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var now = time.Date(2026, 6, 1, 8, 0, 0, 0, time.UTC)

type fleet []devices.Device

func (f fleet) List() []devices.Device { return f }

func dev(id string, kind devices.Kind, district string, interval time.Duration) devices.Device {
	return devices.Device{ID: id, Kind: kind, District: district, Interval: interval, Secret: "secret-" + id}
}

// observe records one reading received `ago` before now.
func observe(v *Vitals, d devices.Device, metric string, value float64, ago time.Duration) {
	at := now.Add(-ago).UnixNano()
	v.Observe(0, []pipeline.Reading{{Device: d.ID, Kind: string(d.Kind), District: d.District, Metric: metric, Value: value, Time: at, Received: at}})
}

func render(rs []pipeline.Reading) string {
	lines := make([]string, len(rs))
	for i, r := range rs {
		lines[i] = fmt.Sprintf("city_%s{district=%q} %g", r.Metric, r.District, r.Value)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

func TestVitalsGolden(t *testing.T) {
	got := render(goldenVitals(t).Compute(now))
	golden := "../testdata/vitals/rollups.golden"
	if *update {
		require.NoError(t, os.WriteFile(golden, []byte(got), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err, "run go test ./rules -update")
	require.Equal(t, string(want), got)
}

// In cluster mode each node aggregates the devices it owns and one node
// combines the partials: the roll-ups are the same as one machine's (the
// golden file), whichever way the devices are split.
func TestPartialsCombineIntoTheSameRollups(t *testing.T) {
	want, err := os.ReadFile("../testdata/vitals/rollups.golden")
	require.NoError(t, err)
	for _, nodes := range []int{1, 2, 3, 5} {
		t.Run(fmt.Sprintf("%d nodes", nodes), func(t *testing.T) {
			var parts []VitalsPartial
			var v *Vitals
			for i := range nodes {
				v = goldenVitals(t)
				v.SetOwns(func(device string) bool { return pipeline.ShardOf(device, nodes) == i })
				parts = append(parts, v.Partial(now))
			}
			require.Equal(t, string(want), render(v.Combine(parts, now)))
		})
	}
}

// goldenVitals is the roll-ups of the golden file: devices of every kind in
// two districts, some silent, their readings observed.
func goldenVitals(t *testing.T) *Vitals {
	defs, err := LoadRollups("../configs/vitals.yaml")
	require.NoError(t, err)
	p1 := dev("pipe-0001", devices.KindPipe, "gulou", 10*time.Second)
	p2 := dev("pipe-0002", devices.KindPipe, "gulou", 10*time.Second)
	p3 := dev("pipe-0003", devices.KindPipe, "xuanwu", 10*time.Second)
	p4 := dev("pipe-0004", devices.KindPipe, "xuanwu", 10*time.Second) // silent: never heard
	pw1 := dev("power-0001", devices.KindPower, "gulou", 10*time.Second)
	pw2 := dev("power-0002", devices.KindPower, "xuanwu", 10*time.Second)
	t1 := dev("tl-0001", devices.KindTrafficLight, "gulou", 5*time.Second)
	t2 := dev("tl-0002", devices.KindTrafficLight, "gulou", 5*time.Second)
	b1 := dev("bay-0001", devices.KindParking, "xuanwu", 30*time.Second)
	b2 := dev("bay-0002", devices.KindParking, "xuanwu", 30*time.Second)
	b3 := dev("bay-0003", devices.KindParking, "xuanwu", 30*time.Second)
	l1 := dev("lot-0001", devices.KindParking, "gulou", 30*time.Second)
	w1 := dev("water-0001", devices.KindWater, "gulou", 60*time.Second)
	v := NewVitals(DefaultVitals(), defs, fleet{p1, p2, p3, p4, pw1, pw2, t1, t2, b1, b2, b3, l1, w1}, 2, nil, nil)

	observe(v, p1, "pressure", 420, time.Second)
	observe(v, p1, "flow", 30, time.Second)
	observe(v, p1, "leak", 0, time.Second)
	observe(v, p2, "pressure", 150, 30*time.Second) // exactly 3 × 10 s: still reporting
	observe(v, p2, "leak", 1, 30*time.Second)
	observe(v, p3, "pressure", 380, 31*time.Second) // just over 3 × 10 s: silent, left out
	observe(v, pw1, "active_power", 1200, time.Second)
	observe(v, pw1, "frequency", 49.8, time.Second)
	observe(v, pw1, "voltage", 228, time.Second)
	observe(v, pw2, "active_power", 800, time.Second)
	observe(v, pw2, "frequency", 50.1, time.Second)
	observe(v, pw2, "voltage", 231, time.Second)
	observe(v, pw2, "fault", 1, time.Second)
	observe(v, t1, "state", 0, time.Second) // dark
	observe(v, t1, "queue_length", 12, time.Second)
	observe(v, t2, "state", 3, time.Second)
	observe(v, t2, "queue_length", 4, time.Second)
	observe(v, b1, "occupied", 1, time.Minute)
	observe(v, b2, "occupied", 1, time.Minute)
	observe(v, b3, "occupied", 0, time.Minute)
	observe(v, l1, "available_spot_number", 40, time.Minute)
	observe(v, l1, "total_spot_number", 120, time.Minute)
	observe(v, w1, "ph", 9.1, time.Minute)
	observe(v, w1, "level", 3.2, time.Minute)
	return v
}

func TestAggregations(t *testing.T) {
	vals := []float64{400, 150, 380, 420, 300}
	tests := []struct {
		name string
		def  Rollup
		vals []float64
		want float64
		ok   bool
	}{
		{"min", Rollup{Agg: "min"}, vals, 150, true},
		{"max", Rollup{Agg: "max"}, vals, 420, true},
		{"mean", Rollup{Agg: "mean"}, vals, 330, true},
		{"median interpolates", Rollup{Agg: "quantile", Q: 0.5}, vals, 380, true},
		{"p10 interpolates", Rollup{Agg: "quantile", Q: 0.1}, vals, 210, true},
		{"sum", Rollup{Agg: "sum"}, vals, 1650, true},
		{"count", Rollup{Agg: "count"}, vals, 5, true},
		{"count_eq", Rollup{Agg: "count_eq", Value: 400}, vals, 1, true},
		{"share_outside", Rollup{Agg: "share_outside", Lo: 200, Hi: 400}, vals, 0.4, true},
		{"max_abs_dev", Rollup{Agg: "max_abs_dev", Value: 350}, vals, 200, true},
		{"a min of nothing is not reported", Rollup{Agg: "min"}, nil, 0, false},
		{"a count of nothing is zero", Rollup{Agg: "count"}, nil, 0, true},
		{"a sum of nothing is zero", Rollup{Agg: "sum"}, nil, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := aggregate(tc.def, tc.vals)
			require.Equal(t, tc.ok, ok)
			require.InDelta(t, tc.want, got, 1e-9)
		})
	}
}

func TestLoadRollupsRejectsBadDefinitions(t *testing.T) {
	tests := []struct{ name, yaml, want string }{
		{"an unknown metric", "rollups:\n- {name: x, kind: pipe, metric: voltage, agg: min}\n", "no metric"},
		{"an unknown agg", "rollups:\n- {name: x, kind: pipe, metric: pressure, agg: median}\n", "unknown agg"},
		{"a bad quantile", "rollups:\n- {name: x, kind: pipe, metric: pressure, agg: quantile, q: 2}\n", "q must be"},
		{"a duplicate name", "rollups:\n- {name: x, kind: pipe, metric: pressure, agg: min}\n- {name: x, kind: pipe, metric: pressure, agg: max}\n", "used twice"},
		{"an unknown key", "rollups:\n- {name: x, kind: pipe, metric: pressure, agg: min, colour: red}\n", "colour"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := t.TempDir() + "/v.yaml"
			require.NoError(t, os.WriteFile(p, []byte(tc.yaml), 0o644))
			_, err := LoadRollups(p)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// BenchmarkRollups computes the default roll-ups over 100,000 series (20,000
// pipes × 5 metrics) in 50 districts.
func BenchmarkRollups(b *testing.B) {
	defs, err := LoadRollups("../configs/vitals.yaml")
	require.NoError(b, err)
	var f fleet
	for i := 0; i < 20000; i++ {
		f = append(f, dev(fmt.Sprintf("pipe-%05d", i), devices.KindPipe, fmt.Sprintf("d%02d", i%50), 10*time.Second))
	}
	v := NewVitals(DefaultVitals(), defs, f, 4, nil, nil)
	for i, d := range f {
		for _, m := range []string{"pressure", "flow", "leak", "gas_concentration", "temperature"} {
			v.Observe(i%4, []pipeline.Reading{{Device: d.ID, Kind: "pipe", District: d.District, Metric: m, Value: float64(i % 500), Received: now.UnixNano()}})
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if len(v.Compute(now)) == 0 {
			b.Fatal("no roll-ups")
		}
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/100k-series")
}

// Issue 12: with every power meter of a district silent, the district's load
// was stored as 0 kW and its dark traffic lights as 0 (a blackout, or an
// all-clear, in Grafana). An aggregate over no reporting device is no sample;
// the fleet series say why.
func TestAnAggregateOverNoReportingDeviceIsNoSample(t *testing.T) {
	defs, err := LoadRollups("../configs/vitals.yaml")
	require.NoError(t, err)
	pw1 := dev("power-0001", devices.KindPower, "gulou", 10*time.Second)
	pw2 := dev("power-0002", devices.KindPower, "xuanwu", 10*time.Second) // silent: last heard 5 min ago
	tl1 := dev("tl-0001", devices.KindTrafficLight, "gulou", 5*time.Second)
	tl2 := dev("tl-0002", devices.KindTrafficLight, "xuanwu", 5*time.Second) // silent: never heard
	v := NewVitals(DefaultVitals(), defs, fleet{pw1, pw2, tl1, tl2}, 1, nil, nil)
	observe(v, pw1, "active_power", 1200, time.Second)
	observe(v, pw1, "fault", 0, time.Second)
	observe(v, pw2, "active_power", 800, 5*time.Minute)
	observe(v, tl1, "state", 0, time.Second)

	got := map[string]float64{}
	for _, r := range v.Compute(now) {
		got["city_"+r.Metric+"{"+r.District+"}"] = r.Value
	}
	for _, tc := range []struct {
		series string
		want   float64
		ok     bool
	}{
		{"city_power_load_kw{gulou}", 1200, true},
		{"city_power_load_kw{xuanwu}", 0, false},
		{"city_power_faults{xuanwu}", 0, false},
		{"city_power_load_kw{city}", 1200, true},
		{"city_traffic_light_dark{gulou}", 1, true},
		{"city_traffic_light_dark{xuanwu}", 0, false},
		{"city_fleet_power_reporting{xuanwu}", 0, true},
		{"city_fleet_power_silent{xuanwu}", 1, true},
		{"city_fleet_traffic_light_silent{xuanwu}", 1, true},
	} {
		x, ok := got[tc.series]
		require.Equal(t, tc.ok, ok, "%s present", tc.series)
		require.Equal(t, tc.want, x, tc.series)
	}
}

// submissions records what Vitals.Run submits.
type submissions struct {
	mu    sync.Mutex
	calls [][]pipeline.Reading
}

func (s *submissions) Submit(_ context.Context, rs []pipeline.Reading) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, append([]pipeline.Reading(nil), rs...))
	return nil
}

// Run submits each interval's roll-ups to the submitter it is given, one
// submission per district (a journal record carries one district).
func TestVitalsRunSubmitsOneDistrictAtATime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		defs, err := LoadRollups("../configs/vitals.yaml")
		require.NoError(t, err)
		pw1 := dev("power-0001", devices.KindPower, "gulou", 10*time.Second)
		pw2 := dev("power-0002", devices.KindPower, "xuanwu", 10*time.Second)
		v := NewVitals(DefaultVitals(), defs, fleet{pw1, pw2}, 1, nil, nil)
		require.ErrorContains(t, v.Run(context.Background(), nil), "no submitter")
		at := time.Now().UnixNano()
		for _, d := range []devices.Device{pw1, pw2} {
			v.Observe(0, []pipeline.Reading{{Device: d.ID, Kind: "power", District: d.District, Metric: "active_power", Value: 100, Time: at, Received: at}})
		}
		sub := &submissions{}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- v.Run(ctx, sub) }()
		time.Sleep(DefaultVitals().Interval + time.Second)
		synctest.Wait()
		cancel()
		require.NoError(t, <-done)
		var districts []string
		for _, c := range sub.calls {
			for _, r := range c {
				require.Equal(t, c[0].District, r.District, "one district per submission")
				require.Equal(t, CityKind, r.Kind)
			}
			districts = append(districts, c[0].District)
		}
		require.Equal(t, []string{"city", "gulou", "xuanwu"}, districts)
	})
}
