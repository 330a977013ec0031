package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/citypulse/citypulse/internal/backoff"
)

// sinkState is one sink's progress over all shards.
type sinkState struct {
	sink   Sink
	name   string
	policy BatchPolicy
	cursor cursorFile
	commit commitSignal // wakes WaitCommitted when pos moves

	mu          sync.Mutex
	pos         []uint64 // per shard: everything before it has been written to the sink
	saved       []uint64 // per shard: the positions last persisted
	written     uint64
	batches     uint64
	errors      uint64
	lastErr     string
	lastErrTime time.Time
	lastWrite   time.Time
	failSince   time.Time
	lastFailLog time.Time
	// rate is readings/s written over the last housekeeping period.
	rate        float64
	rateWritten uint64
	rateAt      time.Time
}

// updateRate recomputes the write rate.
func (st *sinkState) updateRate(now time.Time) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.rateAt.IsZero() {
		if d := now.Sub(st.rateAt).Seconds(); d > 0 {
			st.rate = float64(st.written-st.rateWritten) / d
		}
	}
	st.rateWritten, st.rateAt = st.written, now
}

func (st *sinkState) advance(shard int, pos uint64, n int) {
	st.mu.Lock()
	st.pos[shard] = pos
	st.written += uint64(n)
	st.batches++
	st.lastWrite = time.Now()
	st.failSince = time.Time{}
	st.mu.Unlock()
	st.commit.wake()
}

// save persists the positions if they moved.
func (st *sinkState) save() error {
	st.mu.Lock()
	pos := append([]uint64(nil), st.pos...)
	same := true
	for i := range pos {
		same = same && pos[i] == st.saved[i]
	}
	st.mu.Unlock()
	if same {
		return nil
	}
	if err := st.cursor.save(st.name, pos); err != nil {
		return err
	}
	st.mu.Lock()
	st.saved = pos
	st.mu.Unlock()
	return nil
}

// sinkWorker feeds one sink from one shard's journal: read from the cursor,
// batch by the policy, write (retrying with backoff), advance the cursor.
type sinkWorker struct {
	p     *Pipeline
	st    *sinkState
	s     *shard
	r     *journalReader
	batch []Reading
	age   *time.Timer // the batch's MaxAge
}

func (w *sinkWorker) run(ctx context.Context, shardsDone <-chan struct{}) error {
	defer w.r.close()
	w.st.mu.Lock()
	pos := w.st.pos[w.s.id]
	w.st.mu.Unlock()
	w.age = nil
	defer func() {
		if w.age != nil {
			w.age.Stop()
		}
	}()
	for {
		readPos, ok := w.fill(ctx, pos, shardsDone)
		if !ok || !w.write(ctx) {
			return nil
		}
		pos = readPos
		w.st.advance(w.s.id, pos, len(w.batch))
		w.p.m.sinkWritten.WithLabelValues(w.st.name).Add(float64(len(w.batch)))
		w.p.m.sinkBatches.WithLabelValues(w.st.name).Inc()
	}
}

// fill reads the journal from pos into w.batch until the policy says flush;
// it returns the position after the batch, or false when the worker is to
// stop (ctx done, or the shards stopped and everything is written).
func (w *sinkWorker) fill(ctx context.Context, pos uint64, shardsDone <-chan struct{}) (uint64, bool) {
	policy := w.st.policy
	w.batch = w.batch[:0]
	readPos, size := pos, 0
	var first time.Time
	for {
		var n int
		var err error
		w.batch, readPos, n, err = w.read(readPos, policy.MaxReadings, max(policy.MaxBytes-size, 0))
		if err != nil {
			w.p.log.Error("pipeline: reading the journal for a sink failed; retrying", "sink", w.st.name, "shard", w.s.id, "err", err)
			if !backoff.Sleep(ctx, time.Second) {
				return 0, false
			}
			continue
		}
		size += n
		if len(w.batch) > 0 && first.IsZero() {
			first = time.Now()
		}
		if policy.Full(len(w.batch), size) {
			return readPos, true
		}
		if readPos < w.s.j.written.Load() {
			continue // more to read
		}
		stopping := isClosed(shardsDone)
		if len(w.batch) > 0 && (stopping || policy.Due(first, time.Now())) {
			return readPos, true
		}
		if stopping {
			return 0, false // caught up with everything the shard will ever write
		}
		if !w.wait(ctx, readPos, size, first, shardsDone) {
			return 0, false
		}
	}
}

