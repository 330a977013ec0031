package cluster

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/citypulse/citypulse/internal/backoff"
)

// acker acknowledges a partition's handled batches to JetStream once their
// Commit returned (the shared store has their readings), in the order they
// were handled. The owner's consume loop goes on handling newer batches
// meanwhile, so a partition has several handler calls in flight; their
// number is bounded by the consumer's max_ack_pending (JetStream delivers
// no more until some are acknowledged): while the store is down the
// partition stops, its batches stay in the stream.
//
// A batch whose commit takes longer than half of ack_wait is kept from being
// delivered again (to this node or another) with InProgress every
// ack_wait/2, as long as this node waits for it.
type acker struct {
	p        int
	ackWait  time.Duration
	capacity int // max_ack_pending
	log      *slog.Logger
	m        *Metrics

	mu       sync.Mutex
	queue    []handledBatch
	msgs     int           // in queue
	fullWarn time.Time     // last warning that the queue held capacity batches
	added    chan struct{} // signalled (not blocking) by add
	empty    chan struct{} // signalled (not blocking) when the queue empties
}

// handledBatch is one handler call's batches waiting for their commit.
type handledBatch struct {
	msgs    []jetstream.Msg
	commit  Commit    // nil: nothing to wait for
	handled time.Time // the handler returned
	touched time.Time // JetStream's ack timer last started: taken for handling, or InProgress
}

func newAcker(p int, ackWait time.Duration, capacity int, log *slog.Logger, m *Metrics) *acker {
	return &acker{p: p, ackWait: ackWait, capacity: capacity, log: log, m: m,
		added: make(chan struct{}, 1), empty: make(chan struct{}, 1)}
}

// add queues msgs, handled since taken (their ack timer runs since about
// then), to be acknowledged once commit returned nil.
func (a *acker) add(msgs []jetstream.Msg, commit Commit, taken time.Time) {
	now := time.Now()
	a.mu.Lock()
	a.queue = append(a.queue, handledBatch{msgs: msgs, commit: commit, handled: now, touched: taken})
	a.msgs += len(msgs)
	warn := a.msgs >= a.capacity && now.Sub(a.fullWarn) > 30*time.Second
	if warn {
		a.fullWarn = now
	}
	a.mu.Unlock()
	a.m.awaitingStore.Add(float64(len(msgs)))
	signal(a.added)
	if warn {
		a.log.Warn("a partition has cluster.max_ack_pending batches waiting for the store: JetStream delivers it no more until the store took some, so it is consumed no faster than max_ack_pending batches per store flush; raise cluster.max_ack_pending, or lower the batch.max_age of the sinks of cluster.ack_after_sinks",
			"partition", a.p, "max_ack_pending", a.capacity, "oldest_waiting", now.Sub(a.oldest()).Round(time.Millisecond))
	}
}

func (a *acker) oldest() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.queue) == 0 {
		return time.Now()
	}
	return a.queue[0].handled
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (a *acker) front() (handledBatch, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.queue) == 0 {
		return handledBatch{}, false
	}
	return a.queue[0], true
}

// pop removes the front, which was acknowledged.
func (a *acker) pop() {
	a.mu.Lock()
	n := len(a.queue[0].msgs)
	a.queue[0] = handledBatch{}
	a.queue = a.queue[1:]
	a.msgs -= n
	empty := len(a.queue) == 0
	a.mu.Unlock()
	a.m.awaitingStore.Sub(float64(n))
	if empty {
		signal(a.empty)
	}
}

// run acknowledges the batches as their commits return, until ctx is done.
// It looks for batches to renew every ack_wait/8: a batch is renewed between
// ack_wait/2 and 5/8 × ack_wait after its timer started, which leaves 3/8
// of it for a loaded machine's delays.
func (a *acker) run(ctx context.Context) {
	renewEvery := a.ackWait / 8
	lastRenew, lastWarn := time.Now(), time.Time{}
	for {
		head, ok := a.front()
		if !ok {
			select {
			case <-a.added:
				continue
			case <-ctx.Done():
				return
			}
		}
		if now := time.Now(); now.Sub(lastRenew) >= renewEvery {
			a.renew(now)
			lastRenew = now
		}
		err := a.await(ctx, head, renewEvery)
		switch {
		case err == nil:
			for _, m := range head.msgs {
				_ = m.Ack()
			}
			a.m.storeWait.Observe(time.Since(head.handled).Seconds())
			a.pop()
		case ctx.Err() != nil:
			return
		default:
			if waited := time.Since(head.handled); waited > 10*time.Second && time.Since(lastWarn) > 30*time.Second {
				lastWarn = time.Now()
				a.log.Warn("the shared store has not taken this partition's readings yet: its batches are not acknowledged to JetStream and stay in the stream (the consumer's lag grows) until it does; check the sinks of cluster.ack_after_sinks (e.g. storage.remote_write)",
					"partition", a.p, "waiting", waited.Round(time.Second), "batches", a.pending(), "err", err)
			}
			if !errors.Is(err, context.DeadlineExceeded) && !backoff.Sleep(ctx, renewEvery) {
				return // an error of the wait itself (the pipeline stopping): not at once again
			}
		}
	}
}

// await calls head's commit for at most d: the caller renews the timers of
// what waits, then asks again.
func (a *acker) await(ctx context.Context, head handledBatch, d time.Duration) error {
	if head.commit == nil {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return head.commit(cctx)
}

// renew sends InProgress for the batches whose ack timer started more than
// ack_wait/2 ago.
func (a *acker) renew(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range a.queue {
		pa := &a.queue[i]
		if now.Sub(pa.touched) < a.ackWait/2 {
			continue
		}
		for _, m := range pa.msgs {
			_ = m.InProgress()
		}
		pa.touched = now
		a.m.ackExtended.Add(float64(len(pa.msgs)))
	}
}

func (a *acker) pending() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.queue)
}

// finish gives the commits under way up to grace to return (their batches
// are then acknowledged), stops run with cancel and waits for it (done),
// and gives the batches still waiting back with a Nak: the next owner gets
// them at once instead of after ack_wait, and writes them to the store
// again (the store keeps one of two identical samples).
func (a *acker) finish(grace time.Duration, cancel context.CancelFunc, done <-chan struct{}) {
	t := time.NewTimer(grace)
	defer t.Stop()
	for a.pending() > 0 {
		select {
		case <-a.empty:
			continue
		case <-t.C:
		case <-done:
		}
		break
	}
	cancel()
	<-done
	a.mu.Lock()
	q := a.queue
	a.queue, a.msgs = nil, 0
	a.mu.Unlock()
	for _, pa := range q {
		nakAll(pa.msgs)
		a.m.awaitingStore.Sub(float64(len(pa.msgs)))
	}
}

// sleep waits d; false if ctx ended first.
