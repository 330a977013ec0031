package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

// TestAConsumerCreatedWithAPositionStartsAfterIt: the position Progress
// records is where a new consumer starts (a promoted standby site, whose
// mirrors carry no consumers); an existing consumer keeps its own.
func TestAConsumerCreatedWithAPositionStartsAfterIt(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := fastConfig(0)
	cfg.Replicas = 1
	l, err := NewLog(connect(t, c.URL()), cfg, nil)
	require.NoError(t, err)
	s := requireStream(t, l)
	publish(t, l, 0, 40, cfg.Partitions)

	// The first site's owner handles every batch; Progress records how far.
	rec, pr := newRecorder(), NewProgress(cfg.Partitions)
	ro := startOwnerWith(t, c.URL(), cfg, pr.Handler(rec.handler(0)), pr.Owned, nil)
	require.Eventually(t, func() bool { return rec.count() == 40 }, 30*time.Second, 20*time.Millisecond)
	ro.stop(t)
	handled := map[int]uint64{}
	for p := range cfg.Partitions {
		handled[p] = pr.Handled(p)
		require.Equal(t, rec.lastSeq()[p], handled[p], "partition %d: the position is its last batch handled", p)
	}

	// No consumers (as at a promoted standby); new batches arrive.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for p := range cfg.Partitions {
		require.NoError(t, s.DeleteConsumer(ctx, consumerName(p)))
	}
	publish(t, l, 40, 40, cfg.Partitions)
	rec2 := newRecorder()
	start := func(_ context.Context, p int) (uint64, error) { return handled[p], nil }
	ro = startOwnerStarting(t, c.URL(), cfg, rec2, start)
	require.Eventually(t, func() bool { return rec2.count() == 40 }, 30*time.Second, 20*time.Millisecond)
	ro.stop(t)
	for p := range cfg.Partitions {
		require.Equal(t, map[int]int{0: 10}, rec2.handlers(p, 0), "partition %d: only the batches after the position", p)
		require.Greater(t, rec2.handled[p][0].seq, handled[p])
	}

	// Restarted without a start: the consumers keep their position.
	publish(t, l, 80, 40, cfg.Partitions)
	rec3 := newRecorder()
	ro = startOwnerStarting(t, c.URL(), cfg, rec3, nil)
	require.Eventually(t, func() bool { return rec3.count() == 40 }, 30*time.Second, 20*time.Millisecond)
	ro.stop(t)
	require.Equal(t, 40, rec3.count())
}

func startOwnerStarting(t *testing.T, url string, cfg Config, rec *recorder, start StartFunc) *runningOwner {
	t.Helper()
	o, err := NewOwner(connect(t, url), cfg, rec.handler(nodeNum(cfg.NodeID)), rec.ownership(nodeNum(cfg.NodeID)), nil, nil)
	require.NoError(t, err)
	o.SetStart(start)
	ctx, cancel := context.WithCancel(context.Background())
	ro := &runningOwner{cancel: cancel, done: make(chan error, 1)}
	go func() { ro.done <- o.Run(ctx) }()
	t.Cleanup(func() { ro.stop(t) })
	return ro
}

// TestTheSnapshotCarriesThePositionItCovers: a checkpoint records the
// position Progress reports with the snapshot; the next owner reads it back
// (Handled) and keeps it through its own checkpoints until it handles more.
func TestTheSnapshotCarriesThePositionItCovers(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := DefaultState()
	cfg.Replicas = 1
	snap := func(int) ([]byte, error) { return []byte("state"), nil }
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	handled := map[int]uint64{}
	old, err := NewStateStore(connect(t, c.URL()), cfg, snap, nil, nil)
	require.NoError(t, err)
	old.SetProgress(func(p int) uint64 { return handled[p] })
	_, err = old.Restore(ctx, 3)
	require.NoError(t, err)
	handled[3] = 1234
	require.NoError(t, old.Checkpoint(ctx, 3))

	next, err := NewStateStore(connect(t, c.URL()), cfg, snap, nil, nil)
	require.NoError(t, err)
	seq, err := next.Handled(ctx, 3)
	require.NoError(t, err)
	require.Equal(t, uint64(1234), seq)
	seq, err = next.Handled(ctx, 2)
	require.NoError(t, err)
	require.Zero(t, seq, "no snapshot: no position")

	// The new owner has handled nothing yet: its checkpoint keeps 1234.
	progress := map[int]uint64{}
	next.SetProgress(func(p int) uint64 { return progress[p] })
	_, err = next.Restore(ctx, 3)
	require.NoError(t, err)
	require.NoError(t, next.Checkpoint(ctx, 3))
	seq, err = next.Handled(ctx, 3)
	require.NoError(t, err)
	require.Equal(t, uint64(1234), seq)
	progress[3] = 2000
	require.NoError(t, next.Checkpoint(ctx, 3))
	seq, err = next.Handled(ctx, 3)
	require.NoError(t, err)
	require.Equal(t, uint64(2000), seq)

	// The fleet alerts' state is no partition of the readings: it records
	// no position (a node's Progress has none for it).
	next.SetProgress(NewProgress(4).Handled)
	_, err = next.Restore(ctx, FleetState)
	require.NoError(t, err)
	require.NoError(t, next.Checkpoint(ctx, FleetState))
	seq, err = next.Handled(ctx, FleetState)
	require.NoError(t, err)
	require.Zero(t, seq)
}

// TestANotificationMarkedDeliveredIsNotRestoredPending: a mirror of the state
// log keeps a delivered notification (deletions are not mirrored); the
// marker Delivered appends makes a restore there skip it.
func TestANotificationMarkedDeliveredIsNotRestoredPending(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := DefaultState()
	cfg.Replicas = 1
	snap := func(int) ([]byte, error) { return []byte("state"), nil }
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := NewStateStore(connect(t, c.URL()), cfg, snap, nil, nil)
	require.NoError(t, err)
	_, err = s.Restore(ctx, 1)
	require.NoError(t, err)
	require.NoError(t, s.Append(ctx, []StateRecord{
		{Partition: 1, Transition: []byte("t1"), NoteKey: "k1", Note: []byte("firing")},
		{Partition: 1, Transition: []byte("t2"), NoteKey: "k2", Note: []byte("resolved")},
	}))
	require.NoError(t, s.Delivered(ctx, "k1"))
	// As a mirror holds it: the delivered notification is still there.
	nc := connect(t, c.URL())
	m := nats.NewMsg(noteSubject(1))
	m.Data = []byte("firing")
	m.Header.Set(noteKeyHeader, "k1")
	m.Header.Set(jetstream.MsgIDHeader, "mirror-copy-k1")
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = js.PublishMsg(ctx, m)
	require.NoError(t, err)
	// ... and the marker again after it, as in the primary's order.
	d := nats.NewMsg(deliveredSubject(1))
	d.Header.Set(noteKeyHeader, "k1")
	_, err = js.PublishMsg(ctx, d)
	require.NoError(t, err)

	next, err := NewStateStore(connect(t, c.URL()), cfg, snap, nil, nil)
	require.NoError(t, err)
	st, err := next.Restore(ctx, 1)
	require.NoError(t, err)
	require.Equal(t, [][]byte{[]byte("resolved")}, st.Notes, "only the notification not delivered is pending")
}

// The fleet's state is checkpointed as partition -1 (clusterstate.Fleet):
// it follows no readings partition, so it has no position (it panicked).
func TestProgressOfNoReadingsPartitionIsZero(t *testing.T) {
	pr := NewProgress(2)
	for _, p := range []int{-1, 2} {
		require.Zero(t, pr.Handled(p))
	}
}
