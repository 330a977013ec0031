package clusterstate

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
)

// submissions records what each node submitted to its pipeline.
type submissions struct {
	mu  sync.Mutex
	got []submitted
}

type submitted struct {
	node string
	at   time.Time
	rs   []pipeline.Reading
}

func (s *submissions) to(node string) rules.Submitter { return submitter{s, node} }

type submitter struct {
	s    *submissions
	node string
}

func (sb submitter) Submit(_ context.Context, rs []pipeline.Reading) error {
	sb.s.mu.Lock()
	defer sb.s.mu.Unlock()
	sb.s.got = append(sb.s.got, submitted{sb.node, time.Now(), append([]pipeline.Reading(nil), rs...)})
	return nil
}

// since returns the submissions after t.
func (s *submissions) since(t time.Time) []submitted {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []submitted
	for _, x := range s.got {
		if x.at.After(t) {
			out = append(out, x)
		}
	}
	return out
}

type fleetList []devices.Device

func (f fleetList) List() []devices.Device { return f }

// cityFleet is 60 pipes and 30 power meters in three districts, and their
// readings (whole numbers: sums are exact in any order).
func cityFleet() (fleetList, []pipeline.Reading) {
	var list fleetList
	var rs []pipeline.Reading
	now := time.Now().UnixNano()
	districts := []string{"gulou", "xuanwu", "qinhuai"}
	for i := range 90 {
		kind, metrics := devices.KindPipe, map[string]float64{"pressure": float64(300 + i), "flow": float64(i % 17)}
		if i >= 60 {
			kind, metrics = devices.KindPower, map[string]float64{"active_power": float64(1000 + 7*i), "voltage": float64(220 + i%11)}
		}
		d := devices.Device{ID: fmt.Sprintf("%s-%04d", kind, i), Kind: kind, District: districts[i%3], Interval: time.Hour, Secret: "secret-0000"}
		list = append(list, d)
		for m, v := range metrics {
			rs = append(rs, pipeline.Reading{Device: d.ID, Kind: string(kind), District: d.District, Metric: m, Value: v, Time: now, Received: now})
		}
	}
	return list, rs
}

func renderCity(rs []pipeline.Reading) string {
	var lines []string
	for _, r := range rs {
		lines = append(lines, fmt.Sprintf("%s{%s} %g", r.Metric, r.District, r.Value))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// Three nodes each own a third of the devices (by partition); one holds the
// lease and submits roll-ups equal to one machine's over every device. When
// the leader's NATS connection is cut, another node leads within a bounded
// time, and submits the combination of the partials still reported.
func TestCityRollupsFromPartialsWithFailover(t *testing.T) {
	c := natstest.Start(t, 3)
	defs, err := rules.LoadRollups("../configs/vitals.yaml")
	require.NoError(t, err)
	list, readings := cityFleet()
	whole := rules.NewVitals(rules.DefaultVitals(), defs, list, 1, nil, nil)
	whole.Observe(0, readings)
	oneMachine := renderCity(whole.Compute(time.Now()))

	subs := &submissions{}
	const ttl, interval = 2 * time.Second, 200 * time.Millisecond
	conns := make([]*nats.Conn, 3)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); wg.Wait() }()
	owned := func(i int) func(string) bool {
		return func(d string) bool { return cluster.PartitionOf(d, partitions)%3 == i }
	}
	for i := range 3 {
		conns[i] = connect(t, c.Nodes[i].URL())
		v := rules.NewVitals(rules.DefaultVitals(), defs, list, 1, nil, nil)
		v.SetOwns(owned(i))
		var mine []pipeline.Reading
		for _, r := range readings {
			if owned(i)(r.Device) {
				mine = append(mine, r)
			}
		}
		v.Observe(0, mine)
		node := fmt.Sprintf("node%d", i)
		lease, err := cluster.NewLease(conns[i], "CITYPULSE_LEASES", "vitals", node, ttl, 3, nil)
		require.NoError(t, err)
		r, err := NewRollups(conns[i], v, lease, node, interval, nil)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Run(ctx, subs.to(node)); err != nil {
				t.Error(err)
			}
		}()
	}

	// One leader, whose city values are one machine's.
	var leader string
	waitFor(t, "a leader's full roll-ups", func() bool {
		got := subs.since(time.Time{})
		if len(got) == 0 {
			return false
		}
		leader = got[len(got)-1].node
		return renderCity(latestRound(got, leader)) == oneMachine
	})
	mark := time.Now()
	time.Sleep(3 * interval)
	for _, s := range subs.since(mark) {
		require.Equal(t, leader, s.node, "only the leader submits")
	}

	// Cut the leader off: another node leads within TTL and a few intervals.
	var li int
	fmt.Sscanf(leader, "node%d", &li)
	cut := time.Now()
	conns[li].Close()
	var next string
	var took time.Duration
	waitFor(t, "another leader", func() bool {
		for _, s := range subs.since(cut) {
			if s.node != leader {
				next, took = s.node, s.at.Sub(cut)
				return true
			}
		}
		return false
	})
	t.Logf("leader %s cut off; %s submitted roll-ups %v later", leader, next, took)
	require.Less(t, took, ttl+ttl/3+10*interval+5*time.Second) // generous: a loaded machine

	// The new leader's city values combine the two partials still reported.
	var survivors []pipeline.Reading
	for _, r := range readings {
		if !owned(li)(r.Device) {
			survivors = append(survivors, r)
		}
	}
	rest := rules.NewVitals(rules.DefaultVitals(), defs, list, 1, nil, nil)
	rest.SetOwns(func(d string) bool { return !owned(li)(d) })
	rest.Observe(0, survivors)
	want := renderCity(rest.Compute(time.Now()))
	waitFor(t, "the survivors' roll-ups", func() bool {
		return renderCity(latestRound(subs.since(cut), next)) == want
	})
}

// latestRound is the readings of node's last round (submitted one district
// at a time, all at one time).
func latestRound(got []submitted, node string) []pipeline.Reading {
	var last int64
	for _, s := range got {
		if s.node == node && len(s.rs) > 0 {
			last = max(last, s.rs[0].Time)
		}
	}
	var out []pipeline.Reading
	for _, s := range got {
		if s.node == node && len(s.rs) > 0 && s.rs[0].Time == last {
			out = append(out, s.rs...)
		}
	}
	return out
}
