package cluster

import (
	"context"
	"sync/atomic"
)

// Progress records, per partition, the stream sequence of the last batch
// the handler accepted while this node owned it: every batch up to it was
// handled (its readings journaled, the transitions they caused recorded in
// the state log) before the owner acknowledged it. The state store writes
// it with each snapshot, so that the state carries the position in the
// readings stream it covers; a promoted standby site, whose mirrors carry
// the state but no consumers, starts its partition consumers there
// (Owner.SetStart) instead of at the stream's start.
type Progress struct {
	seq []atomic.Uint64
}

// NewProgress tracks partitions partitions.
func NewProgress(partitions int) *Progress {
	return &Progress{seq: make([]atomic.Uint64, partitions)}
}

// Handler wraps h: a batch h accepted advances its partition's position
// (handled: its readings journaled and judged; the store may have them
// later, when the Commit returns).
func (pr *Progress) Handler(h Handler) Handler {
	return func(ctx context.Context, msgs []Message) (Commit, error) {
		commit, err := h(ctx, msgs)
		if err != nil || len(msgs) == 0 {
			return commit, err
		}
		p := msgs[0].Partition
		for _, m := range msgs {
			if m.Seq > pr.seq[p].Load() {
				pr.seq[p].Store(m.Seq) // one handler call at a time per partition
			}
		}
		return commit, nil
	}
}

// Owned is an OwnershipFunc: a gained partition starts from 0 again (a
// position from an earlier ownership may belong to another history of the
// stream, e.g. before a fail-back re-created it).
func (pr *Progress) Owned(p int, owned bool) {
	if owned {
		pr.seq[p].Store(0)
	}
}

// Handled is the sequence of p's last batch handled (0: none since the gain,
// or p is no readings partition, e.g. the fleet's state, -1).
func (pr *Progress) Handled(p int) uint64 {
	if p < 0 || p >= len(pr.seq) {
		return 0
	}
	return pr.seq[p].Load()
}
