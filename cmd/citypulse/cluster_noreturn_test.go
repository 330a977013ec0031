package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// startNodes starts n CityPulse nodes of a cluster of n at once, each with
// env added to its environment.
func (e *clusterEnv) startNodes(n, partitions int, env ...string) []*servertest.Server {
	nodes := make([]*servertest.Server, n)
	var wg sync.WaitGroup
	for i := range nodes {
		nodes[i] = e.node(i, partitions)
		nodes[i].Env = append(nodes[i].Env, env...)
		wg.Add(1)
		go func() { defer wg.Done(); nodes[i].Start() }()
	}
	wg.Wait()
	return nodes
}

// brokersOf is the nodes' MQTT addresses.
func brokersOf(nodes []*servertest.Server) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.MQTT)
	}
	return out
}

// startDevices runs a device per id (device i connects to broker i mod
// len(brokers) first) until stop is closed; wg.Wait() waits for them.
func startDevices(ids, brokers []string, t0 int64, stop <-chan struct{}, wg *sync.WaitGroup) []*device {
	devs := make([]*device, len(ids))
	for i, id := range ids {
		devs[i] = &device{id: id, brokers: brokers, next: i, t0: t0}
		wg.Add(1)
		go func() { defer wg.Done(); devs[i].run(stop, 10000) }()
	}
	return devs
}

// awaitPreferred waits until node index of nodes owns every partition with
// devices that it prefers among nodes live nodes (preferredBy), and returns them: a node
// killed before that (on a slow start a survivor still stands in for them)
// would leave no hand-over to see.
func (e *clusterEnv) awaitPreferred(nd *servertest.Server, index, nodes, partitions int) map[int]bool {
	mine, pref := map[int]bool{}, preferredBy(partitions, index, liveNodes(nodes)...)
	for _, id := range e.ids {
		if p := cluster.PartitionOf(id, partitions); pref[p] {
			mine[p] = true
		}
	}
	eventually(e.t, 60*time.Second, func() error {
		owned := ownedBy(e.t, nd)
		for p := range mine {
			if !owned[p] {
				return fmt.Errorf("node %d owns %v, not yet all of %v", index, owned, mine)
			}
		}
		return nil
	})
	return mine
}

// handover returns the partitions preferred by node dead while all nodes lived
// that the other nodes took over within d after killedAt, and the longest
// time from killedAt to a survivor's first batch handled.
func handover(nodes []*servertest.Server, dead, partitions int, killedAt time.Time, d time.Duration) (map[int]bool, time.Duration) {
	var longest time.Duration
	taken, pref := map[int]bool{}, preferredBy(partitions, dead, liveNodes(len(nodes))...)
	for i, n := range nodes {
		if i == dead {
			continue
		}
		for _, l := range logTimes(n.Logs(), "partition taken over: first batches handled") {
			if l.at.After(killedAt) && l.at.Before(killedAt.Add(d)) && pref[l.partition] {
				taken[l.partition] = true
				longest = max(longest, l.at.Sub(killedAt))
			}
		}
	}
	return taken, longest
}

// awaitStored waits up to d until every acknowledged reading of devs is in
// the store, and returns the audit; if some are still missing it logs the
// diagnostics and fails the test.
func (e *clusterEnv) awaitStored(nodes []*servertest.Server, devs []*device, partitions int, d time.Duration) audit {
	var a audit
	start := time.Now()
	for deadline := start.Add(d); ; time.Sleep(time.Second) {
		if a = auditStore(devs, exportPressure(e.t, e.vm)); a.lost == 0 {
			e.t.Logf("every acknowledged reading in the store %v after the devices stopped", time.Since(start).Round(100*time.Millisecond))
			return a
		}
		if time.Now().After(deadline) {
			lossDiagnostics(e.t, e, nodes, devs, a, partitions)
			e.t.Fatalf("after %v, %d of %d acknowledged readings not in the store, e.g. %v", d, a.lost, a.acked, a.lostExamples)
		}
	}
}

