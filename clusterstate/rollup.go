package clusterstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
)

// PartialSubject prefixes the subjects of the roll-up partials:
// citypulse.vitals.partial.<node id>.
const PartialSubject = "citypulse.vitals.partial"

// maxNodes bounds the partials kept (one per node id heard of).
const maxNodes = 256

// Vitals is what the roll-ups need of *rules.Vitals.
type Vitals interface {
	Partial(now time.Time) rules.VitalsPartial
	Combine(parts []rules.VitalsPartial, now time.Time) []pipeline.Reading
}

// Rollups computes the city vital signs in cluster mode: every interval each
// node publishes the partial aggregates of the devices it owns, and the node
// holding the lease combines the latest partial of every node (its own
// included; one older than two intervals is left out: that node is gone, and
// its devices count again when their new owner reports them) and submits
// the roll-ups to its pipeline.
type Rollups struct {
	nc       *nats.Conn
	v        Vitals
	lease    *cluster.Lease
	node     string
	interval time.Duration
	log      *slog.Logger

	mu    sync.Mutex
	parts map[string]received // node id → its latest partial
}

// received is a partial and when it arrived (by this node's clock: the
// nodes' clocks need not agree).
type received struct {
	p  rules.VitalsPartial
	at time.Time
}

// NewRollups builds the roll-ups of node (its unique id) on nc; lease elects
// the combining node. It starts nothing.
func NewRollups(nc *nats.Conn, v Vitals, lease *cluster.Lease, node string, interval time.Duration, log *slog.Logger) (*Rollups, error) {
	if node == "" || strings.ContainsAny(node, ".*> ") {
		return nil, fmt.Errorf("roll-ups: node id %q must be a non-empty NATS subject token", node)
	}
	if interval <= 0 {
		return nil, fmt.Errorf("roll-ups: interval must be > 0, got %v", interval)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Rollups{nc: nc, v: v, lease: lease, node: node, interval: interval, log: log,
		parts: map[string]received{}}, nil
}

// Run campaigns for the lease and publishes and combines the partials every
// interval until ctx is done; the leader submits the roll-ups to sub.
func (r *Rollups) Run(ctx context.Context, sub rules.Submitter) error {
	if sub == nil {
		return errors.New("roll-ups: no submitter")
	}
	s, err := r.nc.Subscribe(PartialSubject+".*", r.receive)
	if err != nil {
		return fmt.Errorf("roll-ups: subscribe to partials: %w", err)
	}
	defer func() { _ = s.Unsubscribe() }()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return r.lease.Run(gctx) })
	g.Go(func() error {
		t := time.NewTicker(r.interval)
		defer t.Stop()
		for {
			select {
			case <-gctx.Done():
				return nil
			case now := <-t.C:
				r.round(gctx, now, sub)
			}
		}
	})
	return g.Wait()
}

// receive keeps another node's latest partial.
func (r *Rollups) receive(m *nats.Msg) {
	node := m.Subject[len(PartialSubject)+1:]
	if node == r.node {
		return
	}
	var p rules.VitalsPartial
	if err := json.Unmarshal(m.Data, &p); err != nil {
		r.log.Warn("roll-ups: unreadable partial; left out", "node", node, "err", err)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.parts[node]; !ok && len(r.parts) >= maxNodes {
		return
	}
	if p.At.After(r.parts[node].p.At) {
		r.parts[node] = received{p: p, at: time.Now()}
	}
}

// round publishes this node's partial and, on the leader, combines and
// submits the roll-ups.
func (r *Rollups) round(ctx context.Context, now time.Time, sub rules.Submitter) {
	own := r.v.Partial(now)
	if b, err := json.Marshal(own); err != nil {
		r.log.Error("roll-ups: cannot encode the partial", "err", err)
	} else if err := r.nc.Publish(PartialSubject+"."+r.node, b); err != nil {
		r.log.Warn("roll-ups: cannot publish the partial; the leader leaves this node's devices out", "err", err, "bytes", len(b))
	}
	if !r.lease.Leader() {
		return
	}
	for run := range pipeline.Runs(r.v.Combine(r.partials(own, now), now)) {
		if err := sub.Submit(ctx, run); err != nil && ctx.Err() == nil {
			r.log.Warn("vitals: roll-ups not journaled; the next interval recomputes them", "district", run[0].District, "err", err)
		}
	}
}

// partials is own and the other nodes' recent partials.
func (r *Rollups) partials(own rules.VitalsPartial, now time.Time) []rules.VitalsPartial {
	out := []rules.VitalsPartial{own}
	r.mu.Lock()
	defer r.mu.Unlock()
	for node, x := range r.parts {
		if now.Sub(x.at) > 2*r.interval {
			delete(r.parts, node)
			continue
		}
		out = append(out, x.p)
	}
	return out
}
