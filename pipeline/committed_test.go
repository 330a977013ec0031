package pipeline

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// WaitCommitted returns only when the named sink holds every reading of the
// mark, sleeps while that sink fails (whatever the other sinks do), and
// gives up only on ctx or a stopped pipeline.
func TestWaitCommittedReturnsOnlyOnceTheSinkHoldsTheReadings(t *testing.T) {
	const devices, n = 6, 40
	tests := []struct {
		name string
		// failing: the sink waited for ("store") fails until the test lets it
		// recover; recover: it does, after the first wait timed out.
		failing, recover bool
		// tail: the mark is Tail (the journal's end), not where the readings landed.
		tail bool
		// stop: the pipeline stops before the wait.
		stop   bool
		sink   string
		want   error  // of the first wait, bounded by 300 ms
		wantIs string // substring of the first wait's error, when want is nil
	}{
		{name: "a sink that writes: once it holds them", sink: "store"},
		{name: "the journal's tail: once it holds everything", sink: "store", tail: true},
		{name: "a failing sink: not while it fails, then once it recovered", sink: "store", failing: true, recover: true, want: context.DeadlineExceeded},
		{name: "a failing sink that never recovers: until ctx is done", sink: "store", failing: true, want: context.DeadlineExceeded},
		{name: "a pipeline stopped before the sink wrote them: ErrClosed", sink: "store", failing: true, stop: true, want: ErrClosed},
		{name: "a sink the pipeline does not have: an error", sink: "nosuch", wantIs: `no sink named "nosuch"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			store, other := &collectSink{name: "store"}, &collectSink{name: "other"}
			store.failing.Store(tc.failing)
			r := start(t, t.TempDir(), testConfig(), store, other)
			defer func() {
				if !tc.stop {
					r.stop(t)
				}
			}()
			var m Mark
			for d := range devices {
				rs := make([]Reading, n)
				for i := range rs {
					rs[i] = reading(fmt.Sprintf("pipe-%04d", d), i)
				}
				require.NoError(t, r.p.Submit(context.Background(), rs))
				if !tc.tail {
					m = r.p.Landed(m, rs)
				}
			}
			if tc.tail {
				m = r.p.Tail(m)
			}
			require.Len(t, m, r.p.Shards())
			if tc.stop {
				r.stop(t)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			err := r.p.WaitCommitted(ctx, tc.sink, m)
			cancel()
			switch {
			case tc.wantIs != "":
				require.ErrorContains(t, err, tc.wantIs)
				return
			case tc.want != nil:
				require.ErrorIs(t, err, tc.want)
				require.Empty(t, store.readings(), "the sink waited for has written nothing")
				require.Len(t, other.readings(), devices*n, "the other sink wrote them all: its progress does not count")
				if !tc.recover {
					return
				}
				store.failing.Store(false)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				err = r.p.WaitCommitted(ctx, tc.sink, m)
			}
			require.NoError(t, err)
			require.Len(t, store.readings(), devices*n, "every reading of the mark is in the sink when the wait returns")
		})
	}
}

// Landed takes the largest position per shard, and an empty mark asks
// nothing: it returns at once even from a sink that fails.
func TestLandedKeepsTheFurthestPositionOfEachShard(t *testing.T) {
	store := &collectSink{name: "store"}
	store.failing.Store(true)
	r := start(t, t.TempDir(), testConfig(), store)
	defer r.stop(t)
	require.NoError(t, r.p.WaitCommitted(context.Background(), "store", nil), "an empty mark")

	first := []Reading{reading("pipe-0001", 1)}
	second := []Reading{reading("pipe-0001", 2)}
	require.NoError(t, r.p.Submit(context.Background(), first))
	require.NoError(t, r.p.Submit(context.Background(), second))
	shard := r.p.ShardOf("pipe-0001")
	tests := []struct {
		name string
		rs   [][]Reading
		want uint64
	}{
		{"the first record", [][]Reading{first}, first[0].Seq + 1},
		{"the second record", [][]Reading{second}, second[0].Seq + 1},
		{"both, in either order", [][]Reading{second, first}, second[0].Seq + 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var m Mark
			for _, rs := range tc.rs {
				m = r.p.Landed(m, rs)
			}
			require.Equal(t, tc.want, m[shard])
			for s := range m {
				if s != shard {
					require.Zero(t, m[s], "shard %d holds none of them", s)
				}
			}
		})
	}
	require.Less(t, first[0].Seq, second[0].Seq, "Submit set each reading's Seq to its record's position")
}
