package clusterstate

import (
	"context"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/rules"
)

// FleetSubject prefixes the subjects of the fleet counts:
// citypulse.fleet.partial.<node id>.
const FleetSubject = "citypulse.fleet.partial"

// FleetEngine is what the fleet rules need of the rules engine (*rules.Engine).
type FleetEngine interface {
	FleetCounts(now time.Time, part func(device string) int) map[int]rules.FleetCounts
	FleetCountsSince(now time.Time, sel func(device string) bool, since time.Time) rules.FleetCounts
	JudgeFleet(c rules.FleetCounts, now time.Time)
}

// Fleet judges the fleet rules on the whole city in cluster mode. Every
// interval each node publishes, per partition it owns, how many devices of
// each district every fleet rule selects and how many of them are silent
// (counts, not devices: a message is bounded by partitions × districts ×
// fleet rules). The node holding the fleet lease restores the fleet alerts'
// state (cluster.FleetState) when it takes the lease, combines the latest
// counts of every partition (a partition in hand-over is counted once, from
// the later report; a node not heard from for two intervals is left out),
// counts itself the partitions nobody owns (no reading came for them) and
// judges the rules. While a partition is between a dead owner and the next
// one the fleet alerts keep their state: a sample of a district would judge
// it wrongly. A node losing the lease checkpoints and forgets that state.
type Fleet struct {
	x     *exchange[rules.FleetPartial]
	eng   FleetEngine
	ps    *Partitions
	lease *cluster.Lease
	log   *slog.Logger
	m     fleetMetrics

	// Run's goroutine only:
	leading  bool              // the fleet alerts' state is restored here
	whole    bool              // the last round counted every partition
	seen     map[int]time.Time // partition → when a report of it was last combined here
	handOver time.Duration     // a partition not reported for longer has no owner
}

// handOverGrace is how long after two intervals without a report a
// partition is taken to have no owner (a partition with readings moves to a
// new owner within seconds: docs/cluster.md).
const handOverGrace = 30 * time.Second

type fleetMetrics struct {
	counted prometheus.Gauge
	rounds  *prometheus.CounterVec
}

// NewFleet builds the fleet rules' judge of node (its unique id) on nc: eng
// counts and judges, ps keeps the fleet alerts' state (cluster.FleetState)
// and knows the partitions owned, lease elects the judging node. It starts
// nothing; reg (nil: none) registers its metrics.
func NewFleet(nc *nats.Conn, eng FleetEngine, ps *Partitions, lease *cluster.Lease, node string, interval time.Duration,
	log *slog.Logger, reg prometheus.Registerer) (*Fleet, error) {
	x, err := newExchange(nc, FleetSubject, node, interval, "fleet rules",
		func(p rules.FleetPartial) time.Time { return p.At }, log)
	if err != nil {
		return nil, err
	}
	m := fleetMetrics{
		counted: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_cluster_fleet_partitions_counted",
			Help: "Partitions whose fleet counts the fleet lease holder last received from their owners (the others it counts itself, or waits for)."}),
		rounds: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_cluster_fleet_rounds_total",
			Help: "Fleet-rule rounds of the lease holder, by result (judged, incomplete: a partition in hand-over, the alerts held)."},
			[]string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.counted, m.rounds)
	}
	return &Fleet{x: x, eng: eng, ps: ps, lease: lease, log: x.log, m: m,
		seen: map[int]time.Time{}, handOver: 2*interval + handOverGrace}, nil
}

// Run campaigns for the lease, publishes this node's counts and, on the
// leader, judges the fleet rules every interval until ctx is done; then a
// leader checkpoints the fleet alerts' state before it gives the lease up.
func (f *Fleet) Run(ctx context.Context) error {
	s, err := f.x.subscribe()
	if err != nil {
		return err
	}
	defer func() { _ = s.Unsubscribe() }()
	// The lease outlives the loop: it is given up after the state is released.
	lctx, stopLease := context.WithCancel(context.WithoutCancel(ctx))
	g := new(errgroup.Group)
	g.Go(func() error { return f.lease.Run(lctx) })
	g.Go(func() error {
		defer stopLease()
		t := time.NewTicker(f.x.interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				f.lead(false)
				return nil
			case now := <-t.C:
				f.round(ctx, now)
			}
		}
	})
	return g.Wait()
}

// round publishes this node's counts and, on the leader, judges.
func (f *Fleet) round(ctx context.Context, now time.Time) {
	own := f.counts(now)
	f.x.publish(own, "the leader holds the fleet alerts until it has this node's counts")
	counts, counted := rules.CombineFleet(f.partials(own, now))
	for p := range counted {
		f.seen[p] = now // on every node: a next leader knows who reported lately
	}
	f.lead(f.lease.Leader() && ctx.Err() == nil)
	if !f.leading {
		return
	}
	f.m.counted.Set(float64(len(counted)))
	ok := f.complete(counts, counted, now)
	if !ok {
		f.m.rounds.WithLabelValues("incomplete").Inc()
		if f.whole {
			f.log.Warn("fleet rules: a partition is being handed over (not reported for two intervals); the fleet alerts hold their state until its new owner reports it")
		}
		f.whole = false
		return
	}
	f.whole = true
	f.m.rounds.WithLabelValues("judged").Inc()
	f.eng.JudgeFleet(counts, now)
}

// complete adds to counts the partitions not counted: a partition not
// reported for longer than handOver has no owner, because no reading came
// for it (one would have given it an owner within seconds), and this node
// counts its devices itself (FleetCountsSince its last report). It returns
// false while a partition is in between: its old owner is gone and the new
// one has not reported it yet.
func (f *Fleet) complete(counts rules.FleetCounts, counted map[int]bool, now time.Time) bool {
	ok := true
	for p := range f.ps.n {
		if counted[p] {
			continue
		}
		last, reported := f.seen[p]
		if reported && now.Sub(last) <= f.handOver {
			ok = false
			continue
		}
		counts.Merge(f.eng.FleetCountsSince(now, f.ps.in(p), last))
	}
	return ok
}

// counts is this node's counts at now: every partition it owns, with the
// counts of its devices.
func (f *Fleet) counts(now time.Time) rules.FleetPartial {
	parts := f.eng.FleetCounts(now, f.ps.partitionOf)
	for _, p := range f.ps.ownedPartitions() {
		if parts[p] == nil {
			parts[p] = rules.FleetCounts{}
		}
	}
	return rules.FleetPartial{At: now, Parts: parts}
}

// lead restores the fleet alerts' state when this node takes the lease, and
// checkpoints and forgets it when it loses it.
func (f *Fleet) lead(leader bool) {
	if leader == f.leading {
		return
	}
	f.ps.OnOwned(cluster.FleetState, leader)
	f.leading, f.whole = leader, true
}

// partials is own and the other nodes' recent counts, each with At set to
// when it arrived here (CombineFleet compares the At of different nodes).
func (f *Fleet) partials(own rules.FleetPartial, now time.Time) []rules.FleetPartial {
	out := []rules.FleetPartial{own}
	for _, h := range f.x.heardSince(now) {
		h.p.At = h.at
		out = append(out, h.p)
	}
	return out
}
