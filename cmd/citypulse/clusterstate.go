package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/clusterstate"
	"github.com/citypulse/citypulse/rules"
)

// clusterState is the state side of cluster mode (docs/cluster.md, "State"):
// the alerts and pending notifications that move with a partition, the
// device changes shared through a KV bucket, and the city roll-ups combined
// by the lease holder.
type clusterState struct {
	parts    *clusterstate.Partitions // nil when rules are off
	registry *clusterstate.Registry
	silences *clusterstate.Silences
}

// sharedDevices is the device registry shared by the nodes (nil on one machine).
func (s *server) sharedDevices() *clusterstate.Registry {
	if s.cstate == nil {
		return nil
	}
	return s.cstate.registry
}

// clusterJournal returns the rules engine's journal in cluster mode (nil on
// one machine): the partitions' state logs in JetStream. buildRules calls it
// before the cluster node exists; buildClusterState completes it.
func (s *server) clusterJournal() rules.Journal {
	if !s.cfg.Cluster.Enabled {
		return nil
	}
	if s.cstate == nil {
		s.cstate = &clusterState{}
	}
	s.cstate.parts = clusterstate.NewPartitions(s.cfg.Cluster.Partitions, s.log.With("component", "cluster-state"))
	return s.cstate.parts
}

// buildClusterState wires the state side to the cluster node: restore on a
// gain before the first batch, checkpoint on a loss, the owned devices to the
// engine and the roll-ups, the transitions recorded before a batch is
// acknowledged, the device bucket, the silences' bucket, the roll-up lease. Its loops run with the
// gateways (stopped first); a release's checkpoint runs in the owner's stop.
func (s *server) buildClusterState() error {
	n := s.cluster
	if n == nil {
		return nil
	}
	cfg, log := s.cfg.Cluster, s.log.With("component", "cluster-state")
	if s.cstate == nil {
		s.cstate = &clusterState{}
	}
	owns := n.owns
	if ps := s.cstate.parts; ps != nil && s.engine != nil {
		store, err := cluster.NewStateStore(n.nc, cfg.State, ps.Snapshot, log, cluster.NewStateMetrics(s.reg))
		if err != nil {
			return err
		}
		var out clusterstate.Outbox
		if len(s.cfg.Rules.Notify.Receivers) > 0 {
			out = s.outbox // without receivers no notification is kept: none would be delivered
		}
		ps.Attach(s.engine, store, out)
		store.SetProgress(n.progress.Handled)
		n.owner.SetStart(n.startAfter(store))
		n.onOwned(ps.OnOwned) // after the feed's: restored before the first batch
		n.feed.SetBarrier(func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, cfg.AckWait/2)
			defer cancel()
			return s.engine.Flush(ctx)
		})
		owns = ps.Owns
		ensured := onceTrue(func(ctx context.Context) bool { return retry(ctx, log, "state bucket", store.Ensure) })
		n.prereq = ensured // the owner consumes once the bucket and the log exist
		s.gateways = append(s.gateways, n.whenActive(runFunc(func(ctx context.Context) error {
			if !ensured(ctx) {
				return nil
			}
			return store.Run(ctx)
		})))
		if err := s.buildClusterFleet(ps); err != nil {
			return err
		}
	}
	if sl := s.cstate.silences; sl != nil {
		// Not only when active: a standby reads its mirror of the bucket.
		var writable func() error
		if n.dr != nil {
			writable = n.dr.MayAcknowledge
		}
		s.gateways = append(s.gateways, runFunc(func(ctx context.Context) error { return sl.Run(ctx, n.nc, writable) }))
	}
	reg, err := clusterstate.NewRegistry(n.nc, s.devices, cfg.State.Devices, cfg.State.Replicas, log, s.reg)
	if err != nil {
		return err
	}
	s.cstate.registry = reg
	s.gateways = append(s.gateways, n.whenActive(runFunc(func(ctx context.Context) error {
		for retry(ctx, log, "device bucket", reg.Ensure) {
			if err := reg.Run(ctx); err != nil {
				log.Warn("device bucket watch ended; watching again", "err", err)
			}
		}
		return nil
	})))
	if s.vitals != nil {
		s.vitals.SetOwns(owns)
		node := cfg.NodeID
		lease, err := cluster.NewLease(n.nc, cfg.State.Leases, "vitals", node, cfg.State.LeaseTTL, cfg.State.Replicas, log)
		if err != nil {
			return err
		}
		r, err := clusterstate.NewRollups(n.nc, s.vitals, lease, node, s.cfg.Vitals.Interval, log)
		if err != nil {
			return err
		}
		live := liveSubmitter{pipe: s.pipe, events: s.events}
		s.gateways = append(s.gateways, n.whenActive(runFunc(func(ctx context.Context) error { return r.Run(ctx, live) })))
	}
	return nil
}

