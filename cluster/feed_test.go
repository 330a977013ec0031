package cluster

import (
	"context"
	"errors"
	"maps"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/pipeline"
)

// journal records what the feed submits, per device, and can fail.
type journal struct {
	mu    sync.Mutex
	got   map[string][]int64
	fails int // the next fails submissions fail
}

func (j *journal) Submit(_ context.Context, rs []pipeline.Reading) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.fails > 0 {
		j.fails--
		return pipeline.ErrBackpressure
	}
	for _, r := range rs {
		if r.Device != rs[0].Device {
			return errors.New("a submission holds one device")
		}
		j.got[r.Device] = append(j.got[r.Device], r.Time)
	}
	return nil
}

func msg(p int, seq uint64, rs ...pipeline.Reading) Message {
	return Message{Partition: p, Seq: seq, Data: AppendBatch(nil, rs)}
}

func TestFeedDropsRedeliveriesAndRestoresEachDevicesOrder(t *testing.T) {
	tests := []struct {
		name  string
		calls [][]Message
		want  map[string][]int64
		dups  float64
	}{
		{"in order", [][]Message{{msg(0, 1, reading("a", 1), reading("b", 1)), msg(0, 2, reading("a", 2))}},
			map[string][]int64{"a": {1, 2}, "b": {1}}, 0},
		{"a batch redelivered after newer ones", [][]Message{{msg(0, 2, reading("a", 3), reading("a", 4)), msg(0, 1, reading("a", 1), reading("a", 2)), msg(0, 2, reading("a", 3), reading("a", 4))}},
			map[string][]int64{"a": {1, 2, 3, 4}}, 2},
		{"a batch handled, then delivered again", [][]Message{{msg(0, 1, reading("a", 1))}, {msg(0, 1, reading("a", 1)), msg(0, 2, reading("a", 2))}},
			map[string][]int64{"a": {1, 2}}, 1},
		{"a device resending a reading it got no acknowledgement for", [][]Message{{msg(0, 1, reading("a", 5)), msg(0, 2, reading("a", 5), reading("a", 6))}},
			map[string][]int64{"a": {5, 6}}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			j := &journal{got: map[string][]int64{}}
			m := NewMetrics(nil)
			f, err := NewFeed(j, FeedOptions{Window: 16, MaxDevices: 64, Metrics: m})
			require.NoError(t, err)
			f.Owned(0, true)
			for _, call := range tc.calls {
				commit, err := f.Handle(context.Background(), call)
				require.NoError(t, err)
				require.Nil(t, commit, "without cluster.ack_after_sinks nothing is waited for")
			}
			require.Equal(t, tc.want, j.got)
			require.Equal(t, tc.dups, testutil.ToFloat64(m.duplicates))
		})
	}
}

// A failed submission is an error (the batches are not acknowledged) and
// the retry passes every reading again: none is taken for a duplicate of
// itself.
func TestFeedRetryAfterAFailedSubmissionLosesNothing(t *testing.T) {
	j := &journal{got: map[string][]int64{}, fails: 1}
	f, err := NewFeed(j, FeedOptions{Window: 16, MaxDevices: 64})
	require.NoError(t, err)
	call := []Message{msg(3, 1, reading("a", 1), reading("a", 2))}
	_, err = f.Handle(context.Background(), call)
	require.ErrorIs(t, err, pipeline.ErrBackpressure)
	_, err = f.Handle(context.Background(), call)
	require.NoError(t, err)
	require.Equal(t, map[string][]int64{"a": {1, 2}}, j.got)
}

func TestFeedSkipsAndCountsAnUndecodableBatch(t *testing.T) {
	j := &journal{got: map[string][]int64{}}
	m := NewMetrics(nil)
	f, err := NewFeed(j, FeedOptions{Window: 16, MaxDevices: 64, Metrics: m})
	require.NoError(t, err)
	call := []Message{{Partition: 1, Seq: 1, Data: []byte("not a batch")}, msg(1, 2, reading("a", 1))}
	_, err = f.Handle(context.Background(), call)
	require.NoError(t, err)
	require.Equal(t, map[string][]int64{"a": {1}}, j.got)
	require.Equal(t, 1.0, testutil.ToFloat64(m.badBatches))
}

// storeSink is a pipeline sink standing for the shared store: it keeps what
// it is given, and fails while down.
type storeSink struct {
	mu   sync.Mutex
	got  map[string][]int64
	down atomic.Bool
}

func (s *storeSink) Name() string { return "remote_write" }

func (s *storeSink) Write(_ context.Context, b pipeline.Batch) error {
	if s.down.Load() {
		return errors.New("store unavailable")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range b.Readings {
		s.got[r.Device] = append(s.got[r.Device], r.Time)
	}
	return nil
}

func (s *storeSink) stored() map[string][]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.got)
}

// runPipeline runs a real pipeline with sink until the test ends.
func runPipeline(t *testing.T, sink pipeline.Sink) *pipeline.Pipeline {
	t.Helper()
	cfg := pipeline.Default()
	cfg.Shards, cfg.SegmentBytes, cfg.JournalMaxBytes = 2, 64<<10, 16<<20
	cfg.Batch.MaxAge, cfg.RetryMin, cfg.RetryMax = 20*time.Millisecond, 10*time.Millisecond, 20*time.Millisecond
	p, err := pipeline.New(pipeline.Options{Config: cfg, Dir: t.TempDir(), Sinks: []pipeline.SinkSpec{{Sink: sink}}})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })
	return p
}

// With cluster.ack_after_sinks a batch's Commit returns only once the
// store's sink holds its readings: not while the store is down, and not for
// a batch delivered again whose readings the filter drops as duplicates of
// the first delivery, still waiting for the store.
func TestFeedCommitWaitsForTheStoreToHoldTheReadings(t *testing.T) {
	first := []Message{msg(0, 1, reading("a", 1), reading("b", 1)), msg(0, 2, reading("a", 2))}
	tests := []struct {
		name  string
		calls [][]Message // handled in turn while the store is down; the last call's commit is waited for
		want  map[string][]int64
	}{
		{"a batch", [][]Message{first}, map[string][]int64{"a": {1, 2}, "b": {1}}},
		{"a batch delivered again with a newer one, while its first delivery waits for the store",
			[][]Message{first, {first[0], msg(0, 3, reading("a", 3))}}, map[string][]int64{"a": {1, 2, 3}, "b": {1}}},
		{"a batch of duplicates only", [][]Message{first, {msg(0, 1, reading("b", 1))}}, map[string][]int64{"a": {1, 2}, "b": {1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			store := &storeSink{got: map[string][]int64{}}
			store.down.Store(true)
			p := runPipeline(t, store)
			f, err := NewFeed(p, FeedOptions{Window: 16, MaxDevices: 64, AckAfter: []string{"remote_write"}, Committer: p})
			require.NoError(t, err)
			f.Owned(0, true)
			var commit Commit
			for _, call := range tc.calls {
				commit, err = f.Handle(context.Background(), call)
				require.NoError(t, err)
			}
			require.NotNil(t, commit)

			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			require.ErrorIs(t, commit(ctx), context.DeadlineExceeded, "the store is down")
			cancel()
			store.down.Store(false)
			ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			require.NoError(t, commit(ctx))
			require.Equal(t, tc.want, store.stored(), "the store holds them when the commit returns")
		})
	}
}

func TestFeedRefusesToWaitForSinksWithoutACommitter(t *testing.T) {
	_, err := NewFeed(&journal{}, FeedOptions{Window: 16, MaxDevices: 64, AckAfter: []string{"remote_write"}})
	require.ErrorContains(t, err, "Committer")
}
