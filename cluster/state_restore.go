package cluster

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Restore reads partition p's state for a new owner and marks p owned (Run
// checkpoints it from now on). Call it before the first batch of p is
// evaluated: from the owner's OwnershipFunc(p, true).
func (s *StateStore) Restore(ctx context.Context, p int) (PartitionState, error) {
	start := time.Now()
	obs, str, err := s.ensured(ctx)
	if err != nil {
		return PartitionState{}, fmt.Errorf("restore partition %d: %w", p, err)
	}
	var st PartitionState
	var after, handled uint64
	info, err := obs.GetInfo(ctx, snapshotName(p))
	switch {
	case errors.Is(err, jetstream.ErrObjectNotFound):
	case err != nil:
		return st, fmt.Errorf("restore partition %d: snapshot: %w", p, err)
	default:
		if after, err = strconv.ParseUint(info.Metadata[afterMeta], 10, 64); err != nil {
			return st, fmt.Errorf("restore partition %d: snapshot metadata %q: %w", p, info.Metadata[afterMeta], err)
		}
		handled, _ = strconv.ParseUint(info.Metadata[readingsMeta], 10, 64) // absent: 0, unknown
		if st.Snapshot, err = obs.GetBytes(ctx, snapshotName(p)); err != nil {
			return st, fmt.Errorf("restore partition %d: snapshot: %w", p, err)
		}
	}
	last, err := s.readLog(ctx, str, p, after, &st)
	if err != nil {
		return st, fmt.Errorf("restore partition %d: %w", p, err)
	}
	s.mu.Lock()
	s.owned[p] = true
	s.lastSeq[p] = max(last, after)
	s.handled[p] = handled
	s.mu.Unlock()
	s.m.restoreSeconds.Observe(time.Since(start).Seconds())
	return st, nil
}

// readLog reads p's transitions after seq after, and its pending
// notifications, in stream order; it returns the last transition's sequence.
// It reads up to the last message of p that the stream leader has: the
// consumer may be served by a replica that lags behind.
func (s *StateStore) readLog(ctx context.Context, str jetstream.Stream, p int, after uint64, st *PartitionState) (uint64, error) {
	target, err := lastSeq(ctx, str, transitionSubject(p), noteSubject(p), deliveredSubject(p))
	if err != nil || target == 0 {
		return 0, err
	}
	cons, err := str.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{transitionSubject(p), noteSubject(p), deliveredSubject(p)}})
	if err != nil {
		return 0, fmt.Errorf("read the state log: %w", err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = str.DeleteConsumer(dctx, cons.CachedInfo().Name)
	}()
	var last uint64
	var notes pendingNotes
	defer func() { st.Notes = notes.pending() }()
	for {
		batch, err := cons.Fetch(512, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			if ctx.Err() != nil {
				return 0, fmt.Errorf("read the state log: %w", err)
			}
			time.Sleep(50 * time.Millisecond) // the consumer is being (re)created
			continue
		}
		for m := range batch.Messages() {
			md, err := m.Metadata()
			if err != nil {
				return 0, fmt.Errorf("read the state log: %w", err)
			}
			seq := md.Sequence.Stream
			switch m.Subject() {
			case noteSubject(p):
				key := m.Headers().Get(noteKeyHeader)
				notes.add(key, m.Data())
				s.mu.Lock()
				s.notes[key] = noteRef{seq: seq, p: p}
				s.mu.Unlock()
			case deliveredSubject(p): // only where the deletion was not seen: a mirror
				key := m.Headers().Get(noteKeyHeader)
				notes.delivered(key)
				s.mu.Lock()
				delete(s.notes, key)
				s.mu.Unlock()
			case transitionSubject(p):
				if seq > after {
					st.Transitions = append(st.Transitions, m.Data())
					last = seq
				}
			}
			if seq >= target {
				return last, nil
			}
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("read the state log up to %d: %w", target, ctx.Err())
		}
	}
}

// Handled returns the position in the readings stream that partition p's
// latest snapshot covers: every batch up to that sequence was handled
// before the snapshot was taken (0: no snapshot, or none recorded one). A
// promoted standby site starts p's consumer after it (Owner.SetStart).
func (s *StateStore) Handled(ctx context.Context, p int) (uint64, error) {
	obs, _, err := s.ensured(ctx)
	if err != nil {
		return 0, fmt.Errorf("position of partition %d: %w", p, err)
	}
	info, err := obs.GetInfo(ctx, snapshotName(p))
	switch {
	case errors.Is(err, jetstream.ErrObjectNotFound):
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("position of partition %d: snapshot: %w", p, err)
	}
	v := info.Metadata[readingsMeta]
	if v == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("position of partition %d: snapshot metadata %q: %w", p, v, err)
	}
	return n, nil
}

// pendingNotes are the notifications read from the log, in order, less the
// ones marked delivered after them.
type pendingNotes struct {
	keys []string
	data [][]byte
	done map[string]bool
}

func (n *pendingNotes) add(key string, data []byte) {
	n.keys, n.data = append(n.keys, key), append(n.data, data)
}

func (n *pendingNotes) delivered(key string) {
	if n.done == nil {
		n.done = map[string]bool{}
	}
	n.done[key] = true
}

func (n *pendingNotes) pending() [][]byte {
	var out [][]byte
	for i, k := range n.keys {
		if !n.done[k] {
			out = append(out, n.data[i])
		}
	}
	return out
}

