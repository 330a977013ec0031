package storage

import (
	"context"
	"fmt"
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
