package sim

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/devices"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestDemoFleet(t *testing.T) {
	fleet := NewFleet(DemoSpec(1))
	require.Len(t, fleet, 324)
	perKind := map[devices.Kind]int{}
	districts := map[string]bool{}
	ids := map[string]bool{}
	lots := 0
	for _, d := range fleet {
		perKind[d.Kind]++
		districts[d.DistrictName] = true
		require.False(t, ids[d.ID], "ids are unique: %s", d.ID)
		ids[d.ID] = true
		require.NoError(t, d.Registration().Validate(), "the server's device list takes it")
		require.NotNil(t, d.Location)
		if d.IsLot() {
			lots++
		}
	}
	require.Len(t, districts, 6)
	require.Equal(t, map[devices.Kind]int{devices.KindPipe: 60, devices.KindPower: 48, devices.KindWater: 24,
		devices.KindTrafficLight: 72, devices.KindParking: 120}, perKind)
	require.Equal(t, 24, lots, "one parking device in five is a lot")
	again := NewFleet(DemoSpec(1))
	other := NewFleet(DemoSpec(2))
	require.Equal(t, fleet[5].Secret, again[5].Secret, "the same seed, the same secrets")
	require.NotEqual(t, fleet[5].Secret, other[5].Secret, "another seed, other secrets")
}

// Which devices an incident hits, when: the demo's schedule with the first
// incident at 75 s, each lasting 2 minutes.
func TestDemoIncidentSchedule(t *testing.T) {
	c := NewCity(CityOptions{Spec: DemoSpec(1), Incidents: DemoIncidents(75*time.Second, 2*time.Minute)})
	tests := []struct {
		el   time.Duration
		want []string
	}{
		{0, nil},
		{74 * time.Second, nil},
		{75 * time.Second, []string{"burst_main in gulou demo-pipe-gulou-0000 (#1)"}},
		{194 * time.Second, []string{"burst_main in gulou demo-pipe-gulou-0000 (#1)"}},
		{195 * time.Second, nil},
		{255 * time.Second, []string{"dark_junction in xuanwu demo-tl-xuanwu-0000 (#1)"}},
		{435 * time.Second, []string{"substation_trip in qinhuai (#1)"}},
		{615 * time.Second, []string{"car_park_filling in jianye (#1)"}},
		{(75 + 720) * time.Second, []string{"burst_main in xuanwu demo-pipe-xuanwu-0000 (#2)", "car_park_filling in jianye (#1)"}},
		// the seventh burst is in gulou again, on its next main
		{(75 + 6*720) * time.Second, []string{"burst_main in gulou demo-pipe-gulou-0001 (#7)", "car_park_filling in qinhuai (#6)"}},
	}
	for _, tt := range tests {
		t.Run(tt.el.String(), func(t *testing.T) {
			require.Equal(t, tt.want, c.Active(tt.el))
		})
	}
}

// timeline drives a city on a fake clock for d in steps and writes, minute
// by minute, the reports of each kind, the incidents that hold and the burst
// main's pressure, and checks every device reports at its declared interval.
func timeline(t *testing.T, c *City, start time.Time, d, step time.Duration) string {
	c.Start(start)
	last := map[*Device]time.Time{}
	perMinute := map[devices.Kind]int{}
	var sb strings.Builder
	burst := c.Devices()[0]
	for _, dev := range c.Devices() {
		if dev.ID == "demo-pipe-gulou-0000" {
			burst = dev
		}
	}
	var pressure []string
	for now := start; now.Sub(start) < d; now = now.Add(step) {
		for _, r := range c.Due(now) {
			perMinute[r.Device.Kind]++
			if prev, ok := last[r.Device]; ok && !r.Event {
				gap := now.Sub(prev)
				// a meter silenced by a power cut has a longer gap; every other
				// report comes its interval after the last (on the clock's step)
				cut := c.Conditions(r.Device, prev.Add(r.Device.Interval).Sub(start)).Trip
				if gap < r.Device.Interval || (gap >= r.Device.Interval+step && !cut) {
					t.Fatalf("%s reported %v after its last report, its interval is %v", r.Device.ID, gap, r.Device.Interval)
				}
			}
			last[r.Device] = now
			if r.Device == burst {
				mark := ""
				if r.Event {
					mark = "!"
				}
				pressure = append(pressure, fmt.Sprintf("%.0f%s", r.Readings[0].V, mark))
			}
		}
		if el := now.Sub(start) + step; el%time.Minute == 0 {
			fmt.Fprintf(&sb, "%3.0fm  pipe %3d  power %3d  water %3d  tl %4d  park %3d  burst-main kPa %s  %s\n", el.Minutes(),
				perMinute[devices.KindPipe], perMinute[devices.KindPower], perMinute[devices.KindWater],
				perMinute[devices.KindTrafficLight], perMinute[devices.KindParking],
				strings.Join(pressure, ","), strings.Join(c.Active(now.Sub(start)), "; "))
			perMinute = map[devices.Kind]int{}
			pressure = nil
		}
	}
	return sb.String()
}

