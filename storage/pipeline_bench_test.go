package storage

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// countingTSDB counts what reached the store.
type countingTSDB struct {
	*TSDB
	n atomic.Int64
}

func (c *countingTSDB) Write(ctx context.Context, b pipeline.Batch) error {
	if err := c.TSDB.Write(ctx, b); err != nil {
		return err
	}
	c.n.Add(int64(len(b.Readings)))
	return nil
}

// BenchmarkPipelineTSDB: submissions of 10 readings (one device, 10 metrics)
// from 10,000 devices = 100,000 series, through the journal into the embedded
// TSDB. The clock stops when the TSDB has every reading, so readings/s is the
// sustained end-to-end rate. It also reports the Go heap in use per 100,000
// active series after a GC.
func BenchmarkPipelineTSDB(b *testing.B) {
	const devicesN, metricsN = 10_000, 10
	dir := b.TempDir()
	db, err := OpenTSDB(dir+"/tsdb", DefaultTSDB(), nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	sink := &countingTSDB{TSDB: db}
	cfg := pipeline.Default()
	cfg.JournalMaxBytes = 16 << 30
	p, err := pipeline.New(pipeline.Options{Config: cfg, Dir: dir, Sinks: []pipeline.SinkSpec{{Sink: sink}}})
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

	metrics := []string{"pressure", "flow", "leak", "gas_concentration", "temperature", "m5", "m6", "m7", "m8", "m9"}
	const workers = 64
	start := time.Now().Add(-time.Hour)
	b.ReportAllocs()
	b.ResetTimer()
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rs := make([]pipeline.Reading, metricsN)
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				d := int(i % devicesN)
				round := i / devicesN
				dev := fmt.Sprintf("pipe-%05d", d)
				for m := range rs {
					rs[m] = pipeline.Reading{Device: dev, Kind: "pipe", District: "gulou", Metric: metrics[m],
						Value: float64(i), Time: start.Add(time.Duration(round) * time.Millisecond).UnixNano()}
				}
				if err := p.Submit(context.Background(), rs); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for sink.n.Load() < int64(b.N)*metricsN {
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	n := float64(b.N) * metricsN
	b.ReportMetric(n/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/reading")
	if b.N >= devicesN {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "heap-MiB/100k-series")
	}
}

// BenchmarkActiveSeriesHeap reports the Go heap that 100,000 active series cost
// the embedded store (and this sink's series cache): each series gets 12 samples
// (two minutes at a 10 s interval), then the heap growth is measured after GC.
func BenchmarkActiveSeriesHeap(b *testing.B) {
	for b.Loop() {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		db, err := OpenTSDB(b.TempDir(), DefaultTSDB(), nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		const series = 100_000
		t0 := time.Now().Add(-time.Hour)
		batch := pipeline.Batch{Readings: make([]pipeline.Reading, 0, 1000)}
		for s := 0; s < 12; s++ {
			for i := 0; i < series; i++ {
				batch.Readings = append(batch.Readings, pipeline.Reading{Device: fmt.Sprintf("pipe-%06d", i/10), Kind: "pipe",
					District: fmt.Sprintf("d%02d", i%50), Metric: fmt.Sprintf("m%d", i%10), Value: float64(s),
					Time: t0.Add(time.Duration(s) * 10 * time.Second).UnixNano()})
				if len(batch.Readings) == cap(batch.Readings) {
					if err := db.Write(context.Background(), batch); err != nil {
						b.Fatal(err)
					}
					batch.Readings = batch.Readings[:0]
				}
			}
		}
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/(1<<20), "heap-MiB/100k-series")
		db.Close()
	}
}
