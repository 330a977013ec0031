package signals

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

var t0 = time.Date(2026, 12, 1, 8, 0, 0, 0, time.UTC)

// plan drives a junction through fixed cycles: green for green, then amber 3 s,
// red for the rest of cycle, starting its first green at start.
func plan(a *Analyzer, dev string, start, green, cycle time.Duration, cycles int) {
	for c := range cycles {
		base := t0.Add(start + time.Duration(c)*cycle)
		for _, st := range []struct {
			at    time.Duration
			state float64
		}{{0, 3}, {green, 2}, {green + 3*time.Second, 1}} {
			a.Observe(0, []pipeline.Reading{{Device: dev, Kind: "traffic_light", District: "gulou", Metric: "state", Value: st.state,
				Time: base.Add(st.at).UnixNano()}})
		}
	}
}

func result(rs []pipeline.Reading, dev, metric string) (float64, bool) {
	for _, r := range rs {
		if r.Device == dev && r.Metric == metric {
			return r.Value, true
		}
	}
	return 0, false
}

func TestJunctionTiming(t *testing.T) {
	a := New(nil, time.Second, nil)
	plan(a, "tl-1", 0, 30*time.Second, 90*time.Second, 3)
	rs := a.Results(t0.Add(3 * 90 * time.Second))
	cycle, ok := result(rs, "tl-1", MetricCycle)
	require.True(t, ok)
	require.InDelta(t, 90, cycle, 1e-9)
	ratio, _ := result(rs, "tl-1", MetricGreenRatio)
	require.InDelta(t, 30.0/90, ratio, 1e-9)

	_, ok = result(a.Results(t0.Add(2*90*time.Second+4*90*time.Second)), "tl-1", MetricCycle)
	require.False(t, ok, "a junction with no green for three cycles has no timing")
}

func TestLateReadingsAreIgnored(t *testing.T) {
	a := New(nil, time.Second, nil)
	plan(a, "tl-1", 0, 30*time.Second, 90*time.Second, 3)
	a.Observe(0, []pipeline.Reading{{Device: "tl-1", Kind: "traffic_light", Metric: "state", Value: 3, Time: t0.Add(10 * time.Second).UnixNano()}})
	cycle, _ := result(a.Results(t0.Add(3*90*time.Second)), "tl-1", MetricCycle)
	require.InDelta(t, 90, cycle, 1e-9)
}

func TestCorridorOffsetError(t *testing.T) {
	// 500 m at 36 km/h is 50 s of driving.
	c := Corridor{Name: "zhongshan-road", Speed: 36, Junctions: []Stop{{Device: "tl-1"}, {Device: "tl-2", Distance: 500}}}
	cases := []struct {
		name   string
		offset time.Duration // tl-2's green after tl-1's
		want   float64
	}{
		{"a perfect wave", 50 * time.Second, 0},
		{"greens 8 s late", 58 * time.Second, 8},
		{"greens 10 s early", 40 * time.Second, 10},
		{"an offset a whole cycle off is the same wave", 50*time.Second + 90*time.Second, 0},
		{"half a cycle off is the worst", 50*time.Second + 45*time.Second, 45},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := New([]Corridor{c}, time.Second, nil)
			plan(a, "tl-1", 0, 30*time.Second, 90*time.Second, 4)
			plan(a, "tl-2", tc.offset, 30*time.Second, 90*time.Second, 4)
			got, ok := result(a.Results(t0.Add(5*90*time.Second)), "zhongshan-road", MetricCorridorError)
			require.True(t, ok)
			require.InDelta(t, tc.want, got, 1e-6)
		})
	}
	t.Run("a junction without timing leaves the corridor without a sample", func(t *testing.T) {
		a := New([]Corridor{c}, time.Second, nil)
		plan(a, "tl-1", 0, 30*time.Second, 90*time.Second, 4)
		_, ok := result(a.Results(t0.Add(4*90*time.Second)), "zhongshan-road", MetricCorridorError)
		require.False(t, ok)
	})
}

