package rules

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
)

func mustRule(t testing.TB, y string) *Rule {
	t.Helper()
	rs, err := ParseRules([]byte("rules:\n- "+y+"\n"), "test")
	require.NoError(t, err)
	return rs[0]
}

type step struct {
	at   time.Duration // since t0
	v    float64
	tick bool // advance with time only (no reading)
	want []string
}

var t0 = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)

func run(t *testing.T, r *Rule, steps []step, flap FlapPolicy) *State {
	t.Helper()
	var s State
	for i, st := range steps {
		now := t0.Add(st.at)
		var tr []Transition
		if st.tick {
			tr = s.Advance(r, now, flap)
		} else {
			bad, delta := r.condition(&s, st.v, now)
			s.Value, s.Delta = st.v, delta
			tr = s.Step(r, bad, now, flap)
		}
		var got []string
		for _, x := range tr {
			got = append(got, x.Kind)
		}
		require.Equal(t, st.want, got, "step %d (t=%v v=%v)", i, st.at, st.v)
	}
	return &s
}

func TestEvaluator(t *testing.T) {
	noFlap := FlapPolicy{}
	tests := []struct {
		name  string
		rule  string
		steps []step
	}{
		{"above fires at once without for, and resolves below the threshold",
			"{name: hot, type: threshold, above: 100}", []step{
				{0, 90, false, nil}, {1 * time.Second, 101, false, []string{"firing"}},
				{2 * time.Second, 100, false, nil}, // equal: no change either way
				{3 * time.Second, 99, false, []string{"resolved"}},
			}},
		{"hysteresis: it clears only below the clear threshold",
			"{name: low_pressure, type: threshold, below: 150, clear: 180}", []step{
				{0, 149, false, []string{"firing"}}, {time.Second, 170, false, nil}, {2 * time.Second, 180, false, nil},
				{3 * time.Second, 181, false, []string{"resolved"}}, {4 * time.Second, 160, false, nil},
				{5 * time.Second, 149.9, false, []string{"firing"}},
			}},
		{"hold-off: a blip shorter than for is never notified",
			"{name: x, type: threshold, above: 10, for: 30s}", []step{
				{0, 11, false, nil}, {10 * time.Second, 12, false, nil}, {20 * time.Second, 5, false, nil},
				{40 * time.Second, 0, true, nil},
			}},
		{"hold-off: it fires once the condition held for the whole duration, on a tick",
			"{name: x, type: threshold, above: 10, for: 30s, clear_for: 10s}", []step{
				{0, 11, false, nil}, {29 * time.Second, 0, true, nil}, {30 * time.Second, 0, true, []string{"firing"}},
				{31 * time.Second, 5, false, nil}, {40 * time.Second, 0, true, nil}, {41 * time.Second, 0, true, []string{"resolved"}},
			}},
		{"clear_for: a dip during the clear hold-off keeps it firing",
			"{name: x, type: threshold, above: 10, clear_for: 10s}", []step{
				{0, 11, false, []string{"firing"}}, {5 * time.Second, 9, false, nil}, {10 * time.Second, 12, false, nil},
				{25 * time.Second, 12, false, nil},
			}},
		{"outside a range, with a narrower range to clear into",
			"{name: ph, type: threshold, outside: [6.5, 8.5], clear_in: [6.8, 8.2]}", []step{
				{0, 7, false, nil}, {time.Second, 8.6, false, []string{"firing"}}, {2 * time.Second, 8.4, false, nil},
				{3 * time.Second, 8.1, false, []string{"resolved"}}, {4 * time.Second, 6.4, false, []string{"firing"}},
			}},
		{"rate: a drop of more than 80 within 60 s is a burst main",
			"{name: burst, type: rate, drop: 80, window: 60s}", []step{
				{0, 420, false, nil}, {20 * time.Second, 410, false, nil}, {40 * time.Second, 330, false, []string{"firing"}},
				{70 * time.Second, 320, false, nil},                   // 410 still in the window
				{110 * time.Second, 330, false, []string{"resolved"}}, // the high points left the window
				{111 * time.Second, 250, false, nil},                  // a drop of 80 exactly: not more
				{112 * time.Second, 249, false, []string{"firing"}},
			}},
		{"repeat_interval re-notifies while firing",
			"{name: x, type: threshold, above: 10, repeat_interval: 1m}", []step{
				{0, 11, false, []string{"firing"}}, {59 * time.Second, 0, true, nil}, {60 * time.Second, 0, true, []string{"repeat"}},
				{90 * time.Second, 0, true, nil}, {120 * time.Second, 0, true, []string{"repeat"}},
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			run(t, mustRule(t, tc.rule), tc.steps, noFlap)
		})
	}
}

