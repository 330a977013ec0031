package rules

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// windowOp is one reading offered to a RateWindow: its time in buckets and
// nanoseconds past the bucket's start, and its value.
type windowOp struct {
	t int64
	v float64
}

// checkWindow feeds ops to a RateWindow and checks, at every reading in the
// newest bucket, that its extreme is the brute-force extreme of every value
// offered so far whose bucket lies in [k-RateBuckets, k], and that it never
// holds more than RateBuckets+1 buckets.
func checkWindow(t *testing.T, width int64, maxima bool, ops []windowOp) {
	t.Helper()
	var w RateWindow
	var seen []windowOp
	var head int64
	for i, op := range ops {
		ext, newest := w.observe(width, maxima, op.t, op.v)
		k := floorDiv(op.t, width)
		require.Equal(t, i == 0 || k >= head, newest, "op %d: newest", i)
		head = max(head, k)
		if i == 0 {
			head = k
		}
		seen = append(seen, op)
		require.LessOrEqual(t, w.Len(), RateBuckets+1, "op %d", i)
		if !newest {
			continue
		}
		want, found := 0.0, false
		for _, s := range seen {
			if sk := floorDiv(s.t, width); sk >= k-RateBuckets && sk <= k && (!found || more(maxima, s.v, want)) {
				want, found = s.v, true
			}
		}
		require.True(t, found)
		require.Equal(t, want, ext, "op %d (t=%d v=%v): window extreme", i, op.t, op.v)
	}
}

func TestRateWindowMatchesBruteForce(t *testing.T) {
	const width = int64(time.Second)
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name  string
		next  func(i int, prev windowOp) windowOp
		count int
	}{
		{"noise at 10 Hz", func(i int, _ windowOp) windowOp {
			return windowOp{int64(i) * int64(100*time.Millisecond), 400 + r.NormFloat64()*5}
		}, 3000},
		{"falling at 10 Hz (every bucket kept)", func(i int, _ windowOp) windowOp {
			return windowOp{int64(i) * int64(100*time.Millisecond), 1000 - float64(i)}
		}, 3000},
		{"rising at 10 Hz", func(i int, _ windowOp) windowOp {
			return windowOp{int64(i) * int64(100*time.Millisecond), float64(i)}
		}, 3000},
		{"gaps longer than the window", func(i int, p windowOp) windowOp {
			return windowOp{p.t + r.Int64N(int64(90*time.Second)), r.Float64() * 100}
		}, 500},
		{"out of order by up to 80 s", func(i int, _ windowOp) windowOp {
			return windowOp{int64(i)*int64(time.Second) - r.Int64N(int64(80*time.Second)), r.Float64() * 100}
		}, 3000},
		{"equal values", func(i int, _ windowOp) windowOp {
			return windowOp{int64(i) * int64(300*time.Millisecond), float64(r.IntN(3))}
		}, 1000},
		{"times before 1970", func(i int, _ windowOp) windowOp {
			return windowOp{-int64(time.Hour) + int64(i)*int64(700*time.Millisecond), r.Float64()}
		}, 1000},
	} {
		for _, maxima := range []bool{true, false} {
			t.Run(tc.name, func(t *testing.T) {
				ops := make([]windowOp, tc.count)
				for i := range ops {
					prev := windowOp{}
					if i > 0 {
						prev = ops[i-1]
					}
					ops[i] = tc.next(i, prev)
				}
				checkWindow(t, width, maxima, ops)
			})
		}
	}
}

func FuzzRateWindow(f *testing.F) {
	f.Add(int64(1000), true, []byte{0, 10, 1, 20, 2, 5, 0, 30})
	f.Add(int64(7), false, []byte{5, 1, 3, 2, 200, 9, 0, 0, 1, 1})
	f.Fuzz(func(t *testing.T, width int64, maxima bool, b []byte) {
		if width <= 0 || width > int64(time.Hour) || len(b) > 4000 {
			return
		}
		// Each pair of bytes: a step of time (signed, in units of width/4) and a value.
		var ops []windowOp
		var at int64
		for i := 0; i+1 < len(b); i += 2 {
			at += int64(int8(b[i])) * max(1, width/4)
			ops = append(ops, windowOp{at, float64(b[i+1] % 16)})
		}
		checkWindow(t, width, maxima, ops)
	})
}

