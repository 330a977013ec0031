package cluster

import (
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

// A node whose ownership hook takes longer than cluster.pinned_ttl on a gain
// (restoring a partition's state while JetStream is slow: up to 30 s) must
// keep pulling meanwhile: it once stopped, so JetStream unpinned it and
// answered its waiting pull requests with pin mismatches, several at once
// (lost once, gained twice: a second restore). The partition must be
// handled to the end by this node (the only one), nothing left behind, and
// the pin kept.
func TestASlowGainLongerThanThePinnedTTLLeavesNoBatchBehind(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := fastConfig(0)
	cfg.Replicas = 1
	cfg.Partitions = 1
	l, err := NewLog(connect(t, c.URL()), cfg, nil)
	require.NoError(t, err)
	requireStream(t, l)
	publish(t, l, 0, 500, cfg.Partitions)

	rec := newRecorder()
	var once sync.Once
	owned := func(p int, gained bool) {
		rec.ownership(0)(p, gained)
		if gained {
			once.Do(func() { time.Sleep(3 * cfg.PinnedTTL) })
		}
	}
	m := NewMetrics(nil)
	startOwnerWith(t, c.URL(), cfg, rec.handler(0), owned, m)
	time.Sleep(cfg.PinnedTTL)
	publish(t, l, 500, 500, cfg.Partitions)
	require.Eventually(t, func() bool { return rec.count() == 1000 }, time.Minute, 50*time.Millisecond,
		"every batch handled")
	rec.requireInOrder(t)
	lost, gained := testutil.ToFloat64(m.changes.WithLabelValues("lost")), testutil.ToFloat64(m.changes.WithLabelValues("gained"))
	t.Logf("partition lost %v times, gained %v times", lost, gained)
	require.Zero(t, lost, "the pin is kept through a gain hook of 3 × pinned_ttl")
	require.Equal(t, 1.0, gained)
}