func TestStateRules(t *testing.T) {
	dark := mustRule(t, "{name: dark, type: state, select: {kind: traffic_light, metric: state}, equals: \"off\", for: 30s}")
	run(t, dark, []step{
		{0, 3, false, nil}, {time.Second, 0, false, nil}, {31 * time.Second, 0, false, []string{"firing"}},
		{32 * time.Second, 3, false, []string{"resolved"}},
	}, FlapPolicy{})

	flashing := mustRule(t, "{name: flashing, type: state, select: {kind: traffic_light, metric: state}, equals: flashing, outside_hours: [22, 6]}")
	var s State
	night := time.Date(2026, 6, 1, 23, 0, 0, 0, time.Local)
	bad, _ := flashing.condition(&s, 4, night)
	require.False(t, bad, "flashing at 23:00 is normal")
	day := time.Date(2026, 6, 1, 14, 0, 0, 0, time.Local)
	bad, _ = flashing.condition(&s, 4, day)
	require.True(t, bad, "flashing at 14:00 is a fault")

	_, err := ParseRules([]byte("rules:\n- {name: x, type: state, select: {kind: traffic_light, metric: state}, equals: purple}\n"), "t")
	require.ErrorContains(t, err, "equals")
}

func TestFlappingBecomesOneNotice(t *testing.T) {
	r := mustRule(t, "{name: x, type: threshold, above: 10}")
	flap := FlapPolicy{Window: time.Minute, Max: 4}
	var steps []step
	want := [][]string{{"firing"}, {"resolved"}, {"firing"}, {"resolved"}, {"flapping"}, nil, nil, nil, nil, nil}
	for i := 0; i < 10; i++ {
		v := 11.0
		if i%2 == 1 {
			v = 9
		}
		steps = append(steps, step{at: time.Duration(i) * time.Second, v: v, want: want[i]})
	}
	// Quiet for a whole window: the truth is told once more (last reading was 9: resolved).
	steps = append(steps, step{at: 9*time.Second + time.Minute, tick: true, want: []string{"resolved"}})
	s := run(t, r, steps, flap)
	require.False(t, s.Flapping)
}

