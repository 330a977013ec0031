package clusterstate

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
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
	JudgeFleet(c rules.FleetCounts, now time.Time)
}

// Fleet judges the fleet rules on the whole city in cluster mode. Every
// interval each node publishes, per partition it owns, how many devices of
// each district every fleet rule selects and how many of them are silent
// (counts, not devices: a message is bounded by partitions × districts ×
// fleet rules). The node holding the fleet lease restores the fleet alerts'
// state (cluster.FleetState) when it takes the lease, combines the latest
// counts of every partition (a partition in hand-over is counted once, from
// the later report; a node not heard from for two intervals is left out) and
// judges the rules when every partition is counted. Until then (a dead
// node's partitions not yet reported by their new owner) the fleet alerts
// keep their state: a sample of a district would judge it wrongly. A node
// losing the lease checkpoints and forgets that state.
type Fleet struct {
	nc       *nats.Conn
	eng      FleetEngine
	ps       *Partitions
	lease    *cluster.Lease
	node     string
	interval time.Duration
	log      *slog.Logger
	m        fleetMetrics

	mu    sync.Mutex
	parts map[string]rules.FleetPartial // node id → its latest counts, At = when they arrived

	leading  bool // the fleet alerts' state is restored here (Run's goroutine only)
	complete bool // the last combination counted every partition (idem)
}

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
	if node == "" || strings.ContainsAny(node, ".*> ") {
		return nil, fmt.Errorf("fleet rules: node id %q must be a non-empty NATS subject token", node)
	}
	if interval <= 0 {
		return nil, fmt.Errorf("fleet rules: interval must be > 0, got %v", interval)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := fleetMetrics{
		counted: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_cluster_fleet_partitions_counted",
			Help: "Partitions whose fleet counts the fleet lease holder combined last (all of them: the fleet rules are judged)."}),
		rounds: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_cluster_fleet_rounds_total",
			Help: "Fleet-rule rounds of the lease holder, by result (judged, incomplete: a partition not counted, the alerts held)."},
			[]string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.counted, m.rounds)
	}
	return &Fleet{nc: nc, eng: eng, ps: ps, lease: lease, node: node, interval: interval, log: log, m: m,
		parts: map[string]rules.FleetPartial{}}, nil
}

// Run campaigns for the lease, publishes this node's counts and, on the
// leader, judges the fleet rules every interval until ctx is done; then a
// leader checkpoints the fleet alerts' state before it gives the lease up.
func (f *Fleet) Run(ctx context.Context) error {
	s, err := f.nc.Subscribe(FleetSubject+".*", f.receive)
	if err != nil {
		return fmt.Errorf("fleet rules: subscribe to the counts: %w", err)
	}
	defer func() { _ = s.Unsubscribe() }()
	// The lease outlives the loop: it is given up after the state is released.
	lctx, stopLease := context.WithCancel(context.WithoutCancel(ctx))
	g := new(errgroup.Group)
	g.Go(func() error { return f.lease.Run(lctx) })
	g.Go(func() error {
		defer stopLease()
		t := time.NewTicker(f.interval)
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

// receive keeps another node's latest counts.
func (f *Fleet) receive(m *nats.Msg) {
	node := m.Subject[len(FleetSubject)+1:]
	if node == f.node {
		return
	}
	var p rules.FleetPartial
	if err := json.Unmarshal(m.Data, &p); err != nil {
		f.log.Warn("fleet rules: unreadable counts; left out", "node", node, "err", err)
		return
	}
	p.At = time.Now() // by this node's clock: the nodes' clocks need not agree
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.parts[node]; ok || len(f.parts) < maxNodes {
		f.parts[node] = p
	}
}

// round publishes this node's counts and, on the leader, judges.
func (f *Fleet) round(ctx context.Context, now time.Time) {
	own := f.counts(now)
	if b, err := json.Marshal(own); err != nil {
		f.log.Error("fleet rules: cannot encode the counts", "err", err)
	} else if err := f.nc.Publish(FleetSubject+"."+f.node, b); err != nil {
		f.log.Warn("fleet rules: cannot publish the counts; the leader holds the fleet alerts until it has them", "err", err, "bytes", len(b))
	}
	f.lead(f.lease.Leader() && ctx.Err() == nil)
	if !f.leading {
		return
	}
	counts, n := rules.CombineFleet(f.partials(own, now))
	f.m.counted.Set(float64(n))
	if n < f.ps.n {
		f.m.rounds.WithLabelValues("incomplete").Inc()
		if f.complete {
			f.log.Warn("fleet rules: not every partition is counted (a node is gone and its partitions not yet taken over); the fleet alerts hold their state",
				"partitions_counted", n, "partitions", f.ps.n)
		}
		f.complete = false
		return
	}
	f.complete = true
	f.m.rounds.WithLabelValues("judged").Inc()
	f.eng.JudgeFleet(counts, now)
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
	f.leading, f.complete = leader, true
}

// partials is own and the other nodes' recent counts.
func (f *Fleet) partials(own rules.FleetPartial, now time.Time) []rules.FleetPartial {
	out := []rules.FleetPartial{own}
	f.mu.Lock()
	defer f.mu.Unlock()
	for node, p := range f.parts {
		if now.Sub(p.At) > 2*f.interval {
			delete(f.parts, node)
			continue
		}
		out = append(out, p)
	}
	return out
}
