package clusterstate

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
)

// fleetEvents records the fleet notifications of every node.
type fleetEvents struct {
	mu  sync.Mutex
	got []string // "<node> <kind>"
}

func (f *fleetEvents) to(node string) rules.Notifier { return fleetNotifier{f, node} }

func (f *fleetEvents) list() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.got...)
}

type fleetNotifier struct {
	f    *fleetEvents
	node string
}

func (n fleetNotifier) Enqueue(ev notifier.Event) {
	n.f.mu.Lock()
	n.f.got = append(n.f.got, n.node+" "+ev.Kind)
	n.f.mu.Unlock()
}

// fleetNode is one node of TestFleetRulesJudgedOnEveryNodesCounts.
type fleetNode struct {
	eng *rules.Engine
	ps  *Partitions
}

// Three nodes each own a third of the partitions of 24 pipes of one
// district. Node 0's pipes report, the others' are silent: 2/3 of the
// district, above silent_ratio 0.5, which no node sees alone. Only the
// lease holder fires, once. Its connection is cut and its partitions move to
// a survivor: the next holder restores the firing alert, judges it again on
// every partition's counts without firing again, and resolves it once when
// the pipes report.
func TestFleetRulesJudgedOnEveryNodesCounts(t *testing.T) {
	c := natstest.Start(t, 3)
	rs, err := rules.ParseRules([]byte("rules:\n- {name: pipes_out, type: fleet, select: {kind: pipe}, silent_ratio: 0.5, factor: 1}\n"), "test")
	require.NoError(t, err)
	var list fixedList
	for i := range 24 {
		list = append(list, devices.Device{ID: fmt.Sprintf("pipe-%03d", i), Kind: devices.KindPipe, District: "gulou", Interval: 300 * time.Millisecond})
	}
	third := func(d string) int { return cluster.PartitionOf(d, partitions) % 3 }
	var mu sync.Mutex
	talking := map[string]bool{}
	for _, d := range list {
		talking[d.ID] = third(d.ID) == 0
	}
	events := &fleetEvents{}
	const ttl, interval = 2 * time.Second, 200 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	nodes := make([]fleetNode, 3)
	conns := make([]interface{ Close() }, 3)
	for i := range nodes {
		nc := connect(t, c.Nodes[i].URL())
		conns[i] = nc
		name := fmt.Sprintf("node%d", i)
		ps := NewPartitions(partitions, nil)
		eng := rules.NewEngine(rules.Default(), rs, rules.EngineOptions{Shards: 2, Devices: list, Notifier: events.to(name), Journal: ps})
		store, err := cluster.NewStateStore(nc, cluster.DefaultState(), ps.Snapshot, nil, nil)
		require.NoError(t, err)
		ps.Attach(eng, store, nil)
		lease, err := cluster.NewLease(nc, "CITYPULSE_LEASES", "fleet", name, ttl, 3, nil)
		require.NoError(t, err)
		f, err := NewFleet(nc, eng, ps, lease, name, interval, nil, nil)
		require.NoError(t, err)
		nodes[i] = fleetNode{eng, ps}
		for p := range partitions {
			if p%3 == i {
				ps.OnOwned(p, true)
			}
		}
		nctx, stop := context.WithCancel(ctx)
		wg.Add(3)
		go func() { defer wg.Done(); _ = eng.Run(nctx) }()
		go func() { defer wg.Done(); _ = f.Run(nctx) }()
		go func() { // the pipes this node owns report while they talk
			defer wg.Done()
			defer stop()
			for nctx.Err() == nil {
				for _, d := range list {
					mu.Lock()
					ok := talking[d.ID] && ps.Owns(d.ID)
					mu.Unlock()
					if ok {
						now := time.Now().UnixNano()
						eng.Observe(pipeline.ShardOf(d.ID, 2), []pipeline.Reading{{Device: d.ID, Kind: "pipe", District: "gulou",
							Metric: "pressure", Value: 400, Time: now, Received: now}})
					}
				}
				select {
				case <-nctx.Done():
				case <-time.After(50 * time.Millisecond):
				}
			}
		}()
	}

	waitFor(t, "the fleet alert firing", func() bool { return len(events.list()) > 0 })
	time.Sleep(5 * interval) // a second firing would come by now
	got := events.list()
	require.Len(t, got, 1, "one firing: %v", got)
	var leader int
	_, err = fmt.Sscanf(got[0], "node%d firing", &leader)
	require.NoError(t, err, got[0])

	// The leader is cut off; a survivor takes its partitions.
	conns[leader].Close()
	next := (leader + 1) % 3
	for p := range partitions {
		if p%3 == leader {
			nodes[next].ps.OnOwned(p, true)
		}
	}
	waitFor(t, "another node restoring the fleet alerts", func() bool {
		for i, n := range nodes {
			if i != leader && n.ps.Owns(rules.FleetOwner) {
				return true
			}
		}
		return false
	})
	time.Sleep(5 * interval) // judged again meanwhile, every partition counted
	require.Len(t, events.list(), 1, "no second firing: %v", events.list())

	mu.Lock()
	for d := range talking {
		talking[d] = true
	}
	mu.Unlock()
	waitFor(t, "the fleet alert resolved", func() bool { return len(events.list()) > 1 })
	time.Sleep(5 * interval)
	got = events.list()
	require.Len(t, got, 2, "%v", got)
	require.Contains(t, got[1], " resolved")
	require.NotContains(t, got[1], fmt.Sprintf("node%d", leader), "resolved by the next holder")
}

