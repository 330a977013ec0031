package cluster

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/citypulse/citypulse/cluster/natstest"
)

// BenchmarkLogAppendR3 appends b.N batches of the given size to an R3 stream
// on a 3-node cluster of real nats-server processes (on this machine), with
// up to cluster.max_in_flight (1024) unacknowledged, and reports acknowledged
// batches/s and the publish-to-ack latency (p50, p99): as fast as the window
// allows (the latency then includes the wait in the window), and paced at one
// batch per ms (the latency of an unloaded cluster). Run with e.g.
//
//	go test -run '^$' -bench BenchmarkLogAppendR3 -benchtime 20000x ./cluster/
func BenchmarkLogAppendR3(b *testing.B) {
	c := natstest.Start(b, 3)
	for _, bc := range []struct {
		size int
		pace time.Duration // 0: as fast as the window allows
	}{{256, 0}, {2048, 0}, {16384, 0}, {2048, time.Millisecond}} {
		size := bc.size
		name := fmt.Sprintf("payload=%dB", size)
		if bc.pace > 0 {
			name += fmt.Sprintf("/paced=%v", bc.pace)
		}
		b.Run(name, func(b *testing.B) {
			nc, err := connectURL(c.URL())
			if err != nil {
				b.Fatal(err)
			}
			defer nc.Close()
			cfg := Default()
			l, err := NewLog(nc, cfg, nil)
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			if _, err := l.EnsureStream(ctx); err != nil {
				b.Fatal(err)
			}
			defer func() { _ = l.JetStream().DeleteStream(ctx, cfg.Stream) }()
			payload := make([]byte, size)
			type pending struct {
				at   time.Time
				wait func(context.Context) error
			}
			ch := make(chan pending, cfg.MaxInFlight)
			lat := make([]time.Duration, 0, b.N)
			done := make(chan error, 1)
			go func() {
				for p := range ch {
					if err := p.wait(ctx); err != nil {
						done <- err
						for range ch {
						}
						return
					}
					lat = append(lat, time.Since(p.at))
				}
				done <- nil
			}()
			b.SetBytes(int64(size))
			b.ResetTimer()
			next := time.Now()
			for i := range b.N {
				if bc.pace > 0 {
					next = next.Add(bc.pace)
					time.Sleep(time.Until(next))
				}
				at := time.Now()
				w, err := l.Append(ctx, i%cfg.Partitions, "", payload)
				if err != nil {
					b.Fatal(err)
				}
				ch <- pending{at, w}
			}
			close(ch)
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "acked/s")
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}