// lastSeq is the sequence of the last message on any of subjects, as the
// stream leader has it (0: none).
func lastSeq(ctx context.Context, str jetstream.Stream, subjects ...string) (uint64, error) {
	var last uint64
	for _, subj := range subjects {
		m, err := str.GetLastMsgForSubject(ctx, subj)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
		case err != nil:
			return 0, fmt.Errorf("read the state log: last message of %s: %w", subj, err)
		default:
			last = max(last, m.Sequence)
		}
	}
	return last, nil
}

func (s *StateStore) handles() (jetstream.ObjectStore, jetstream.Stream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.obs, s.str
}

// ensured returns the bucket and the stream, created first if Ensure has
// not succeeded yet.
func (s *StateStore) ensured(ctx context.Context) (jetstream.ObjectStore, jetstream.Stream, error) {
	if obs, str := s.handles(); obs != nil {
		return obs, str, nil
	}
	if err := s.Ensure(ctx); err != nil {
		return nil, nil, err
	}
	obs, str := s.handles()
	return obs, str, nil
}

// Checkpoint writes partition p's snapshot (from the snapshotter), then
// purges the transitions it holds. The sequence it records is read before
// the snapshot is taken: every transition up to it changed the state first.
func (s *StateStore) Checkpoint(ctx context.Context, p int) error {
	obs, str, err := s.ensured(ctx)
	if err != nil {
		return fmt.Errorf("checkpoint partition %d: %w", p, err)
	}
	s.mu.Lock()
	after := s.lastSeq[p]
	if s.progress != nil && p != FleetState { // the fleet alerts' state covers no partition of the readings
		// Read before the snapshot is taken, as after: the batches up to
		// it were handled, their effect on the state is in the snapshot.
		s.handled[p] = max(s.handled[p], s.progress(p))
	}
	handled := s.handled[p]
	s.mu.Unlock()
	if err := s.superseded(ctx, obs, str, p, after); err != nil {
		s.m.checkpoints.WithLabelValues("superseded").Inc()
		return err
	}
	data, err := s.snap(p)
	if err != nil {
		s.m.checkpoints.WithLabelValues("error").Inc()
		return fmt.Errorf("checkpoint partition %d: %w", p, err)
	}
	meta := map[string]string{afterMeta: strconv.FormatUint(after, 10)}
	if handled > 0 {
		meta[readingsMeta] = strconv.FormatUint(handled, 10)
	}
	_, err = obs.Put(ctx, jetstream.ObjectMeta{Name: snapshotName(p), Metadata: meta}, bytesReader(data))
	if err == nil && after > 0 {
		err = str.Purge(ctx, jetstream.WithPurgeSubject(transitionSubject(p)), jetstream.WithPurgeSequence(after+1))
	}
	if err != nil {
		s.m.checkpoints.WithLabelValues("error").Inc()
		return fmt.Errorf("checkpoint partition %d: %w", p, err)
	}
	s.m.checkpoints.WithLabelValues("ok").Inc()
	s.m.snapshotBytes.Observe(float64(len(data)))
	return nil
}

// ErrSuperseded is returned by Checkpoint when another node recorded
// partition p's state after this one did: it owns p now, and this node's
// snapshot would be older than its.
var ErrSuperseded = errors.New("another node owns the partition now")

// superseded checks that no other node wrote p's snapshot or appended to its
// log after this node's last transition (after): then this node lost p (its
// pin expired) and must not overwrite the new owner's state. A small race
// remains (the new owner appends between this check and the write); the
// new owner's next checkpoint overwrites the snapshot again.
func (s *StateStore) superseded(ctx context.Context, obs jetstream.ObjectStore, str jetstream.Stream, p int, after uint64) error {
	if info, err := obs.GetInfo(ctx, snapshotName(p)); err == nil {
		if v, _ := strconv.ParseUint(info.Metadata[afterMeta], 10, 64); v > after {
			return fmt.Errorf("checkpoint partition %d: %w (its snapshot holds transitions up to %d, this node's up to %d)", p, ErrSuperseded, v, after)
		}
	} else if !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("checkpoint partition %d: %w", p, err)
	}
	m, err := str.GetLastMsgForSubject(ctx, transitionSubject(p))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return fmt.Errorf("checkpoint partition %d: %w", p, err)
	case m.Sequence > after:
		return fmt.Errorf("checkpoint partition %d: %w (its log has a transition at %d, this node's last is %d)", p, ErrSuperseded, m.Sequence, after)
	}
	return nil
}

// Release checkpoints p for the next owner and stops checkpointing it. Call
// it from the owner's OwnershipFunc(p, false), before the state is dropped.
func (s *StateStore) Release(ctx context.Context, p int) error {
	s.mu.Lock()
	owned := s.owned[p]
	delete(s.owned, p)
	s.mu.Unlock()
	if !owned {
		return nil
	}
	return s.Checkpoint(ctx, p)
}

// Owned lists the partitions this store checkpoints.
func (s *StateStore) Owned() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]int, 0, len(s.owned))
	for p := range s.owned {
		out = append(out, p)
	}
	return out
}

// Run checkpoints every owned partition every cluster.state.checkpoint until
// ctx is done. A failed checkpoint is logged and retried on the next round
// (the transitions stay in the log meanwhile).
func (s *StateStore) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.Checkpoint)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for _, p := range s.Owned() {
			cctx, cancel := context.WithTimeout(ctx, s.cfg.Checkpoint)
			err := s.Checkpoint(cctx, p)
			cancel()
			if err != nil && ctx.Err() == nil {
				s.log.Warn("cannot checkpoint a partition's state; its transitions stay in the log", "partition", p, "err", err)
			}
		}
	}
}