// read appends the records from pos to w.batch: from the shard's tail in
// memory when it holds pos (the worker keeps up), else from the journal.
func (w *sinkWorker) read(pos uint64, maxReadings, maxBytes int) ([]Reading, uint64, int, error) {
	if w.s.tail != nil {
		if b, next, n, ok := w.s.tail.read(pos, w.batch, maxReadings, maxBytes); ok {
			return b, next, n, nil
		}
	}
	before := len(w.batch)
	b, next, n, err := w.r.read(pos, w.batch, maxReadings, maxBytes)
	if read := len(b) - before; read > 0 {
		w.p.m.sinkJournalReads.WithLabelValues(w.st.name).Add(float64(read))
	}
	return b, next, n, err
}

// wait returns when there is something to read: with an empty batch, any
// append; with a batch begun, enough appended to fill it (estimated from the
// bytes per reading so far), or its age due, so that a busy shard's every
// group commit does not cost each sink a read(2). False: ctx is done.
func (w *sinkWorker) wait(ctx context.Context, readPos uint64, size int, first time.Time, shardsDone <-chan struct{}) bool {
	policy := w.st.policy
	var due <-chan time.Time
	if len(w.batch) > 0 {
		if w.age == nil {
			w.age = time.NewTimer(time.Until(first.Add(policy.MaxAge)))
		} else {
			w.age.Reset(time.Until(first.Add(policy.MaxAge)))
		}
		due = w.age.C
	}
	for {
		changed := w.s.j.changed()
		if avail := w.s.j.written.Load() - readPos; avail > 0 && w.fills(int(avail), size) {
			return true
		}
		select {
		case <-changed:
		case <-due:
			return true
		case <-shardsDone:
			return true
		case <-ctx.Done():
			return false
		}
	}
}

// fills reports whether avail more journal bytes would fill the batch begun
// (size bytes so far), or start one.
func (w *sinkWorker) fills(avail, size int) bool {
	p := w.st.policy
	if len(w.batch) == 0 || p.MaxBytes > 0 && size+avail >= p.MaxBytes {
		return true
	}
	perReading := max(size/len(w.batch), 1)
	return len(w.batch)+avail/perReading >= p.MaxReadings
}

// write writes the batch, retrying with exponential backoff and jitter until it
// succeeds, the sink says the error is permanent, or ctx is done (false).
func (w *sinkWorker) write(ctx context.Context) bool {
	b := backoff.Backoff{Min: w.p.cfg.RetryMin, Max: w.p.cfg.RetryMax}
	for {
		err := w.st.sink.Write(ctx, Batch{Shard: w.s.id, Readings: w.batch})
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		w.p.m.sinkErrors.WithLabelValues(w.st.name).Inc()
		if errors.Is(err, ErrPermanent) {
			dropped := droppedBy(err, len(w.batch))
			w.p.m.sinkDropped.WithLabelValues(w.st.name).Add(float64(dropped))
			w.p.log.Error("sink refused readings permanently; they stay in the journal until the segment is deleted but are not retried",
				"sink", w.st.name, "shard", w.s.id, "readings", dropped, "batch", len(w.batch), "err", err)
			w.st.fail(err, false)
			return true
		}
		if w.st.fail(err, true) {
			w.p.log.Error(fmt.Sprintf("sink %s is failing: %v. Ingest continues and its backlog (%s) is kept in the journal and replayed when it recovers, until the journal reaches pipeline.journal_max_bytes (%s)",
				w.st.name, err, byteSize(w.p.lagBytes(w.st)), byteSize(w.p.cfg.JournalMaxBytes)),
				"sink", w.st.name, "failing_for", time.Since(w.st.failingSince()).Round(time.Second))
		}
		if !backoff.Sleep(ctx, b.Next()) {
			return false
		}
	}
}

// fail records an error; it reports whether it is time to log it again (every
// 10 s at most per sink).
func (st *sinkState) fail(err error, retrying bool) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	now := time.Now()
	st.errors++
	st.lastErr = err.Error()
	st.lastErrTime = now
	if retrying && st.failSince.IsZero() {
		st.failSince = now
	}
	if now.Sub(st.lastFailLog) < 10*time.Second {
		return false
	}
	st.lastFailLog = now
	return true
}

func (st *sinkState) failingSince() time.Time {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.failSince
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// droppedBy is how many of a batch of n readings a permanent error refused:
// n, unless the sink says fewer (an error with a Dropped() int method, when
// it stored the rest).
func droppedBy(err error, n int) int {
	var d interface{ Dropped() int }
	if errors.As(err, &d) && d.Dropped() >= 0 && d.Dropped() <= n {
		return d.Dropped()
	}
	return n
}