// TestClusterLosesNothingAcknowledgedWhenANodeNeverReturns: 3 CityPulse
// nodes on a 3-node NATS cluster, QoS 1 devices over their brokers; one
// CityPulse node is SIGKILLed and never restarted: its disk is gone with
// it. The remote-write sink flushes every 2 s here, so the dead node's
// journal held up to 2 s of its partitions' readings that the store did not
// have yet. A partition's owner acknowledges a batch to JetStream only once
// the store has its readings (cluster.ack_after_sinks), so the survivors
// get those batches again and every acknowledged reading must be in
// VictoriaMetrics exactly once, at its time, with its value. (Acknowledged
// after the local journal, as before, this test loses them.)
func TestClusterLosesNothingAcknowledgedWhenANodeNeverReturns(t *testing.T) {
	skipShort(t)
	const (
		nDevices   = 24
		partitions = 12
		dead       = 1
	)
	e := startClusterEnv(t, nDevices)
	nodes := e.startNodes(3, partitions,
		"CITYPULSE_STORAGE_REMOTE_WRITE_BATCH_MAX_AGE=2s", // the store lags the journal by up to 2 s
		"CITYPULSE_CLUSTER_ACK_WAIT=6s",                   // at least 3 times that (validated)
		"CITYPULSE_CLUSTER_PINNED_TTL=7s")                 // above ack_wait (validated)
	t0 := time.Now().Truncate(time.Second).UnixMilli()
	stop := make(chan struct{})
	var pubs sync.WaitGroup
	devs := startDevices(e.ids, brokersOf(nodes), t0, stop, &pubs)
	time.Sleep(6 * time.Second)
	mine := e.awaitPreferred(nodes[dead], dead, len(nodes), partitions)
	time.Sleep(2 * time.Second) // its journal ahead of the store, whatever the start took
	killedAt := time.Now()
	nodes[dead].Kill()
	t.Logf("SIGKILLed CityPulse node %d at %s; it does not come back", dead, killedAt.Format(time.RFC3339Nano))
	time.Sleep(12 * time.Second)
	close(stop)
	pubs.Wait()
	publishing := time.Since(time.UnixMilli(t0))

	taken, took := handover(nodes, dead, partitions, killedAt, 15*time.Second)
	require.Equal(t, mine, taken, "each of node %d's partitions with devices is taken over by a survivor within 15 s", dead)
	a := e.awaitStored(nodes, devs, partitions, 45*time.Second)

	var lat []time.Duration
	resent := 0
	for _, d := range devs {
		lat = append(lat, d.lat...)
		resent += d.resent
	}
	live := []*servertest.Server{nodes[0], nodes[2]}
	redelivered := metricSum(t, live, "citypulse_cluster_redeliveries_total")
	extended := metricSum(t, live, "citypulse_cluster_ack_extensions_total")
	late := metricSum(t, live, "citypulse_cluster_readings_late_total")
	waits, waited := metricSum(t, live, "citypulse_cluster_store_wait_seconds_count"), metricSum(t, live, "citypulse_cluster_store_wait_seconds_sum")
	t.Logf("acknowledged %d readings of %d devices in %v (%.0f/s); stored %d; lost %d, duplicated %d, wrong value %d, stored but never acknowledged %d; load average %s",
		a.acked, nDevices, publishing.Round(time.Second), float64(a.acked)/publishing.Seconds(), a.stored, a.lost, a.duplicated, a.wrong, a.extra, loadAverage())
	t.Logf("hand-over after the SIGKILL: %v (all %d partitions of node %d by survivors); device PUBACK p50 %v p99 %v; readings sent again after no PUBACK: %d",
		took.Round(time.Millisecond), len(taken), dead, percentile(lat, 0.5), percentile(lat, 0.99), resent)
	t.Logf("survivors: batches redelivered %v; late readings (order not restorable) %v; store wait before the JetStream ack: mean %.2fs over %v handler calls; batches kept in progress %v",
		redelivered, late, waited/max(waits, 1), waits, extended)
	require.Zero(t, a.lost, "lost")
	require.Zero(t, a.duplicated, "duplicated in the store")
	require.Zero(t, a.wrong, "stored with another value")
	require.Positive(t, a.acked)
	require.Positive(t, redelivered, "the dead node's unacknowledged batches came to the survivors")
	for _, n := range live {
		n.Stop()
	}
}

// caughtUp waits (up to 2 minutes) until no partition's consumer has a
// batch not delivered or not acknowledged, and returns how long that took.
func caughtUp(t *testing.T, urls string, partitions int) time.Duration {
	t.Helper()
	nc, err := nats.Connect(urls)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	start := time.Now()
	eventually(t, 2*time.Minute, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for p := range partitions {
			c, err := js.Consumer(ctx, cluster.Default().Stream, fmt.Sprintf("citypulse-p%d", p))
			if err != nil {
				return err
			}
			if ci := c.CachedInfo(); ci.NumPending+uint64(ci.NumAckPending) > 0 {
				return fmt.Errorf("partition %d: %d batches not delivered, %d not acknowledged", p, ci.NumPending, ci.NumAckPending)
			}
		}
		return nil
	})
	return time.Since(start)
}

// liveNodes is 0, 1, …, n-1: the node numbers of n nodes all alive.
func liveNodes(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}
