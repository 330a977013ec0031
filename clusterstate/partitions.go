package clusterstate

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/rules"
)

// Engine is what moves with a partition of the rules engine (*rules.Engine).
type Engine interface {
	ExportState(sel func(owner string) bool) ([]byte, error)
	ImportState(snapshot []byte, transitions [][]byte) (int, error)
	DropState(sel func(owner string) bool) int
	SetOwns(owns func(owner string) bool)
}

// Outbox is what the partitions need of the notifier (*notifier.Outbox).
type Outbox interface {
	Enqueue(ev notifier.Event)
	Forget(match func(ev notifier.Event) bool) int
	OnDone(f func(ev notifier.Event))
}

// restoreTimeout bounds the reading of a partition's state by a new owner;
// it is retried until then. After it the partition is evaluated without it
// (logged as an error: its alerts may notify again).
const restoreTimeout = 30 * time.Second

// Partitions is the rules engine's journal in cluster mode and the owner's
// OwnershipFunc: it records each transition in the state log of its alert's
// partition (cluster.PartitionOf of the device; cluster.FleetState for the
// fleet alerts, owned by rules.FleetOwner), restores a partition gained,
// checkpoints and forgets one released, and tells the engine which owners it
// judges. Fleet (fleet.go) gains and releases cluster.FleetState with the
// fleet lease.
type Partitions struct {
	n     int
	log   *slog.Logger
	store *cluster.StateStore
	eng   Engine
	out   Outbox // nil: no notifications

	mu    sync.RWMutex
	owned map[int]bool
	notes map[string]int // pending notification key → partition
}

// NewPartitions builds the journal for p partitions; Attach completes it.
func NewPartitions(partitions int, log *slog.Logger) *Partitions {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Partitions{n: partitions, log: log, owned: map[int]bool{}, notes: map[string]int{}}
}

// Attach completes the wiring, before the engine, the store or the owner
// runs: the engine (built with this as its Journal) judges owned devices
// only, the store (built with Snapshot) keeps the state, and out (nil for
// none) sends the notifications of the owned partitions.
func (ps *Partitions) Attach(eng Engine, store *cluster.StateStore, out Outbox) {
	ps.eng, ps.store, ps.out = eng, store, out
	eng.SetOwns(ps.Owns)
	if out != nil {
		out.OnDone(ps.delivered)
	}
}

// Owns reports whether this node owns the partition of owner (a device, or
// rules.FleetOwner).
func (ps *Partitions) Owns(owner string) bool {
	p := ps.partitionOf(owner)
	ps.mu.RLock()
	defer ps.mu.RUnlock()
	return ps.owned[p]
}

// partitionOf is the partition whose state holds owner's alerts.
func (ps *Partitions) partitionOf(owner string) int {
	if owner == rules.FleetOwner {
		return cluster.FleetState
	}
	return cluster.PartitionOf(owner, ps.n)
}

// ownedPartitions lists the partitions of devices this node owns (restored).
func (ps *Partitions) ownedPartitions() []int {
	ps.mu.RLock()
	defer ps.mu.RUnlock()
	out := make([]int, 0, len(ps.owned))
	for p := range ps.owned {
		if p != cluster.FleetState {
			out = append(out, p)
		}
	}
	return out
}

func (ps *Partitions) in(p int) func(owner string) bool {
	return func(owner string) bool { return ps.partitionOf(owner) == p }
}

// Snapshot is partition p's alert state (the store's cluster.Snapshotter).
func (ps *Partitions) Snapshot(p int) ([]byte, error) { return ps.eng.ExportState(ps.in(p)) }

// Record appends the transitions, with their notifications, to their
// partitions' logs (rules.Journal).
func (ps *Partitions) Record(ctx context.Context, recs []rules.JournalRecord) error {
	out := make([]cluster.StateRecord, len(recs))
	for i, r := range recs {
		p := ps.partitionOf(r.Owner)
		out[i] = cluster.StateRecord{Partition: p, Transition: r.State}
		if ps.out == nil {
			continue
		}
		note, err := json.Marshal(r.Event)
		if err != nil {
			return fmt.Errorf("encode notification %s: %w", r.Event.Key, err)
		}
		out[i].NoteKey, out[i].Note = r.Event.Key, note
		ps.mu.Lock()
		ps.notes[r.Event.Key] = p
		ps.mu.Unlock()
	}
	return ps.store.Append(ctx, out)
}

// delivered forgets a notification every receiver has.
func (ps *Partitions) delivered(ev notifier.Event) {
	ps.mu.Lock()
	delete(ps.notes, ev.Key)
	ps.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ps.store.Delivered(ctx, ev.Key); err != nil {
		ps.log.Warn("cannot remove a delivered notification from the state log; a next owner may send it again (same Idempotency-Key)", "err", err)
	}
}

// OnOwned is the owner's cluster.OwnershipFunc: on a gain it restores p
// before the first batch, on a loss it checkpoints p and forgets it.
func (ps *Partitions) OnOwned(p int, owned bool) {
	if owned {
		ps.gain(p)
		return
	}
	ps.release(p)
}

func (ps *Partitions) gain(p int) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), restoreTimeout)
	defer cancel()
	var st cluster.PartitionState
	var err error
	for {
		if st, err = ps.store.Restore(ctx, p); err == nil || ctx.Err() != nil {
			break
		}
		ps.log.Warn("cannot read a partition's state; retrying", "partition", p, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err != nil {
		ps.log.Error("partition gained without its alert state: its alerts may notify again", "partition", p, "err", err)
	}
	n, err := ps.eng.ImportState(st.Snapshot, st.Transitions)
	if err != nil {
		ps.log.Error("partition's alert state partly restored", "partition", p, "err", err)
	}
	resent := ps.resend(p, st.Notes)
	ps.mu.Lock()
	ps.owned[p] = true
	ps.mu.Unlock()
	ps.log.Info("partition state restored", "partition", p, "snapshot_bytes", len(st.Snapshot),
		"transitions", len(st.Transitions), "records", n, "notifications_resent", resent, "took", time.Since(start))
}

// resend queues the notifications the previous owner recorded and did not
// deliver; a receiver that had one already dedupes it by Idempotency-Key.
func (ps *Partitions) resend(p int, notes [][]byte) int {
	if ps.out == nil {
		return 0
	}
	n := 0
	for _, b := range notes {
		var ev notifier.Event
		if err := json.Unmarshal(b, &ev); err != nil || ev.Key == "" {
			ps.log.Error("unreadable pending notification in the state log; skipped", "partition", p, "err", err)
			continue
		}
		ps.mu.Lock()
		ps.notes[ev.Key] = p
		ps.mu.Unlock()
		ps.out.Enqueue(ev)
		n++
	}
	return n
}

func (ps *Partitions) release(p int) {
	ps.mu.Lock()
	delete(ps.owned, p)
	ps.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ps.store.Release(ctx, p); err != nil {
		ps.log.Warn("partition released without a checkpoint; the next owner replays its log", "partition", p, "err", err)
	}
	dropped := ps.eng.DropState(ps.in(p))
	forgot := 0
	if ps.out != nil {
		forgot = ps.out.Forget(func(ev notifier.Event) bool {
			ps.mu.RLock()
			defer ps.mu.RUnlock()
			q, ok := ps.notes[ev.Key]
			return ok && q == p
		})
		ps.mu.Lock()
		for k, q := range ps.notes {
			if q == p {
				delete(ps.notes, k) // the next owner sends them
			}
		}
		ps.mu.Unlock()
	}
	ps.log.Info("partition state handed over", "partition", p, "alerts_dropped", dropped, "notifications_forgotten", forgot)
}