func TestLoadCorridors(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.yaml")
		require.NoError(t, os.WriteFile(p, []byte(s), 0o644))
		return p
	}
	cs, err := LoadCorridors(filepath.Join("..", "configs", "corridors.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, cs)
	_, err = LoadCorridors(write("corridors:\n- {name: a, speed_kmh: 50, junctions: [{device: x}]}\n"))
	require.ErrorContains(t, err, "at least two junctions")
	_, err = LoadCorridors(write("corridors:\n- {name: a, speed_kmh: 50, junctions: [{device: x}, {device: y, distance_m: 0}]}\n"))
	require.ErrorContains(t, err, "distance_m")
	_, err = LoadCorridors(write("corridors:\n- {name: a, speed: 50}\n"))
	require.ErrorContains(t, err, "speed")
}

type submissions struct {
	mu   sync.Mutex
	runs [][]pipeline.Reading
}

func (s *submissions) Submit(_ context.Context, rs []pipeline.Reading) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.runs = append(s.runs, append([]pipeline.Reading(nil), rs...))
	return nil
}

// Run submits one device's series at a time, as the pipeline requires.
func TestRunSubmitsEachSeriesOwnerApart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Corridor{Name: "zhongshan-road", Speed: 36, Junctions: []Stop{{Device: "tl-1"}, {Device: "tl-2", Distance: 500}}}
		a := New([]Corridor{c}, time.Second, nil)
		now := time.Now()
		for _, dev := range []string{"tl-1", "tl-2"} {
			for i, st := range []float64{3, 1, 3, 1, 3} {
				a.Observe(0, []pipeline.Reading{{Device: dev, Kind: "traffic_light", District: "gulou", Metric: "state", Value: st,
					Time: now.Add(time.Duration(i-6) * 30 * time.Second).UnixNano()}})
			}
		}
		var sub submissions
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- a.Run(ctx, &sub) }()
		time.Sleep(1500 * time.Millisecond)
		cancel()
		require.NoError(t, <-done)
		require.Len(t, sub.runs, 3, "tl-1, tl-2 and the corridor")
		for _, run := range sub.runs {
			for _, r := range run {
				require.Equal(t, run[0].Device, r.Device)
			}
		}
	})
}

// The corridor view shows each junction's timing and each pair's offset
// against the travel time, the same figures the series carry; a junction
// without timing shows nulls, and leaves the corridor without an error.
func TestCorridorView(t *testing.T) {
	c := Corridor{Name: "zhongshan-road", Speed: 36, Junctions: []Stop{{Device: "tl-1"}, {Device: "tl-2", Distance: 500}, {Device: "tl-3", Distance: 250}}}
	a := New([]Corridor{c}, time.Second, nil)
	plan(a, "tl-1", 0, 30*time.Second, 90*time.Second, 4)
	plan(a, "tl-2", 58*time.Second, 30*time.Second, 90*time.Second, 4) // 8 s late
	now := t0.Add(5 * 90 * time.Second)
	vs := a.Corridors(now)
	require.Len(t, vs, 1)
	v := vs[0]
	require.Equal(t, "zhongshan-road", v.Name)
	require.Nil(t, v.OffsetError, "tl-3 has no timing")
	require.Len(t, v.Junctions, 3)
	j1, j2, j3 := v.Junctions[0], v.Junctions[1], v.Junctions[2]
	require.Equal(t, "tl-1", j1.Device)
	require.InDelta(t, 90, *j1.Cycle, 1e-9)
	require.InDelta(t, 30.0/90, *j1.GreenRatio, 1e-9)
	require.Nil(t, j1.Offset, "the first junction has no previous one")
	require.Equal(t, "gulou", j2.District)
	require.InDelta(t, 500, j2.Distance, 1e-9)
	require.InDelta(t, 50, j2.Travel, 1e-9)
	require.InDelta(t, 58, *j2.Offset, 1e-9)
	require.InDelta(t, 8, *j2.OffsetError, 1e-6)
	require.Nil(t, j3.Cycle)
	require.Nil(t, j3.OffsetError)

	plan(a, "tl-3", 58*time.Second+15*time.Second, 30*time.Second, 90*time.Second, 4) // 10 s early after tl-2 (25 s away)
	v = a.Corridors(now)[0]
	require.InDelta(t, -10, *v.Junctions[2].OffsetError, 1e-6)
	require.NotNil(t, v.OffsetError)
	require.InDelta(t, 10, *v.OffsetError, 1e-6, "the worst pair")
	got, ok := result(a.Results(now), "zhongshan-road", MetricCorridorError)
	require.True(t, ok)
	require.InDelta(t, *v.OffsetError, got, 1e-9, "the view and the series agree")
}
