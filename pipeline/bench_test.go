package pipeline

import (
	"context"
	"fmt"
	"runtime"
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

// BenchmarkPipeline: gateway-side Submit → shard → journal (fsync interval)
// → batch → discard sink, with 10 readings per submission from many
// concurrent devices (as many gateway goroutines as 64 × GOMAXPROCS).
//
//   - acked: the clock stops when the last Submit has returned, i.e. every
//     reading is journaled and acknowledged; the sink may still be behind.
//   - sink: the clock stops when the sink has every reading (the end-to-end
//     rate, as BenchmarkPipelineTSDB measures it into the TSDB).
//
// Both report stored/reading: the share of the submitted readings the sink had
// when the clock stopped (1 for sink; for acked it shows how far behind the
// sink was).
func BenchmarkPipeline(b *testing.B) {
	for _, waitSink := range []bool{false, true} {
		name := "acked"
		if waitSink {
			name = "sink"
		}
		b.Run(name, func(b *testing.B) { benchPipeline(b, waitSink) })
	}
}

func benchPipeline(b *testing.B, waitSink bool) {
	const perSubmit = 10
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
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Error(err)
		}
	}()
	var devs atomic.Int64
	b.SetParallelism(64)
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		dev := fmt.Sprintf("pipe-%06d", devs.Add(1))
		rs := make([]Reading, perSubmit)
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
	n := int64(b.N) * perSubmit
	if waitSink {
		deadline := time.Now().Add(time.Minute)
		for sink.n.Load() < n {
			if time.Now().After(deadline) {
				b.Fatalf("the sink has %d of %d readings after a minute", sink.n.Load(), n)
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
	b.StopTimer()
	stored := sink.n.Load()
	runtime.ReadMemStats(&ms1)
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
	b.ReportMetric(float64(stored)/float64(n), "stored/reading")
	// Every allocation in the process while the clock ran (gateway side, shard
	// loop, sink worker), per reading.
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(n), "allocs/reading")
}