func TestParseRulesRejectsBadRules(t *testing.T) {
	tests := []struct{ name, rule, want string }{
		{"two thresholds", "{name: x, type: threshold, above: 1, below: 0}", "exactly one"},
		{"a clear on the wrong side", "{name: x, type: threshold, above: 100, clear: 120}", "hysteresis"},
		{"a rate without a window", "{name: x, type: rate, drop: 5}", "window"},
		{"an unknown type", "{name: x, type: magic}", "type"},
		{"an unknown severity", "{name: x, type: threshold, above: 1, severity: panic}", "severity"},
		{"a bad template", "{name: x, type: threshold, above: 1, annotations: {summary: \"{{.Nope\"}}", "annotation"},
		{"an unknown key", "{name: x, type: threshold, above: 1, colour: red}", "colour"},
		{"a fleet rule without a ratio", "{name: x, type: fleet}", "silent_ratio"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseRules([]byte("rules:\n- "+tc.rule+"\n"), "t")
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestTheShippedRulesLoad(t *testing.T) {
	rs, err := LoadRules("../configs/rules.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, rs)
}

// recorder collects events.
type recorder struct {
	mu  sync.Mutex
	evs []notifier.Event
}

func (r *recorder) Enqueue(ev notifier.Event) { r.mu.Lock(); r.evs = append(r.evs, ev); r.mu.Unlock() }
func (r *recorder) kinds() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range r.evs {
		out = append(out, e.Labels["alertname"]+":"+e.Kind)
	}
	return out
}

func reading(dev, kind, district, metric string, v float64, at time.Time) pipeline.Reading {
	return pipeline.Reading{Device: dev, Kind: kind, District: district, Metric: metric, Value: v, Time: at.UnixNano(), Received: at.UnixNano()}
}

// TestEngineTimersInABubble runs the engine's ticker in a synctest bubble: the
// hold-off fires on the tick (no further reading), deadman and fleet rules
// fire when devices fall silent, and a restart restores the firing alert
// without notifying it again.
func TestEngineTimersInABubble(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rules, err := ParseRules([]byte(`rules:
- {name: low_pressure, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180, for: 30s,
   annotations: {summary: "Pressure at {{.Device}} ({{.District}}) is {{.Value}} kPa"}}
- {name: silent, type: deadman, select: {kind: power}, factor: 3}
- {name: outage, type: fleet, select: {kind: power}, silent_ratio: 0.5, factor: 3}
`), "t")
		require.NoError(t, err)
		fleet := fleet{
			dev("pipe-0001", devices.KindPipe, "gulou", 10*time.Second),
			dev("power-0001", devices.KindPower, "gulou", 10*time.Second),
			dev("power-0002", devices.KindPower, "gulou", 10*time.Second),
		}
		rec := &recorder{}
		statePath := t.TempDir() + "/state.json"
		e := NewEngine(Default(), rules, EngineOptions{Shards: 2, Devices: fleetView{fleet}, Notifier: rec, StatePath: statePath, FsyncEach: true})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- e.Run(ctx) }()

		now := time.Now()
		e.Observe(e.shardOf("pipe-0001"), []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 120, now)})
		e.Observe(e.shardOf("power-0001"), []pipeline.Reading{reading("power-0001", "power", "gulou", "voltage", 230, now)})
		e.Observe(e.shardOf("power-0002"), []pipeline.Reading{reading("power-0002", "power", "gulou", "voltage", 230, now)})
		time.Sleep(29 * time.Second)
		synctest.Wait()
		require.Empty(t, rec.kinds(), "nothing before the hold-off")
		// After 31 s the hold-off has passed (fired on the tick, with no new
		// reading) and the power meters have been silent for more than 3 × 10 s:
		// each is dead, and so is more than half of gulou's power fleet.
		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.ElementsMatch(t, []string{"low_pressure:firing", "silent:firing", "silent:firing", "outage:firing"}, rec.kinds())
		for _, ev := range rec.evs {
			if ev.Labels["alertname"] == "low_pressure" {
				require.Equal(t, "Pressure at pipe-0001 (gulou) is 120 kPa", ev.Annotations["summary"])
			}
		}
		cancel()
		require.NoError(t, <-done)

		// A restart keeps the firing alert and does not notify it again.
		rec2 := &recorder{}
		e2 := NewEngine(Default(), rules, EngineOptions{Shards: 2, Devices: fleetView{fleet}, Notifier: rec2, StatePath: statePath, FsyncEach: true})
		ctx2, cancel2 := context.WithCancel(context.Background())
		go func() { done <- e2.Run(ctx2) }()
		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.Empty(t, rec2.kinds(), "no re-notification after a restart")
		var firing int
		for _, a := range e2.Alerts() {
			if a.State == "firing" {
				firing++
			}
		}
		require.GreaterOrEqual(t, firing, 3)
		// Pressure recovers above the clear threshold: resolved once the clear hold-off passed.
		e2.Observe(e2.shardOf("pipe-0001"), []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 190, time.Now())})
		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.Contains(t, rec2.kinds(), "low_pressure:resolved")
		// A power meter reports again: its deadman alert resolves.
		e2.Observe(e2.shardOf("power-0001"), []pipeline.Reading{reading("power-0001", "power", "gulou", "voltage", 230, time.Now())})
		synctest.Wait() // notified once the state that has it is saved
		require.Contains(t, rec2.kinds(), "silent:resolved")
		cancel2()
		require.NoError(t, <-done)
	})
}

