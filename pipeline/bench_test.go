package pipeline

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// discardSink counts what it is given.
type discardSink struct{ n atomic.Int64 }

func (d *discardSink) Name() string { return "discard" }
func (d *discardSink) Write(_ context.Context, b Batch) error {
	d.n.Add(int64(len(b.Readings)))
	return nil
}

// BenchmarkPipeline measures gateway-side Submit → shard → journal (fsync
// interval) → batch → discard sink, with 10 readings per submission from many
// concurrent devices (as many gateway goroutines as 64 × GOMAXPROCS).
func BenchmarkPipeline(b *testing.B) {
	cfg := Default()
	cfg.JournalMaxBytes = 8 << 30
	sink := &discardSink{}
	p, err := New(Options{Config: cfg, Dir: b.TempDir(), Sinks: []SinkSpec{{Sink: sink}}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var devs atomic.Int64
	b.SetParallelism(64)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		dev := fmt.Sprintf("pipe-%06d", devs.Add(1))
		rs := make([]Reading, 10)
		for i := range rs {
			rs[i] = Reading{Device: dev, Kind: "pipe", District: "gulou", Metric: "pressure", Value: float64(i), Time: time.Now().UnixNano()}
		}
		for pb.Next() {
			if err := p.Submit(context.Background(), rs); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	n := float64(b.N) * 10
	b.ReportMetric(n/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/reading")
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}