type fixedList []devices.Device

func (f fixedList) List() []devices.Device { return f }

// The leader completes the counts with the partitions nobody reported: one
// reported lately is in hand-over (the round holds), one not reported for
// longer than the hand-over bound has no owner and the leader counts its
// devices itself, silent once their window has passed since its last report.
func TestFleetCountsThePartitionsNobodyReports(t *testing.T) {
	rs, err := rules.ParseRules([]byte("rules:\n- {name: pipes_out, type: fleet, select: {kind: pipe}, silent_ratio: 0.5, factor: 1}\n"), "test")
	require.NoError(t, err)
	var list fixedList
	for i := range 24 {
		list = append(list, devices.Device{ID: fmt.Sprintf("pipe-%03d", i), Kind: devices.KindPipe, District: "gulou", Interval: time.Minute})
	}
	const missing = 3
	inMissing := 0
	for _, d := range list {
		if cluster.PartitionOf(d.ID, partitions) == missing {
			inMissing++
		}
	}
	require.NotZero(t, inMissing)
	now := time.Now()
	for _, tc := range []struct {
		name   string
		seen   time.Duration // before now; 0: never
		ok     bool
		counts rules.FleetCounts
	}{
		{"reported 5 s ago: in hand-over, the round holds", 5 * time.Second, false, rules.FleetCounts{}},
		{"reported 40 s ago: no owner, not silent for a minute yet", 40 * time.Second, true,
			rules.FleetCounts{"pipes_out": {"gulou": {Devices: inMissing}}}},
		{"reported an hour ago: no owner, its devices silent", time.Hour, true,
			rules.FleetCounts{"pipes_out": {"gulou": {Devices: inMissing, Silent: inMissing}}}},
		{"never reported: silent since the start", 0, true,
			rules.FleetCounts{"pipes_out": {"gulou": {Devices: inMissing, Silent: inMissing}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			eng := rules.NewEngine(rules.Default(), rs, rules.EngineOptions{Shards: 2, Devices: list})
			f := &Fleet{eng: eng, ps: NewPartitions(partitions, nil), seen: map[int]time.Time{}, handOver: 10 * time.Second}
			counted := map[int]bool{}
			for p := range partitions {
				counted[p] = p != missing
			}
			if tc.seen > 0 {
				f.seen[missing] = now.Add(-tc.seen)
			}
			counts := rules.FleetCounts{}
			require.Equal(t, tc.ok, f.complete(counts, counted, now))
			require.Equal(t, tc.counts, counts)
		})
	}
}
