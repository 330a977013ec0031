package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

// A handled batch is acknowledged only once its Commit returned: while the
// store is down (the commits wait) the owner goes on handling newer batches
// up to max_ack_pending, acknowledges none, and keeps them from redelivery
// beyond ack_wait (InProgress); once the store is back every one is
// acknowledged.
func TestOwnerAcknowledgesABatchOnlyOnceTheStoreHasIt(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := fastConfig(0)
	cfg.Replicas = 1
	cfg.AckWait, cfg.PinnedTTL = 3*time.Second, 4*time.Second
	l, err := NewLog(connect(t, c.URL()), cfg, nil)
	require.NoError(t, err)
	s := requireStream(t, l)

	storeUp := make(chan struct{})
	commit := func(ctx context.Context) error {
		select {
		case <-storeUp:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	rec, m := newRecorder(), NewMetrics(nil)
	handle := rec.handler(0)
	ro := startOwnerWith(t, c.URL(), cfg, func(ctx context.Context, msgs []Message) (Commit, error) {
		_, err := handle(ctx, msgs)
		return commit, err
	}, rec.ownership(0), m)
	defer ro.stop(t)

	ackPending := func() (ack, pending int) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for p := range cfg.Partitions {
			cons, err := s.Consumer(ctx, consumerName(p))
			require.NoError(t, err)
			info, err := cons.Info(ctx)
			require.NoError(t, err)
			ack, pending = ack+info.NumAckPending, pending+int(info.NumPending)
		}
		return ack, pending
	}

	// Two rounds: the second is handled while the first one's commits wait.
	publish(t, l, 0, 40, cfg.Partitions)
	require.Eventually(t, func() bool { return rec.count() == 40 }, 30*time.Second, 20*time.Millisecond)
	publish(t, l, 40, 40, cfg.Partitions)
	require.Eventually(t, func() bool { return rec.count() == 80 }, 30*time.Second, 20*time.Millisecond,
		"newer batches are handled while older ones wait for the store")

	// Well past ack_wait: nothing acknowledged, nothing delivered again.
	time.Sleep(3 * cfg.AckWait)
	ack, pending := ackPending()
	require.Equal(t, 80, ack, "no batch is acknowledged while the store does not have it")
	require.Zero(t, pending)
	require.Zero(t, testutil.ToFloat64(m.redelivered), "a batch waiting for the store is not delivered again")
	require.Positive(t, testutil.ToFloat64(m.ackExtended), "kept in progress")
	require.Equal(t, 80.0, testutil.ToFloat64(m.awaitingStore))
	for p := range cfg.Partitions {
		require.Equal(t, map[int]int{0: 20}, rec.handlers(p, 0), "partition %d: each batch handled once", p)
	}

	close(storeUp)
	require.Eventually(t, func() bool {
		ack, pending := ackPending()
		return ack == 0 && pending == 0
	}, 30*time.Second, 50*time.Millisecond, "every batch acknowledged once the store has it")
	require.Zero(t, testutil.ToFloat64(m.awaitingStore))
	rec.requireInOrder(t)
	var h dto.Metric
	require.NoError(t, m.storeWait.Write(&h))
	require.GreaterOrEqual(t, h.GetHistogram().GetSampleCount(), uint64(2*cfg.Partitions), "a store wait observed per handler call, at least one a partition and round")
}
