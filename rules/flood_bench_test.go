package rules

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// BenchmarkObserveFlood is the observers of the shard loops under the
// efficiency flood (cmd/loadtest efficiency): submissions of 4 readings
// (pressure, flow, leak, gas_concentration) from 16 pipe devices, each
// observed as the shard loop does, by the engine with the shipped rules
// (configs/rules.yaml) and then by the vital signs (configs/vitals.yaml),
// over 2 shards. It reports the rules evaluated per reading (3 of the
// shipped 10 for a pressure reading: burst_main, mains_pressure_low,
// device_silent) and allocs/reading.
func BenchmarkObserveFlood(b *testing.B) {
	const devs, shards = 16, 2
	rules, err := LoadRules("../configs/rules.yaml")
	require.NoError(b, err)
	defs, err := LoadRollups("../configs/vitals.yaml")
	require.NoError(b, err)
	e := NewEngine(Default(), rules, EngineOptions{Shards: shards, Notifier: &recorder{}})
	v := NewVitals(DefaultVitals(), defs, nil, shards, nil, nil)
	obs := pipeline.Observers{e, v}
	metrics := []string{"pressure", "flow", "leak", "gas_concentration"}
	r := rand.New(rand.NewPCG(1, 2))
	subs := make([][]pipeline.Reading, 64*devs)
	for i := range subs {
		subs[i] = make([]pipeline.Reading, len(metrics))
		for j, m := range metrics {
			subs[i][j] = pipeline.Reading{Device: fmt.Sprintf("pipe-%04d", i%devs), Kind: "pipe", District: "gulou", Metric: m}
		}
	}
	msg := 0
	// refill gives the submissions the next messages' values and times (1 ms
	// apart, a device's every 16 ms: a rate window fills in a minute).
	refill := func() {
		for _, rs := range subs {
			at := t0.Add(time.Duration(msg) * time.Millisecond).UnixNano()
			for j := range rs {
				rs[j].Value = []float64{400 + r.NormFloat64()*5, 50 + r.NormFloat64(), 0, 1}[j]
				rs[j].Time, rs[j].Received = at+int64(j), at
			}
			msg++
		}
	}
	observe := func(rs []pipeline.Reading) { obs.Observe(pipeline.ShardOf(rs[0].Device, shards), rs) }
	for range 60_000 / len(subs) { // a minute of the flood's time: the rate windows are full
		refill()
		for _, rs := range subs {
			observe(rs)
		}
	}
	evals0 := testutil.ToFloat64(e.m.evals)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0 := processCPU(b)
	n := 0
	b.ResetTimer()
	for b.Loop() {
		if n%len(subs) == 0 {
			b.StopTimer()
			c := processCPU(b)
			refill()
			cpu0 += processCPU(b) - c // not the refill's
			b.StartTimer()
		}
		observe(subs[n%len(subs)])
		n++
	}
	b.StopTimer()
	cpu := processCPU(b) - cpu0
	runtime.ReadMemStats(&ms1)
	readings := float64(n * len(metrics))
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/readings, "ns/reading")
	// on a loaded machine the wall time above says more about the neighbours
	b.ReportMetric(float64(cpu.Nanoseconds())/readings, "cpu-ns/reading")
	b.ReportMetric((testutil.ToFloat64(e.m.evals)-evals0)/readings, "rules_evaluated/reading")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/readings, "allocs/reading")
	require.Empty(b, e.Alerts(), "steady readings: no alert (the benchmark measures evaluation, not notification)")
}

// processCPU is the user+system CPU time of this process.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
