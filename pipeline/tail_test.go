package pipeline

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// TestTailReadsAsTheJournal writes random records to a real journal and
// pushes them to a small tail (evicting, and starting over at a record larger
// than it), and requires every read the tail serves to equal the journal
// reader's from the same position with the same limits, field for field.
func TestTailReadsAsTheJournal(t *testing.T) {
	const capacity = 40
	j, _, err := openJournal(t.TempDir(), 4<<10, discard())
	require.NoError(t, err)
	defer j.close()
	jr := newJournalReader(j)
	defer jr.close()
	tl := newTail(capacity)
	rng := rand.New(rand.NewPCG(13, 7))
	var starts []uint64 // every record's position
	served, refused := 0, 0
	for rec := range 600 {
		n := 1 + rng.IntN(6)
		if rec%97 == 50 {
			n = capacity + 1 // larger than the tail: it starts over
		}
		dev := fmt.Sprintf("dev-%d", rng.IntN(5))
		rs := make([]Reading, n)
		for i := range rs {
			rs[i] = Reading{Device: dev, Kind: "pipe", District: "d" + dev, Metric: fmt.Sprintf("m%d", i),
				Value: rng.NormFloat64(), Time: rng.Int64(), Received: rng.Int64N(1 << 40)}
		}
		pos := j.written.Load()
		b := appendRecord(nil, rs)
		require.NoError(t, j.append(b))
		tl.push(rs, pos, pos+uint64(len(b)))
		starts = append(starts, pos)

		// Read from a few recent records with assorted limits.
		for range 3 {
			from := starts[max(0, len(starts)-1-rng.IntN(12))]
			maxR, maxB := 1+rng.IntN(30), rng.IntN(600)
			got, next, consumed, ok := tl.read(from, nil, maxR, maxB)
			if !ok {
				refused++
				require.Empty(t, got)
				continue
			}
			served++
			want, wnext, wconsumed, err := jr.read(from, nil, maxR, maxB)
			require.NoError(t, err)
			require.Equal(t, want, got, "record %d, from %d, max %d readings %d bytes", rec, from, maxR, maxB)
			require.Equal(t, wnext, next)
			require.Equal(t, wconsumed, consumed)
		}
	}
	require.Greater(t, served, 1000, "the tail serves the recent records")
	require.Greater(t, refused, 50, "and refuses the evicted ones")
	// Not a record boundary, and past the end: the journal's business.
	_, _, _, ok := tl.read(tl.start+1, nil, 10, 0)
	require.False(t, ok)
	_, _, _, ok = tl.read(tl.end, nil, 10, 0)
	require.False(t, ok)
}

// TestSinksReadTheJournalOnlyToCatchUp: a sink that keeps up takes (nearly)
// all its readings from memory; one that failed for longer than the tail
// holds catches up from the journal; one that was down until a restart reads
// them all from the journal, from its cursor; each gets every reading once,
// in order.
func TestSinksReadTheJournalOnlyToCatchUp(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig() // 2 shards, batches of 100: a tail of 1,024 readings each
	fast := &collectSink{name: "fast"}
	slow := &collectSink{name: "slow"}
	down := &collectSink{name: "down"}
	slow.failing.Store(true)
	down.failing.Store(true)
	p, err := New(Options{Config: cfg, Dir: dir, Sinks: []SinkSpec{{Sink: fast}, {Sink: slow}, {Sink: down}},
		DrainTimeout: 500 * time.Millisecond, Registerer: prometheus.NewRegistry()})
	require.NoError(t, err)
	r := run(p)
	const devices, n = 8, 1000 // 8,000 readings, 4,000 a shard on average
	submitAll(t, p, devices, n, 10)
	waitFor(t, "the fast sink", func() bool { return len(fast.readings()) == devices*n })
	slow.failing.Store(false)
	waitFor(t, "the slow sink", func() bool { return len(slow.readings()) == devices*n })
	r.stop(t)
	requireAllInOrder(t, fast.readings(), devices, n)
	requireAllInOrder(t, slow.readings(), devices, n)
	fromJournal := func(p *Pipeline, sink string) float64 {
		return testutil.ToFloat64(p.m.sinkJournalReads.WithLabelValues(sink))
	}
	require.Less(t, fromJournal(p, "fast"), float64(devices*n)/2, "a sink that keeps up reads from memory")
	require.GreaterOrEqual(t, fromJournal(p, "slow"), float64(devices*n-2*(1024+cfg.Batch.MaxReadings)),
		"a sink behind the tail reads the journal (all but the tails and the batch it read before failing)")
	require.Empty(t, down.readings())

	down = &collectSink{name: "down"} // back after the restart
	p, err = New(Options{Config: cfg, Dir: dir, Sinks: []SinkSpec{{Sink: fast}, {Sink: down}},
		DrainTimeout: 500 * time.Millisecond, Registerer: prometheus.NewRegistry()})
	require.NoError(t, err)
	r = run(p)
	waitFor(t, "the sink that was down", func() bool { return len(down.readings()) == devices*n })
	r.stop(t)
	requireAllInOrder(t, down.readings(), devices, n)
	require.Equal(t, float64(devices*n), fromJournal(p, "down"), "after a restart, only the journal has them")
	requireAllInOrder(t, fast.readings(), devices, n) // nothing again
}

// run runs p until stop.
func run(p *Pipeline) *running {
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx) }()
	return r
}
