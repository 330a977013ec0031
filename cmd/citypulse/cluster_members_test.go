package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// clusterView reads a node's /api/v1/cluster (an error if it does not answer).
func clusterView(nd *servertest.Server) (clusterStatus, error) {
	resp, err := http.Get("http://" + nd.HTTP + "/api/v1/cluster")
	if err != nil {
		return clusterStatus{}, err
	}
	defer resp.Body.Close()
	var st struct {
		Data clusterStatus `json:"data"`
	}
	err = json.NewDecoder(resp.Body).Decode(&st)
	return st.Data, err
}

// spreadAsPreferred checks that the running nodes (index → server) own
// exactly the partitions with devices that rendezvous hashing prefers them
// for among themselves, and see each other; it returns how many each owns.
func spreadAsPreferred(nodes map[int]*servertest.Server, partitions int, used map[int]bool) (map[string]int, error) {
	live := slices.Sorted(maps.Keys(nodes))
	var ids []string
	for _, i := range live {
		ids = append(ids, nodeID(i))
	}
	owns := map[string]int{}
	for _, i := range live {
		st, err := clusterView(nodes[i])
		if err != nil {
			return nil, err
		}
		if !slices.Equal(st.Alive, ids) {
			return nil, fmt.Errorf("%s sees %v alive, not %v", nodeID(i), st.Alive, ids)
		}
		want := preferredBy(partitions, i, live...)
		maps.DeleteFunc(want, func(p int, _ bool) bool { return !used[p] })
		got := map[int]bool{}
		for _, p := range st.Owned {
			got[p] = true
		}
		if !maps.Equal(want, got) {
			return nil, fmt.Errorf("%s owns %v, prefers %v (of the partitions with devices)", nodeID(i), st.Owned, slices.Sorted(maps.Keys(want)))
		}
		owns[nodeID(i)] = len(st.Owned)
	}
	return owns, nil
}

// waitSpread waits up to d until spreadAsPreferred holds, logging each
// new reason it does not yet (the steps of a rebalance, timed); it returns
// how many each node owns.
func waitSpread(t *testing.T, d time.Duration, nodes map[int]*servertest.Server, partitions int, used map[int]bool) map[string]int {
	t.Helper()
	start := time.Now()
	last := ""
	for {
		owns, err := spreadAsPreferred(nodes, partitions, used)
		if err == nil {
			return owns
		}
		if err.Error() != last {
			last = err.Error()
			t.Logf("  +%v: %s", time.Since(start).Round(100*time.Millisecond), last)
		}
		if time.Since(start) > d {
			t.Fatalf("the partitions did not spread as preferred within %v: %v", d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClusterRebalancesWhenANodeJoinsAndWhenOneLeaves: 2 CityPulse nodes
// under QoS 1 load; a 3rd starts, the others are not restarted: within a
// bounded time each node owns the third of the partitions rendezvous
// hashing prefers it for. Then node 0 stops cleanly, and its partitions
// move to the other two. Every acknowledged reading is in the shared store
// exactly once. The rebalance times are measured from /api/v1/cluster.
func TestClusterRebalancesWhenANodeJoinsAndWhenOneLeaves(t *testing.T) {
	skipUnlessCluster(t)
	const (
		nDevices   = 48
		partitions = 12
		bound      = 60 * time.Second // the rebalance must end within this (it takes seconds)
	)
	e := startClusterEnv(t, nDevices)
	used := map[int]bool{}
	for _, id := range e.ids {
		used[cluster.PartitionOf(id, partitions)] = true
	}
	nodes := []*servertest.Server{e.node(0, partitions), e.node(1, partitions), e.node(2, partitions)}
	running := map[int]*servertest.Server{0: nodes[0], 1: nodes[1]}
	var wg sync.WaitGroup
	for _, n := range running {
		wg.Add(1)
		go func() { defer wg.Done(); n.Start() }()
	}
	wg.Wait()

	// The devices talk to nodes 1 and 2 (node 2's broker refuses until it
	// starts; a device then tries the next): node 0's stop costs them nothing.
	brokers := []string{nodes[1].MQTT, nodes[2].MQTT}
	t0 := time.Now().Truncate(time.Second).UnixMilli()
	stop := make(chan struct{})
	devs := make([]*device, nDevices)
	var pubs sync.WaitGroup
	for i, id := range e.ids {
		devs[i] = &device{id: id, brokers: brokers, next: i, t0: t0}
		pubs.Add(1)
		go func() { defer pubs.Done(); devs[i].run(stop, 10000) }()
	}
	owns := waitSpread(t, bound, running, partitions, used)
	t.Logf("2 nodes: own %v of the %d partitions with devices (P = %d)", owns, len(used), partitions)

	joinAt := time.Now()
	nodes[2].Start() // the others keep running
	ready := time.Since(joinAt)
	running[2] = nodes[2]
	owns = waitSpread(t, bound, running, partitions, used)
	joined := time.Since(joinAt)
	for id, n := range owns {
		require.InDelta(t, float64(len(used))/3, n, 2, "%s owns about a third", id)
	}
	t.Logf("node %s joined: the partitions spread as %v %v after its start (%v of it to /readyz); load average %s",
		nodeID(2), owns, joined.Round(time.Millisecond), ready.Round(time.Millisecond), loadAverage())

	leaveAt := time.Now()
	nodes[0].Stop()
	delete(running, 0)
	owns = waitSpread(t, bound, running, partitions, used)
	left := time.Since(leaveAt)
	t.Logf("node %s stopped cleanly: the partitions spread as %v %v after its SIGTERM; load average %s",
		nodeID(0), owns, left.Round(time.Millisecond), loadAverage())

	time.Sleep(2 * time.Second) // readings flow on after the hand-overs
	close(stop)
	pubs.Wait()
	var a audit
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		if a = auditStore(devs, exportPressure(t, e.vm)); a.lost == 0 {
			break
		}
		if time.Now().After(deadline) {
			lossDiagnostics(t, e, nodes, devs, a, partitions)
			t.Fatalf("after 90 s, %d of %d acknowledged readings not in the store, e.g. %v", a.lost, a.acked, a.lostExamples)
		}
	}
	resent := 0
	for _, d := range devs {
		resent += d.resent
	}
	t.Logf("acknowledged %d readings of %d devices; stored %d; lost %d, duplicated %d, wrong value %d, stored but never acknowledged %d; sent again after no PUBACK: %d",
		a.acked, nDevices, a.stored, a.lost, a.duplicated, a.wrong, a.extra, resent)
	require.Zero(t, a.lost, "lost")
	require.Zero(t, a.duplicated, "duplicated in the store")
	require.Zero(t, a.wrong, "stored with another value")
	require.Positive(t, a.acked)
	for _, n := range running {
		n.Stop()
	}
}