// buildClusterFleet judges the fleet rules on the whole city: every node
// publishes its partitions' counts, the holder of the "fleet" lease combines
// them and owns the fleet alerts (clusterstate.Fleet), every vitals.interval.
func (s *server) buildClusterFleet(ps *clusterstate.Partitions) error {
	n, cfg, log := s.cluster, s.cfg.Cluster, s.log.With("component", "cluster-fleet")
	node := cfg.NodeID
	lease, err := cluster.NewLease(n.nc, cfg.State.Leases, "fleet", node, cfg.State.LeaseTTL, cfg.State.Replicas, log)
	if err != nil {
		return err
	}
	f, err := clusterstate.NewFleet(n.nc, s.engine, ps, lease, node, s.cfg.Vitals.Interval, log, s.reg)
	if err != nil {
		return err
	}
	s.gateways = append(s.gateways, n.whenActive(runFunc(f.Run)))
	return nil
}

// startAfter is where a partition consumer that does not exist yet starts:
// after the position recorded with the partition's snapshot. At a promoted
// standby site (the consumers are not mirrored, the state is) that is the
// old active site's progress, bounded by what this site's stream held at the
// promotion; without it the owners would replay the stream from its start.
// A position beyond the stream's last sequence belongs to another history
// of the stream (re-created): then from the start. Where the standby's store
// follower ran, no later than its ack floor: the site's store holds every
// reading up to it and none after it for sure, and the position carried may
// be ahead of it (the store would lack the readings in between).
func (n *clusterNode) startAfter(store *cluster.StateStore) cluster.StartFunc {
	return func(ctx context.Context, p int) (uint64, error) {
		seq, err := store.Handled(ctx, p)
		if err != nil || seq == 0 {
			return 0, err
		}
		if n.dr != nil {
			d, ok, err := n.dr.Diverged(ctx, n.cfg.Stream)
			if err != nil {
				return 0, err
			}
			if ok {
				seq = min(seq, d)
			}
			floor, ok, err := cluster.FollowedFloor(ctx, n.clog.JetStream(), n.cfg.Stream)
			if err != nil {
				return 0, err
			}
			if ok && floor < seq {
				n.log.Info("partition consumer starts at the store follower's ack floor, before the position carried", "partition", p, "position", seq, "ack_floor", floor)
				seq = floor
			}
		}
		st, err := n.clog.JetStream().Stream(ctx, n.cfg.Stream)
		if err != nil {
			return 0, err
		}
		if last := st.CachedInfo().State.LastSeq; seq > last {
			n.log.Warn("partition position beyond the stream's end; consuming from its start", "partition", p, "position", seq, "last_seq", last)
			return 0, nil
		}
		return seq, nil
	}
}

// retry calls f until it succeeds (true) or ctx is done (false), with
// backoff: JetStream may be unavailable for a while at the start.
func retry(ctx context.Context, log *slog.Logger, what string, f func(context.Context) error) bool {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := f(cctx)
		cancel()
		if err == nil {
			return true
		}
		log.Warn("JetStream not available for the "+what+"; retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	return false
}

// onceTrue runs f until it returned true once; a caller meanwhile waits for
// the call under way (its callers share one lifetime: the server's Run).
func onceTrue(f func(ctx context.Context) bool) func(ctx context.Context) bool {
	var mu sync.Mutex
	done := false
	return func(ctx context.Context) bool {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			done = f(ctx)
		}
		return done
	}
}
