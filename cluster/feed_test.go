package cluster

import (
	"context"
	"errors"
	"sync"
	"testing"

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
			f, err := NewFeed(j, 16, 64, nil, m)
			require.NoError(t, err)
			f.Owned(0, true)
			for _, call := range tc.calls {
				require.NoError(t, f.Handle(context.Background(), call))
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
	f, err := NewFeed(j, 16, 64, nil, nil)
	require.NoError(t, err)
	call := []Message{msg(3, 1, reading("a", 1), reading("a", 2))}
	require.ErrorIs(t, f.Handle(context.Background(), call), pipeline.ErrBackpressure)
	require.NoError(t, f.Handle(context.Background(), call))
	require.Equal(t, map[string][]int64{"a": {1, 2}}, j.got)
}

func TestFeedSkipsAndCountsAnUndecodableBatch(t *testing.T) {
	j := &journal{got: map[string][]int64{}}
	m := NewMetrics(nil)
	f, err := NewFeed(j, 16, 64, nil, m)
	require.NoError(t, err)
	call := []Message{{Partition: 1, Seq: 1, Data: []byte("not a batch")}, msg(1, 2, reading("a", 1))}
	require.NoError(t, f.Handle(context.Background(), call))
	require.Equal(t, map[string][]int64{"a": {1}}, j.got)
	require.Equal(t, 1.0, testutil.ToFloat64(m.badBatches))
}
