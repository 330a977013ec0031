package clusterstate

import (
	"context"
	"errors"
	"log/slog"
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
	x     *exchange[rules.VitalsPartial]
	v     Vitals
	lease *cluster.Lease
	log   *slog.Logger
}

// NewRollups builds the roll-ups of node (its unique id) on nc; lease elects
// the combining node. It starts nothing.
func NewRollups(nc *nats.Conn, v Vitals, lease *cluster.Lease, node string, interval time.Duration, log *slog.Logger) (*Rollups, error) {
	x, err := newExchange(nc, PartialSubject, node, interval, "roll-ups",
		func(p rules.VitalsPartial) time.Time { return p.At }, log)
	if err != nil {
		return nil, err
	}
	return &Rollups{x: x, v: v, lease: lease, log: x.log}, nil
}

// Run campaigns for the lease and publishes and combines the partials every
// interval until ctx is done; the leader submits the roll-ups to sub.
func (r *Rollups) Run(ctx context.Context, sub rules.Submitter) error {
	if sub == nil {
		return errors.New("roll-ups: no submitter")
	}
	s, err := r.x.subscribe()
	if err != nil {
		return err
	}
	defer func() { _ = s.Unsubscribe() }()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return r.lease.Run(gctx) })
	g.Go(func() error {
		t := time.NewTicker(r.x.interval)
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

// round publishes this node's partial and, on the leader, combines and
// submits the roll-ups.
func (r *Rollups) round(ctx context.Context, now time.Time, sub rules.Submitter) {
	own := r.v.Partial(now)
	r.x.publish(own, "the leader leaves this node's devices out")
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
	for _, h := range r.x.heardSince(now) {
		out = append(out, h.p)
	}
	return out
}