// The demo city's first twenty minutes at 8:00 on an injected clock are
// golden: every device reports at its declared interval (and at once when an
// incident starts or ends for it), the power meters of a tripped district
// fall silent, the burst main's pressure collapses and comes back; the same
// seed gives the same city.
func TestDemoCityTimeline(t *testing.T) {
	opts := CityOptions{Spec: DemoSpec(1), Incidents: DemoIncidents(75*time.Second, 2*time.Minute), Noise: 0.01}
	start := day.Add(8 * time.Hour)
	got := timeline(t, NewCity(opts), start, 20*time.Minute, 100*time.Millisecond)
	golden(t, "demo_timeline.golden", got)
	require.Equal(t, got, timeline(t, NewCity(opts), start, 20*time.Minute, 100*time.Millisecond), "deterministic given the seed")
	opts.Spec = DemoSpec(2)
	require.NotEqual(t, got, timeline(t, NewCity(opts), start, 20*time.Minute, 100*time.Millisecond), "another seed, another city")
}

// recorder is a Publisher that keeps what it was handed.
type recorder struct {
	mu     sync.Mutex
	bodies map[string][]string
}

func (r *recorder) Publish(_ context.Context, d *Device, body []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.bodies[d.ID] = append(r.bodies[d.ID], string(body))
	return nil
}

// Run publishes every device's first report within 3 s and stops with ctx,
// leaving no goroutine behind.
func TestRunPublishesEveryDeviceAndStops(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := NewCity(CityOptions{Spec: DemoSpec(1), Noise: 0.01, Registerer: reg})
	rec := &recorder{bodies: map[string][]string{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, rec, time.Now) }()
	require.Eventually(t, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.bodies) == len(c.Devices())
	}, 30*time.Second, 50*time.Millisecond, "every device reports within its first 3 s (30 s under load)")
	cancel()
	require.NoError(t, <-done)
	sent, failed := c.Stats()
	require.GreaterOrEqual(t, sent, int64(len(c.Devices())))
	require.Zero(t, failed)
	require.Equal(t, float64(sent), testutil.ToFloat64(c.reports.WithLabelValues("published")))
	body := rec.bodies["demo-pipe-gulou-0000"][0]
	require.True(t, strings.HasPrefix(body, `[{"n":"pressure","t":`), body)
}

// An incident injected while the city runs starts where it says, and the
// devices it hits report at once: the burst main's next report is its alarm.
func TestInjectedIncidentIsReportedAtOnce(t *testing.T) {
	c := NewCity(CityOptions{Spec: DemoSpec(1)})
	start := day.Add(12 * time.Hour)
	c.Start(start)
	now := start
	for ; now.Sub(start) < 20*time.Second; now = now.Add(100 * time.Millisecond) {
		c.Due(now)
	}
	c.Inject(Incident{Type: "burst_main", At: c.Elapsed(now), Lasts: time.Minute, Devices: 1, District: 4})
	reports := c.Due(now)
	require.Len(t, reports, 1, "only the burst main reports at once")
	r := reports[0]
	require.Equal(t, "demo-pipe-qixia-0000", r.Device.ID)
	require.True(t, r.Event)
	require.Less(t, r.Readings[0].V, 100.0, "its pressure has collapsed")
	require.Equal(t, []string{"burst_main in qixia demo-pipe-qixia-0000 (#1)"}, c.Active(c.Elapsed(now)))
	for end := now.Add(time.Minute); now.Before(end); now = now.Add(100 * time.Millisecond) {
		c.Due(now)
	}
	reports = c.Due(now)
	require.Len(t, reports, 1, "and again when it is mended")
	require.Greater(t, reports[0].Readings[0].V, 300.0)
}
