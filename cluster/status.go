package cluster

import (
	"context"
	"slices"
	"time"

	"golang.org/x/sync/errgroup"
)

// Owned returns the partitions pinned to this node now, in order.
func (o *Owner) Owned() []int {
	out := []int{}
	for p := range o.owned {
		if o.owned[p].Load() {
			out = append(out, p)
		}
	}
	return out
}

// Owns reports whether partition p is pinned to this node now.
func (o *Owner) Owns(p int) bool { return p >= 0 && p < len(o.owned) && o.owned[p].Load() }

// PartitionStatus is one partition as this node sees it.
type PartitionStatus struct {
	Partition int `json:"partition"`
	// Owner is the node that owns it as far as known (this node's own
	// state, the others' last heartbeats), -1 if none is known.
	Owner int `json:"owner"`
	// Pending is the batches in the stream not yet delivered to its
	// consumer, AckPending those delivered and not acknowledged (the
	// partition's lag); -1 when the consumer could not be asked.
	Pending    int64 `json:"pending"`
	AckPending int   `json:"ack_pending"`
}

// Status is what /api/v1/cluster shows.
type Status struct {
	Node  int   `json:"node"`
	Nodes int   `json:"nodes"`
	Alive []int `json:"alive"` // this node and the others heard of within cluster.alive_timeout
	// Owned are the partitions pinned to this node (known once a batch of
	// it arrived since the node gained it); Pulling those it pulls: owned,
	// or waiting for the pin (its preferred ones, and those of gone nodes).
	Owned      []int             `json:"owned"`
	Pulling    []int             `json:"pulling"`
	Partitions []PartitionStatus `json:"partitions"`
}

// Status returns the node's view of the cluster; the consumers' lag is asked
// of JetStream (a few at a time, each bounded by a second).
func (o *Owner) Status(ctx context.Context) Status {
	st := Status{Node: o.cfg.Index, Nodes: o.cfg.Nodes, Alive: []int{o.cfg.Index}, Owned: o.Owned(), Pulling: []int{}}
	for p := range o.pulling {
		if o.pulling[p].Load() {
			st.Pulling = append(st.Pulling, p)
		}
	}
	owner := make([]int, o.cfg.Partitions)
	for p := range owner {
		owner[p] = -1
	}
	for node, owns := range o.members.alive() {
		st.Alive = append(st.Alive, node)
		for _, p := range owns {
			owner[p] = node
		}
	}
	slices.Sort(st.Alive)
	for _, p := range st.Owned {
		owner[p] = o.cfg.Index
	}
	st.Partitions = make([]PartitionStatus, o.cfg.Partitions)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for p := range st.Partitions {
		st.Partitions[p] = PartitionStatus{Partition: p, Owner: owner[p], Pending: -1, AckPending: -1}
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(gctx, time.Second)
			defer cancel()
			info, err := o.js.Consumer(cctx, o.cfg.Stream, consumerName(p))
			if err == nil {
				ci := info.CachedInfo()
				st.Partitions[p].Pending, st.Partitions[p].AckPending = int64(ci.NumPending), ci.NumAckPending
			}
			return nil
		})
	}
	_ = g.Wait()
	return st
}