// Readings judged by when they were measured, not when they arrived. Each
// step is one reading through the engine; want is what is notified.
func TestRateRuleJudgedByReadingTime(t *testing.T) {
	type rd struct {
		measured, arrived time.Duration // since t0
		v                 float64
		want              []string
	}
	// backlog: n readings measured every step, values from f, all arriving
	// within one second an hour later (a gateway back after an outage).
	backlog := func(n int, step time.Duration, f func(i int) float64, want func(i int) []string) []rd {
		out := make([]rd, n)
		for i := range out {
			out[i] = rd{measured: time.Duration(i) * step, arrived: time.Hour + time.Duration(i)*time.Microsecond, v: f(i), want: want(i)}
		}
		return out
	}
	none := func(int) []string { return nil }
	for _, tc := range []struct {
		name  string
		rule  string
		steps []rd
	}{
		{"a slow decline replayed at once is no burst",
			"{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}",
			backlog(180, 10*time.Second, func(i int) float64 { return 500 - float64(i) }, none)},
		{"a slow rise replayed at once is no surge",
			"{name: surge, type: rate, select: {kind: pipe, metric: pressure}, rise: 80, window: 60s}",
			backlog(180, 10*time.Second, func(i int) float64 { return 100 + float64(i) }, none)},
		{"a burst inside a replayed backlog fires, and resolves once it left the window",
			"{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}",
			backlog(30, 10*time.Second, func(i int) float64 {
				if i < 10 {
					return 400
				}
				return 300
			}, func(i int) []string {
				switch i {
				case 10:
					return []string{"burst:firing"}
				case 16: // measured at 160 s: the last 400 (at 90 s) is 70 s back (at 150 s it was just in)
					return []string{"burst:resolved"}
				}
				return nil
			})},
		{"a late low reading is not a drop from the newer high one",
			"{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}",
			[]rd{{0, 0, 350, nil}, {20 * time.Second, 20 * time.Second, 400, nil},
				{10 * time.Second, 21 * time.Second, 300, nil}, // measured before 400: it rose, it did not drop
				{30 * time.Second, 30 * time.Second, 395, nil}}},
		{"a late high reading counts for the readings measured after it",
			"{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}",
			[]rd{{0, 0, 400, nil}, {30 * time.Second, 30 * time.Second, 390, nil},
				{10 * time.Second, 31 * time.Second, 500, nil},                        // late: decides nothing by itself
				{40 * time.Second, 40 * time.Second, 410, []string{"burst:firing"}}}}, // 500 → 410 within 30 s
		{"a reading older than the window changes nothing",
			"{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}",
			[]rd{{100 * time.Second, 0, 400, nil}, {110 * time.Second, time.Second, 390, nil},
				{0, 2 * time.Second, 900, nil},
				{120 * time.Second, 3 * time.Second, 380, nil}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			e := NewEngine(Default(), []*Rule{mustRule(t, tc.rule)}, EngineOptions{Shards: 1, Notifier: rec})
			for i, st := range tc.steps {
				before := len(rec.kinds())
				e.Observe(0, []pipeline.Reading{{Device: "pipe-0001", Kind: "pipe", District: "gulou", Metric: "pressure",
					Value: st.v, Time: t0.Add(st.measured).UnixNano(), Received: t0.Add(st.arrived).UnixNano()}})
				got := rec.kinds()[before:]
				if len(got) == 0 {
					got = nil
				}
				require.Equal(t, st.want, got, "step %d (measured %v, arrived %v, v=%v)", i, st.measured, st.arrived, st.v)
			}
		})
	}
}

// The persisted state of a rate alert is bounded whatever the reading rate:
// ten minutes at 10 Hz of a steady fall (the worst case: every bucket's
// maximum stays in the deque) save as about one kilobyte.
func TestRateStateIsBounded(t *testing.T) {
	rule := mustRule(t, "{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 1000000, window: 60s}")
	path := t.TempDir() + "/rules-state.json"
	e := NewEngine(Default(), []*Rule{rule}, EngineOptions{Shards: 1, Notifier: &recorder{}, StatePath: path})
	for i := 0; i < 6000; i++ {
		at := t0.Add(time.Duration(i) * 100 * time.Millisecond)
		e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", 100000-float64(i), at)})
	}
	require.NoError(t, e.save())
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Less(t, st.Size(), int64(2048), "one rate alert's saved state (was every point: 600 at 10 Hz, about 30 KB)")
}

func TestRateWindowJSON(t *testing.T) {
	rule := mustRule(t, "{name: burst, type: rate, drop: 80, window: 60s}")
	var s State
	for i, v := range []float64{400, 390, 410, 380, 370} {
		rule.condition(&s, v, t0.Add(time.Duration(i)*1500*time.Millisecond))
	}
	b, err := json.Marshal(s)
	require.NoError(t, err)
	require.Contains(t, string(b), `"rate":{"w":1000000000,"hi":true,"q":[[1780315203,410],[1,380],[2,370]]}`)
	var back State
	require.NoError(t, json.Unmarshal(b, &back))
	require.Equal(t, s.Rate.Buckets(), back.Rate.Buckets())
	// It goes on from where it was: 410 is still in the window.
	bad, delta := rule.condition(&back, 320, t0.Add(20*time.Second))
	require.True(t, bad)
	require.Equal(t, 90.0, delta)

	for _, bad := range []string{
		`{"rate":{"w":1000000000,"hi":true,"q":[[5,1],[0,0]]}}`,  // buckets out of order
		`{"rate":{"w":1000000000,"hi":true,"q":[[4,1],[1,2]]}}`,  // not decreasing maxima
		`{"rate":{"w":1000000000,"hi":false,"q":[[4,1],[1,0]]}}`, // not increasing minima
		`{"rate":{"w":-1,"q":[]}}`,                               // negative width
		`{"rate":{"w":1,"q":[[1.5,0]]}}`,                         // bucket not an integer
	} {
		require.Error(t, json.Unmarshal([]byte(bad), &back), bad)
	}
}

