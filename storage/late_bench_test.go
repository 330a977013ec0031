package storage

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// BenchmarkTSDBWriteLate writes batches of 1000 late readings (behind their
// series' latest, each at a new ms) over 10,000 series: every one is looked
// up in the store for an existing value at its ms. "in order" is the same
// with readings after the latest, for comparison.
func BenchmarkTSDBWriteLate(b *testing.B) {
	b.Run("late", func(b *testing.B) { benchWriteAfter(b, -time.Hour) })
	b.Run("in order", func(b *testing.B) { benchWriteAfter(b, time.Hour) })
}

func benchWriteAfter(b *testing.B, offset time.Duration) {
	db, err := OpenTSDB(b.TempDir(), DefaultTSDB(), nil, prometheus.NewRegistry())
	require.NoError(b, err)
	defer db.Close()
	const series = 10_000
	now := time.Now().Add(-2 * time.Hour)
	start := now.Add(offset)
	batch := pipeline.Batch{Readings: make([]pipeline.Reading, series)}
	for i := range batch.Readings {
		batch.Readings[i] = pipeline.Reading{Device: fmt.Sprintf("pipe-%05d", i), District: "gulou", Kind: "pipe", Metric: "pressure",
			Value: 1, Time: now.UnixNano()}
	}
	require.NoError(b, db.Write(context.Background(), batch))
	late := pipeline.Batch{Readings: make([]pipeline.Reading, 1000)}
	n := 0
	appended0 := testutil.ToFloat64(db.m.appended)
	b.ResetTimer()
	for b.Loop() {
		for i := range late.Readings {
			late.Readings[i] = pipeline.Reading{Device: fmt.Sprintf("pipe-%05d", n%series), District: "gulou", Kind: "pipe", Metric: "pressure",
				Value: 2, Time: start.Add(time.Duration(n) * time.Millisecond).UnixNano()}
			n++
		}
		require.NoError(b, db.Write(context.Background(), late))
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
	// every late reading is at a new ms: all must be stored, none refused
	b.ReportMetric((testutil.ToFloat64(db.m.appended)-appended0)/float64(n), "stored/reading")
}

// BenchmarkTSDBWriteFlood writes the efficiency flood's batches: 5,000
// readings of 16 devices × 4 metrics, in order, each series many times per
// batch (what batchSamples logs).
func BenchmarkTSDBWriteFlood(b *testing.B) {
	db, err := OpenTSDB(b.TempDir(), DefaultTSDB(), nil, prometheus.NewRegistry())
	require.NoError(b, err)
	defer db.Close()
	metrics := []string{"pressure", "flow", "leak", "gas_concentration"}
	devs := make([]string, 16)
	for i := range devs {
		devs[i] = fmt.Sprintf("pipe-%04d", i)
	}
	start := time.Now().Add(-time.Hour)
	batch := pipeline.Batch{Readings: make([]pipeline.Reading, 5000)}
	n := 0
	appended0 := testutil.ToFloat64(db.m.appended)
	cpu0 := processCPU(b)
	for b.Loop() {
		for i := range batch.Readings {
			msg := n / len(metrics)
			batch.Readings[i] = pipeline.Reading{Device: devs[msg%len(devs)], District: "gulou", Kind: "pipe", Metric: metrics[n%len(metrics)],
				Value: float64(n), Time: start.Add(time.Duration(msg/len(devs)) * time.Millisecond).UnixNano()}
			n++
		}
		require.NoError(b, db.Write(context.Background(), batch))
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
	// CPU of the whole process (the TSDB's own goroutines too): on a loaded
	// machine the wall time above says more about the neighbours.
	b.ReportMetric(float64(processCPU(b)-cpu0)/float64(n), "cpu-ns/reading")
	// every reading is at a new ms of its series: all must be stored
	b.ReportMetric((testutil.ToFloat64(db.m.appended)-appended0)/float64(n), "stored/reading")
}

// processCPU is the user+system CPU time of this process.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	require.NoError(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
