package rules

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
)

// The engine's Run and the tests' receivers start goroutines: none may outlive a test.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The transition kinds are the notifier's event kinds.
func TestTransitionKindsAreTheNotifiersEventKinds(t *testing.T) {
	require.Equal(t, []string{notifier.KindFiring, notifier.KindResolved, notifier.KindRepeat, notifier.KindFlapping},
		[]string{NotifyFiring, NotifyResolved, NotifyRepeat, NotifyFlapping})
}

// Issue 12: /api/v1/alerts rendered {{.Threshold}} as 0 ("below 0") while the
// webhook showed the right value: the API built the template data apart from
// the notification.
func TestTheAPIAndTheNotificationSayTheSame(t *testing.T) {
	for _, tc := range []struct {
		name, rule, summary string
		v                   float64
	}{
		{"below", `{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150,
  annotations: {summary: "{{.Device}} pressure {{.Value}} kPa is below {{.Threshold}}"}}`, "pipe-0001 pressure 120 kPa is below 150", 120},
		{"above", `{name: high, type: threshold, select: {kind: pipe, metric: pressure}, above: 600,
  annotations: {summary: "{{.Value}} above {{.Threshold}}"}}`, "700 above 600", 700},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, tc.rule)}, EngineOptions{Shards: 1, Notifier: rec})
			e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", tc.v, t0)})
			require.Len(t, rec.evs, 1)
			require.Equal(t, tc.summary, rec.evs[0].Annotations["summary"], "the notification")
			alerts := e.Alerts()
			require.Len(t, alerts, 1)
			require.Equal(t, tc.summary, alerts[0].Annotations["summary"], "the API")
		})
	}
}

// Issue 12: a demo device that never reported raised device_silent about
// 30 s after the start with "has been silent for 9223372037 s" (292 years).
// It says it has sent nothing since the start, with the seconds since then.
func TestADeviceNeverSeenIsSilentSinceTheStart(t *testing.T) {
	shipped, err := LoadRules("../configs/rules.yaml")
	require.NoError(t, err)
	var silent *Rule
	for _, r := range shipped {
		if r.Name == "device_silent" {
			silent = r
		}
	}
	require.NotNil(t, silent, "configs/rules.yaml has device_silent")
	heard := dev("power-0001", devices.KindPower, "gulou", 10*time.Second)
	never := dev("power-0002", devices.KindPower, "gulou", 10*time.Second)
	rec := &recorder{}
	e := NewEngine(Default(), []*Rule{silent}, EngineOptions{Shards: 2, Devices: fleet{heard, never}, Notifier: rec})
	e.started = t0
	e.Observe(e.shardOf(heard.ID), []pipeline.Reading{reading(heard.ID, "power", "gulou", "voltage", 230, t0)})
	e.Tick(t0.Add(31 * time.Second))

	summaries := map[string]string{}
	for _, ev := range rec.evs {
		summaries[ev.Labels["device"]] = ev.Annotations["summary"]
	}
	require.Equal(t, map[string]string{
		"power-0001": "power-0001 (gulou) has been silent for 31 s",
		"power-0002": "power-0002 (gulou) has sent no reading since CityPulse started watching it 31 s ago",
	}, summaries)
	for _, a := range e.Alerts() {
		require.Equal(t, "31", a.Value, "the API's value for %s", a.Labels["device"])
		require.Equal(t, summaries[a.Labels["device"]], a.Annotations["summary"])
	}
}

// The engine keeps a device's alerts in the pipeline's shard for it
// (pipeline.ShardOf), from the restore on: a restored alert is found by the
// shard loop that evaluates the device, so a recovery resolves it.
func TestRestoredAlertsLiveInThePipelinesShard(t *testing.T) {
	rules := []*Rule{mustRule(t, "{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180}")}
	statePath := t.TempDir() + "/rules-state.json"
	const shards = 4
	var devs []string
	for i := 0; i < 16; i++ {
		devs = append(devs, "pipe-"+itoa(1000+i))
	}
	e := NewEngine(Default(), rules, EngineOptions{Shards: shards, StatePath: statePath})
	for _, d := range devs {
		e.Observe(pipeline.ShardOf(d, shards), []pipeline.Reading{reading(d, "pipe", "gulou", "pressure", 120, t0)})
	}
	require.Len(t, e.Alerts(), len(devs))
	require.NoError(t, e.save())

	rec := &recorder{}
	e2 := NewEngine(Default(), rules, EngineOptions{Shards: shards, Notifier: rec})
	e2.statePath = statePath // restore from the file, notify at once
	e2.Restore()
	e2.statePath = ""
	require.Len(t, e2.Alerts(), len(devs), "every alert restored")
	for _, d := range devs {
		e2.Observe(pipeline.ShardOf(d, shards), []pipeline.Reading{reading(d, "pipe", "gulou", "pressure", 200, t0.Add(time.Second))})
	}
	require.Len(t, rec.kinds(), len(devs))
	for _, k := range rec.kinds() {
		require.Equal(t, "low:resolved", k)
	}
	require.Empty(t, e2.Alerts())
}