type fleetView struct{ fleet }

func (f fleetView) Get(id string) (devices.Device, bool) {
	for _, d := range f.fleet {
		if d.ID == id {
			return d, true
		}
	}
	return devices.Device{}, false
}

func itoa(i int) string {
	const d = "0123456789"
	if i < 10 {
		return d[i : i+1]
	}
	return itoa(i/10) + d[i%10:i%10+1]
}

func TestReloadKeepsTheStateOfRulesThatStay(t *testing.T) {
	a := mustRule(t, "{name: hot, type: threshold, select: {kind: pipe, metric: pressure}, above: 100}")
	b := mustRule(t, "{name: cold, type: threshold, select: {kind: pipe, metric: pressure}, below: 0}")
	rec := &recorder{}
	e := NewEngine(Default(), []*Rule{a, b}, EngineOptions{Shards: 1, Notifier: rec})
	e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 150, t0)})
	require.Equal(t, []string{"hot:firing"}, rec.kinds())

	a2 := mustRule(t, "{name: hot, type: threshold, select: {kind: pipe, metric: pressure}, above: 120}")
	e.Reload([]*Rule{a2})
	e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 140, t0.Add(time.Second))})
	require.Equal(t, []string{"hot:firing"}, rec.kinds(), "still firing after the reload: not notified again")
	require.Len(t, e.Alerts(), 1)
	e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 110, t0.Add(2*time.Second))})
	require.Equal(t, []string{"hot:firing", "hot:resolved"}, rec.kinds(), "the new threshold applies")
}

// stateChecker is a notifier that, on every notification, loads the saved
// state as a restarted engine would and records whether the alert is there.
type stateChecker struct {
	t     *testing.T
	rules []*Rule
	path  string
	mu    sync.Mutex
	seen  []string // kind:phase-after-restart
}

func (c *stateChecker) Enqueue(ev notifier.Event) {
	e2 := NewEngine(Default(), c.rules, EngineOptions{Shards: 1, StatePath: c.path, FsyncEach: true})
	e2.restore()
	phase := "unknown"
	for _, a := range e2.Alerts() {
		if a.Labels["alertname"] == ev.Labels["alertname"] {
			phase = a.State
		}
	}
	c.mu.Lock()
	c.seen = append(c.seen, ev.Kind+":"+phase)
	c.mu.Unlock()
}

func (c *stateChecker) got() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.seen...)
}

// A notification goes out only once the saved state has the transition: a
// crash right after the operations centre heard "firing" must not make the
// restarted server fire again (TestAlertsSurviveSIGKILL shows it end to end,
// but there it is a race; here it is checked at every notification).
func TestNotifiedOnlyAfterTheStateIsSaved(t *testing.T) {
	for _, fsync := range []pipeline.FsyncPolicy{pipeline.FsyncAlways, pipeline.FsyncInterval} {
		t.Run(string(fsync), func(t *testing.T) {
			rules := []*Rule{mustRule(t, "{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180}")}
			c := &stateChecker{t: t, rules: rules, path: t.TempDir() + "/state.json"}
			e := NewEngine(Default(), rules, EngineOptions{Shards: 1, Notifier: c, StatePath: c.path, FsyncEach: fsync == pipeline.FsyncAlways})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- e.Run(ctx) }()
			e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 120, t0)})
			require.Eventually(t, func() bool { return len(c.got()) == 1 }, 5*time.Second, time.Millisecond)
			e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 200, t0.Add(time.Second))})
			require.Eventually(t, func() bool { return len(c.got()) == 2 }, 5*time.Second, time.Millisecond)
			cancel()
			require.NoError(t, <-done)
			require.Equal(t, []string{"firing:firing", "resolved:unknown"}, c.got(),
				"at each notification a restart already knows it (a resolved alert is no longer listed)")
		})
	}
}

