package pipeline

import (
	"fmt"
	"testing"
)

// BenchmarkTail is the tail under the efficiency flood: records of 4
// readings from 16 devices pushed as the shard loop does, and two sinks
// that keep up taking batches of 5,000 readings from it, in a tail of the
// largest size (40,000 readings). One op is one record pushed; ns/reading
// counts each reading once (pushed, then read by both sinks), and
// sink_reads/reading says how many of the pushed readings the sinks got
// back (2 when both took every whole batch; the last part batch is not read).
func BenchmarkTail(b *testing.B) {
	const perRec, recLen, batch, sinks = 4, 100, 5000, 2
	tl := newTail(40000)
	devs := make([]string, 16)
	for i := range devs {
		devs[i] = fmt.Sprintf("pipe-%04d", i)
	}
	metrics := []string{"pressure", "flow", "leak", "gas_concentration"}
	recs := make([][]Reading, len(devs))
	for d := range recs {
		recs[d] = make([]Reading, perRec)
		for i := range recs[d] {
			recs[d][i] = Reading{Device: devs[d], Kind: "pipe", District: "gulou", Metric: metrics[i], Value: float64(i), Time: int64(i), Received: 1}
		}
	}
	var pos uint64
	var cursor [sinks]uint64
	dst := make([]Reading, 0, batch+perRec)
	n, read := 0, 0
	for b.Loop() {
		rs := recs[n%len(recs)]
		tl.push(rs, pos, pos+recLen)
		pos += recLen
		n++
		if n%(batch/perRec) == 0 {
			for s := range cursor {
				var ok bool
				dst, cursor[s], _, ok = tl.read(cursor[s], dst[:0], batch, 0)
				if !ok || len(dst) != batch {
					b.Fatalf("sink %d: read %d readings (ok %v)", s, len(dst), ok)
				}
				read += len(dst)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n*perRec), "ns/reading")
	b.ReportMetric(float64(read)/float64(n*perRec), "sink_reads/reading")
}
