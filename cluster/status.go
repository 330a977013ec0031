package cluster

import (
	"context"
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

// Pulling returns the partitions this node pulls now (owns, or waits on for
// the pin), in order.
func (o *Owner) Pulling() []int {
	out := []int{}
	for p := range o.pulling {
		if o.pulling[p].Load() {
			out = append(out, p)
		}
	}
	return out
}

// PartitionStatus is one partition as this node sees it.
type PartitionStatus struct {
	Partition int `json:"partition"`
	// Owner is the node that owns it as far as known (this node's own
	// state, the others' last heartbeats), "" if none is known; Preferred
	// the node rendezvous hashing assigns it to among the live nodes.
	Owner     string `json:"owner"`
	Preferred string `json:"preferred"`
	// Pending is the batches in the stream not yet delivered to its
	// consumer, AckPending those delivered and not acknowledged (the
	// partition's lag); -1 when the consumer could not be asked.
	Pending    int64 `json:"pending"`
	AckPending int   `json:"ack_pending"`
}

// MemberStatus is a live node: the partitions it owns and pulls, from its
// last heartbeat (this node's own state for itself).
type MemberStatus struct {
	Node    string `json:"node"`
	Owned   []int  `json:"owned"`
	Pulling []int  `json:"pulling"`
	// Preferred counts the partitions rendezvous hashing assigns it.
	Preferred int `json:"preferred"`
}

// Status is what /api/v1/cluster shows.
type Status struct {
	Node string `json:"node"` // cluster.node_id
	// Alive are this node and the others heard of within
	// cluster.alive_timeout (sorted), Members the same with their partitions.
	Alive   []string       `json:"alive"`
	Members []MemberStatus `json:"members"`
	// Owned are the partitions pinned to this node (known once a batch of
	// it arrived since the node gained it); Pulling those it pulls: owned,
	// or waiting for the pin (those it prefers, those it stands in for).
	Owned      []int             `json:"owned"`
	Pulling    []int             `json:"pulling"`
	Partitions []PartitionStatus `json:"partitions"`
}

// Status returns the node's view of the cluster; the consumers' lag is asked
// of JetStream (a few at a time, each bounded by a second).
func (o *Owner) Status(ctx context.Context) Status {
	live, beats, preferred := o.members.view()
	st := Status{Node: o.cfg.NodeID, Alive: live, Owned: o.Owned(), Pulling: o.Pulling()}
	owner := make([]string, o.cfg.Partitions)
	prefers := map[string]int{}
	for _, id := range preferred {
		prefers[id]++
	}
	for _, id := range live {
		ms := MemberStatus{Node: id, Owned: beats[id].Owns, Pulling: beats[id].Pulls, Preferred: prefers[id]}
		if id == o.cfg.NodeID {
			ms.Owned, ms.Pulling = st.Owned, st.Pulling
		}
		if ms.Owned == nil {
			ms.Owned = []int{}
		}
		if ms.Pulling == nil {
			ms.Pulling = []int{}
		}
		for _, p := range ms.Owned {
			owner[p] = id
		}
		st.Members = append(st.Members, ms)
	}
	for _, p := range st.Owned {
		owner[p] = o.cfg.NodeID
	}
	st.Partitions = make([]PartitionStatus, o.cfg.Partitions)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for p := range st.Partitions {
		st.Partitions[p] = PartitionStatus{Partition: p, Owner: owner[p], Pending: -1, AckPending: -1}
		if p < len(preferred) {
			st.Partitions[p].Preferred = preferred[p]
		}
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