// A snapshot written before RateWindow (every point under "window") is
// folded into the bounded window at the next reading.
func TestLegacyWindowIsFoldedIn(t *testing.T) {
	rule := mustRule(t, "{name: burst, type: rate, drop: 80, window: 60s}")
	old := `{"phase":0,"bad":false,"window":[{"t":"2026-06-01T12:00:00Z","v":420},{"t":"2026-06-01T12:00:20Z","v":410}]}`
	var s State
	require.NoError(t, json.Unmarshal([]byte(old), &s))
	require.Len(t, s.LegacyWindow, 2)
	bad, delta := rule.condition(&s, 330, t0.Add(40*time.Second))
	require.True(t, bad)
	require.Equal(t, 90.0, delta)
	require.Nil(t, s.LegacyWindow)
	b, err := json.Marshal(s)
	require.NoError(t, err)
	require.NotContains(t, string(b), `"window"`)
}

// A rule reloaded with another window keeps its extremes, rescaled; one
// turned from drop to rise starts afresh.
func TestRateWindowAcrossReloads(t *testing.T) {
	drop60 := mustRule(t, "{name: burst, type: rate, drop: 80, window: 60s}")
	drop120 := mustRule(t, "{name: burst, type: rate, drop: 80, window: 120s}")
	rise := mustRule(t, "{name: burst, type: rate, rise: 80, window: 120s}")
	var s State
	drop60.condition(&s, 420, t0)
	drop60.condition(&s, 400, t0.Add(30*time.Second))
	bad, delta := drop120.condition(&s, 330, t0.Add(90*time.Second)) // 420 at t0 is within 120 s
	require.True(t, bad)
	require.Equal(t, 90.0, delta)
	bad, _ = rise.condition(&s, 500, t0.Add(91*time.Second)) // no minima kept: nothing to rise from
	require.False(t, bad)
	bad, delta = rise.condition(&s, 590, t0.Add(92*time.Second))
	require.True(t, bad)
	require.Equal(t, 90.0, delta)
}

// An alert flapping for as long as its flap window keeps at most FlapMax+1
// flips in its state, and still notifies as before: one flapping notice, then
// the truth once stable for the window.
func TestFlipsAreBounded(t *testing.T) {
	r := mustRule(t, "{name: x, type: threshold, above: 10}")
	flap := FlapPolicy{Window: 10 * time.Minute, Max: 4}
	var steps []step
	for i := 0; i < 1000; i++ {
		v := 11.0
		if i%2 == 1 {
			v = 9
		}
		var want []string
		switch {
		case i < 4 && v > 10:
			want = []string{"firing"}
		case i < 4:
			want = []string{"resolved"}
		case i == 4:
			want = []string{"flapping"}
		}
		steps = append(steps, step{at: time.Duration(i) * 500 * time.Millisecond, v: v, want: want})
	}
	steps = append(steps, step{at: 999*500*time.Millisecond + 10*time.Minute, tick: true, want: []string{"resolved"}})
	s := run(t, r, steps[:1000], flap)
	require.LessOrEqual(t, len(s.Flips), flap.Max+1)
	run(t, r, steps, flap)
}

// The snapshot is encoded after the shard locks are released while the shard
// loop goes on: it must not share a rate window's ring with the live state
// (run with -race; without the copy the race detector stops it, and a torn
// window could save out of order and be refused at the next start).
func TestSnapshotWhileObserving(t *testing.T) {
	rule := mustRule(t, "{name: burst, type: rate, select: {kind: pipe, metric: pressure}, drop: 1000000, window: 2s}")
	path := t.TempDir() + "/rules-state.json"
	e := NewEngine(Default(), []*Rule{rule}, EngineOptions{Shards: 1, Notifier: &recorder{}, StatePath: path})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 20000; i++ {
			at := t0.Add(time.Duration(i) * 10 * time.Millisecond)
			e.Observe(0, []pipeline.Reading{reading("pipe-0001", "pipe", "gulou", "pressure", float64(i%97)*-float64(i), at)})
		}
	}()
	for saved := 0; ; saved++ {
		require.NoError(t, e.save())
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		var f stateFile
		require.NoError(t, json.Unmarshal(b, &f), "snapshot %d does not load", saved)
		select {
		case <-done:
			return
		default:
		}
	}
}
