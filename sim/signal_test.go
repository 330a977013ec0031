package sim

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run go test ./sim -update to write it")
	require.Equal(t, string(want), got, "%s differs; if the change is meant, go test ./sim -update", path)
}

var day = time.Date(2026, 11, 25, 0, 0, 0, 0, time.UTC)

// Over a whole day, with and without every incident, every simulated value
// lies in its metric's physical range, so the server never rejects a reading.
func TestSignalsStayInRange(t *testing.T) {
	for _, spec := range []Spec{DemoSpec(3), {Seed: 1, Prefix: "lt", Districts: []string{"d00", "d01"},
		PerDistrict: map[devices.Kind]int{devices.KindPipe: 3, devices.KindPower: 3, devices.KindWater: 2,
			devices.KindTrafficLight: 3, devices.KindParking: 5}, Default: 10 * time.Second}} {
		for _, d := range NewFleet(spec) {
			for m := 0; m < 24*60; m += 7 {
				at := day.Add(time.Duration(m) * time.Minute)
				for _, c := range []Conditions{{}, {Burst: true, Dark: true, Filling: true, Trip: true}} {
					for _, met := range d.Metrics {
						v := d.Value(met, at, 0.05, c)
						require.NoError(t, met.Check(d.Kind, v), "%s %s at %s", d.ID, met.Name, at.Format("15:04"))
					}
				}
			}
		}
	}
}

// find returns the first device of kind k reporting metric.
func find(t *testing.T, fleet []*Device, k devices.Kind, metric string) (*Device, devices.Metric) {
	t.Helper()
	for _, d := range fleet {
		for _, m := range d.Metrics {
			if d.Kind == k && m.Name == metric {
				return d, m
			}
		}
	}
	t.Fatalf("no %s %s", k, metric)
	return nil, devices.Metric{}
}

func TestIncidentsChangeTheSignal(t *testing.T) {
	fleet := NewFleet(DemoSpec(1))
	noon := day.Add(12 * time.Hour)
	tests := []struct {
		name      string
		kind      devices.Kind
		metric    string
		c         Conditions
		lo, hi    float64 // the value with the incident
		normalMin float64 // and without
	}{
		{"a burst main collapses the pressure", devices.KindPipe, "pressure", Conditions{Burst: true}, 0, 100, 300},
		{"a burst main sets off the leak detector", devices.KindPipe, "leak", Conditions{Burst: true}, 1, 1, 0},
		{"a dark junction reports off", devices.KindTrafficLight, "state", Conditions{Dark: true}, 0, 0, 1},
		{"a dark junction's queue backs up", devices.KindTrafficLight, "queue_length", Conditions{Dark: true}, 40, 80, 0},
		{"a full car park has no free space", devices.KindParking, "available_spot_number", Conditions{Filling: true}, 0, 0, 1},
		{"a full car park's bays are taken", devices.KindParking, "occupied", Conditions{Filling: true}, 1, 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, m := find(t, fleet, tt.kind, tt.metric)
			v := d.Value(m, noon, 0, tt.c)
			require.GreaterOrEqual(t, v, tt.lo)
			require.LessOrEqual(t, v, tt.hi)
			require.GreaterOrEqual(t, d.Value(m, noon, 0, Conditions{}), tt.normalMin)
		})
	}
}

// dayRow is the city at one moment of an ordinary day, as a golden row: the
// mean mains pressure, the total power load, the share of occupied bays and
// free lot spaces, the mean queue, and a junction's cycle and green share
// sampled second by second over the next five minutes.
func dayRow(fleet []*Device, at time.Time) string {
	var pressure, load, bays, occupied, free, queue, junctions float64
	var np float64
	for _, d := range fleet {
		for _, m := range d.Metrics {
			v := d.Value(m, at, 0, Conditions{})
			switch d.Kind + devices.Kind("/"+m.Name) {
			case "pipe/pressure":
				pressure += v
				np++
			case "power/active_power":
				load += v
			case "parking/occupied":
				bays++
				occupied += v
			case "parking/available_spot_number":
				free += v
			case "traffic_light/queue_length":
				queue += v
				junctions++
			}
		}
	}
	cycle, green := junctionTiming(fleet, at)
	return fmt.Sprintf("%s  %6.1f  %7.1f  %5.2f  %5.0f  %5.1f  %4.0f  %4.2f\n", at.Format("15:04"),
		pressure/np, load, occupied/bays, free, queue/junctions, cycle, green)
}

// junctionTiming is the first junction's cycle (between the starts of two
// greens) and green share, sampled every second for five minutes from at.
func junctionTiming(fleet []*Device, at time.Time) (cycle, green float64) {
	d, _ := func() (*Device, int) {
		for _, d := range fleet {
			if d.Kind == devices.KindTrafficLight {
				return d, 0
			}
		}
		return nil, 0
	}()
	var starts []int
	greens, prev := 0, 0.0
	for s := range 300 {
		st := d.signalState(at.Add(time.Duration(s) * time.Second))
		if st == 3 {
			greens++
			if prev != 3 && s > 0 {
				starts = append(starts, s)
			}
		}
		prev = st
	}
	if len(starts) >= 2 {
		cycle = float64(starts[1] - starts[0])
	}
	return cycle, float64(greens) / 300
}

// The shapes of an ordinary day, hour by hour, are golden; and they have the
// shapes the city knows: pressure lowest at the morning peak, power load
// highest in the evening, car parks fullest by day and emptiest at night,
// longer signal cycles and queues at the rush hours.
func TestDailyShapes(t *testing.T) {
	fleet := NewFleet(DemoSpec(1))
	var sb strings.Builder
	sb.WriteString("time   kPa(mean)  load(kW)  bays  free(lots)  queue  cycle  green\n")
	type point struct {
		h                   float64
		pressure, load, occ float64
	}
	var pts []point
	for m := 0; m < 24*60; m += 30 {
		at := day.Add(time.Duration(m) * time.Minute)
		row := dayRow(fleet, at)
		sb.WriteString(row)
		var p point
		var s string
		var free, q, c, g float64
		_, err := fmt.Sscanf(row, "%s %f %f %f %f %f %f %f", &s, &p.pressure, &p.load, &p.occ, &free, &q, &c, &g)
		require.NoError(t, err)
		p.h = float64(m) / 60
		pts = append(pts, p)
	}
	golden(t, "daily_shapes.golden", sb.String())

	argmin := func(f func(point) float64) float64 {
		best := pts[0]
		for _, p := range pts {
			if f(p) < f(best) {
				best = p
			}
		}
		return best.h
	}
	neg := func(f func(point) float64) func(point) float64 { return func(p point) float64 { return -f(p) } }
	require.InDelta(t, 7.5, argmin(func(p point) float64 { return p.pressure }), 1, "mains pressure dips at the morning peak")
	require.InDelta(t, 19, argmin(neg(func(p point) float64 { return p.load })), 1, "power load peaks in the evening")
	require.InDelta(t, 13, argmin(neg(func(p point) float64 { return p.occ })), 1.5, "car parks are fullest by day")
	require.Less(t, pts[6].occ, 0.25, "and nearly empty at 3:00")
	require.Greater(t, pts[6].pressure-pts[15].pressure, 100.0, "the morning dip is deep")
	c, _ := junctionTiming(fleet, day.Add(8*time.Hour))
	require.Equal(t, 90.0, c, "the rush-hour plan runs 90 s cycles")
	c, _ = junctionTiming(fleet, day.Add(3*time.Hour))
	require.Equal(t, 60.0, c, "and 60 s off-peak")
}
