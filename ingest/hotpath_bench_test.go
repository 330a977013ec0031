package ingest

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// BenchmarkHotPath is the path of a reading without the network: Handler.Handle
// (decode, validate) → pipeline Submit → journal → batch → sink, for messages
// as the efficiency flood sends them (SenML JSON, 4 readings, cmd/loadtest),
// from 16 devices at once. The clock stops when the sink has every reading.
// It reports allocs/reading over the whole process while the clock ran.
func BenchmarkHotPath(b *testing.B) {
	const devs, perMsg = 16, 4
	sink := &countSink{}
	reg := prometheus.NewRegistry()
	p, err := pipeline.New(pipeline.Options{Config: pipeline.Default(), Dir: b.TempDir(), Sinks: []pipeline.SinkSpec{{Sink: sink}}, Registerer: reg})
	if err != nil {
		b.Fatal(err)
	}
	h := NewHandler(Local(p), HandlerOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() { cancel(); <-done }()

	start := float64(time.Now().Add(-time.Minute).UnixMilli()) / 1000
	body := func(k int) []byte {
		b := []byte{'['}
		for i, n := range []string{"pressure", "flow", "pressure", "flow"} {
			if i > 0 {
				b = append(b, ',')
			}
			b = fmt.Appendf(b, `{"n":%q,"t":%.7f,"v":%g}`, n, start+float64(k*4+i)*0.004+4e-7, 400.25+float64(i))
		}
		return append(b, ']')
	}
	msgs := make([][]byte, 1024)
	for k := range msgs {
		msgs[k] = body(k)
	}
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	b.ResetTimer()
	var wg sync.WaitGroup
	for d := range devs {
		dev := devices.Device{ID: fmt.Sprintf("pipe-%04d", d), Kind: devices.KindPipe, District: "gulou"}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := d; k < b.N; k += devs {
				res, err := h.Handle(ctx, dev, payload.Unknown, msgs[k%len(msgs)])
				if err != nil || res.Accepted != perMsg {
					b.Error(res, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	n := int64(b.N) * perMsg
	got := sink.await(n, time.Minute)
	b.StopTimer()
	runtime.ReadMemStats(&ms1)
	if got != n {
		b.Fatalf("the sink has %d of %d readings", got, n)
	}
	b.ReportMetric(perMsg, "readings/op")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/reading")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(n), "allocs/reading")
	b.ReportMetric(counter(b, reg, "citypulse_pipeline_journal_records_total")/counter(b, reg, "citypulse_pipeline_journal_writes_total"), "records/write")
}

// counter reads a counter of reg.
func counter(b *testing.B, reg *prometheus.Registry, name string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	b.Fatalf("no metric %s", name)
	return 0
}