func TestReplayTransitionLog(t *testing.T) {
	rec := func(seq uint64, dev string, ph Phase) string {
		b, err := json.Marshal(logRecord{Seq: seq, Key: alertKey{Rule: "low", Device: dev, Kind: "pipe", Metric: "pressure"}, State: State{Phase: ph}})
		require.NoError(t, err)
		return string(b) + "\n"
	}
	for _, tc := range []struct {
		name             string
		snapSeq          uint64
		log              string
		applied, skipped int
		firing           []string // devices firing after the replay
	}{
		{"empty", 0, "", 0, 0, nil},
		{"two alerts", 0, rec(1, "pipe-1", Firing) + rec(2, "pipe-2", Firing), 2, 0, []string{"pipe-1", "pipe-2"}},
		{"last record wins", 0, rec(1, "pipe-1", Firing) + rec(2, "pipe-1", Inactive), 2, 0, nil},
		{"older than the snapshot", 5, rec(4, "pipe-1", Firing) + rec(6, "pipe-2", Firing), 1, 0, []string{"pipe-2"}},
		{"torn tail", 0, rec(1, "pipe-1", Firing) + `{"seq":2,"key":{"rule":"lo`, 1, 1, []string{"pipe-1"}},
		{"a damaged line is skipped", 0, rec(1, "pipe-1", Firing) + "garbage\n" + rec(3, "pipe-2", Firing), 2, 1, []string{"pipe-1", "pipe-2"}},
		{"a torn line then a new one", 0, `{"seq":1,"key":{"rule":"lo` + "\n" + rec(2, "pipe-2", Firing), 1, 1, []string{"pipe-2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEngine(Default(), nil, EngineOptions{Shards: 2})
			e.seq.Store(tc.snapSeq)
			applied, skipped := e.replayLog(strings.NewReader(tc.log))
			require.Equal(t, tc.applied, applied)
			require.Equal(t, tc.skipped, skipped)
			var firing []string
			for _, s := range e.shards {
				for k, a := range s.alerts {
					if a.state.Phase == Firing {
						firing = append(firing, k.Device)
					}
				}
			}
			require.ElementsMatch(t, tc.firing, firing)
		})
	}
}

// After a torn write the next run starts a clean log: its records replay.
func TestTransitionLogAfterATornWrite(t *testing.T) {
	rules := []*Rule{mustRule(t, "{name: low, type: threshold, select: {kind: pipe, metric: pressure}, below: 150, clear: 180}")}
	dir := t.TempDir()
	statePath := dir + "/rules-state.json"
	require.NoError(t, os.WriteFile(dir+"/rules-state.log", []byte(`{"seq":1,"key":{"rule":"lo`), 0o644))
	run := func(f func(e *Engine, rec *recorder)) *recorder {
		rec := &recorder{}
		e := NewEngine(Default(), rules, EngineOptions{Shards: 1, Notifier: rec, StatePath: statePath})
		e.Restore() // before the first reading, as serve does
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- e.Run(ctx) }()
		f(e, rec)
		cancel()
		require.NoError(t, <-done)
		return rec
	}
	rec := run(func(e *Engine, rec *recorder) {
		e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 120, t0)})
		require.Eventually(t, func() bool { return len(rec.kinds()) == 1 }, 5*time.Second, time.Millisecond)
	})
	require.Equal(t, []string{"low:firing"}, rec.kinds())
	rec = run(func(e *Engine, _ *recorder) {
		e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 110, t0.Add(time.Second))})
		time.Sleep(50 * time.Millisecond)
	})
	require.Empty(t, rec.kinds(), "still firing after the restart: not notified again")
}

func FuzzReplayTransitionLog(f *testing.F) {
	f.Add([]byte(`{"seq":1,"key":{"rule":"low","device":"pipe-1"},"state":{"phase":2}}` + "\n"))
	f.Add([]byte("{\"seq\":1}\n\n{}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		e := NewEngine(Default(), nil, EngineOptions{Shards: 2})
		applied, skipped := e.replayLog(bytes.NewReader(b))
		require.GreaterOrEqual(t, applied, 0)
		require.GreaterOrEqual(t, skipped, 0)
		n := 0
		for _, s := range e.shards {
			n += len(s.alerts)
		}
		require.LessOrEqual(t, n, applied)
	})
}
