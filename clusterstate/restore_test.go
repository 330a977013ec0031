package clusterstate

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/rules"
)

type discard struct {
	mu sync.Mutex
	n  int
}

func (d *discard) Enqueue(notifier.Event) { d.mu.Lock(); d.n++; d.mu.Unlock() }

// 10,000 firing burst-main alerts in one partition on a 3-node cluster (R3):
// the new owner restores them all, from the log alone (no checkpoint yet)
// and from a snapshot. It logs the snapshot size per alert and the times.
func TestRestoreTenThousandAlerts(t *testing.T) {
	const alerts, p = 10_000, 5
	c := natstest.Start(t, 3)
	rs, err := rules.ParseRules([]byte("rules:\n- "+burstRule+"\n"), "test")
	require.NoError(t, err)
	build := func(url string) (*rules.Engine, *cluster.StateStore, *Partitions) {
		ps := NewPartitions(partitions, nil)
		eng := rules.NewEngine(rules.Default(), rs, rules.EngineOptions{Shards: 2, Notifier: &discard{}, Journal: ps})
		cfg := cluster.DefaultState()
		cfg.Checkpoint = time.Hour // by hand here
		store, err := cluster.NewStateStore(connect(t, url), cfg, ps.Snapshot, nil, nil)
		require.NoError(t, err)
		ps.Attach(eng, store, nil)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		require.NoError(t, store.Ensure(ctx))
		return eng, store, ps
	}
	eng, store, ps := build(c.Nodes[0].URL())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- eng.Run(ctx) }()
	defer func() { cancel(); <-done }()
	ps.OnOwned(p, true)

	var devs []string
	for i := 0; len(devs) < alerts; i++ {
		if d := fmt.Sprintf("pipe-%07d", i); cluster.PartitionOf(d, partitions) == p {
			devs = append(devs, d)
		}
	}
	t0 := time.Now().Add(-time.Hour)
	for s := 0; s <= 100; s += 10 {
		v := 400.0
		if s == 100 {
			v = 300
		}
		for _, d := range devs {
			observe(eng, d, v, t0.Add(time.Duration(s)*time.Second))
		}
	}
	fctx, fcancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer fcancel()
	start := time.Now()
	require.NoError(t, eng.Flush(fctx))
	t.Logf("%d transitions recorded (R3) in %v", alerts, time.Since(start))
	js, err := jetstream.New(connect(t, c.Nodes[1].URL()))
	require.NoError(t, err)
	str, err := js.Stream(fctx, cluster.DefaultState().Stream)
	require.NoError(t, err)
	info, err := str.Info(fctx, jetstream.WithSubjectFilter(cluster.StateSubjectPrefix+".>"))
	require.NoError(t, err)
	require.Equal(t, map[string]uint64{fmt.Sprintf("%s.%d.t", cluster.StateSubjectPrefix, p): alerts}, info.State.Subjects)

	restore := func(what string) {
		e2, s2, _ := build(c.Nodes[2].URL())
		start := time.Now()
		st, err := s2.Restore(fctx, p)
		require.NoError(t, err)
		read := time.Since(start)
		n, err := e2.ImportState(st.Snapshot, st.Transitions)
		require.NoError(t, err)
		require.Equal(t, alerts, n)
		views := e2.Alerts()
		require.Len(t, views, alerts)
		for _, v := range views {
			require.Equal(t, "firing", v.State)
		}
		t.Logf("restore %s: %d snapshot bytes (%.0f B/alert), %d transitions (%d B/transition); read %v, read+import %v",
			what, len(st.Snapshot), float64(len(st.Snapshot))/alerts, len(st.Transitions), avgLen(st.Transitions), read, time.Since(start))
	}
	restore("from the log alone")
	start = time.Now()
	require.NoError(t, store.Checkpoint(fctx, p))
	t.Logf("checkpoint of %d alerts: %v", alerts, time.Since(start))
	restore("from a snapshot")
}

func avgLen(bs [][]byte) int {
	if len(bs) == 0 {
		return 0
	}
	n := 0
	for _, b := range bs {
		n += len(b)
	}
	return n / len(bs)
}
