package cluster

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// ErrPublisherStopped is returned by Submit when the publisher is not running.
var ErrPublisherStopped = errors.New("cluster publisher stopped")

// ErrPublisherFull is returned by Submit when a partition's queue of readings
// waiting to be published is at its bound (JetStream slower than the gateways).
var ErrPublisherFull = errors.New("cluster publisher: too many readings waiting for JetStream")

// appender is what a Publisher needs of the Log.
type appender interface {
	Append(ctx context.Context, p int, msgID string, payload []byte) (func(context.Context) error, error)
}

// Publisher is the gateways' submitter in cluster mode: Submit returns nil
// only once JetStream acknowledged the readings (stored on a majority of the
// stream's replicas), so a gateway acknowledges a device after that and not
// before. Concurrent submissions to one partition are coalesced: while a
// partition's batch awaits its acknowledgement, the next submissions queue and
// go together in the next batch (one batch in flight per partition keeps the
// stream in submission order); the partitions share the log's window of
// unacknowledged batches (cluster.max_in_flight).
type Publisher struct {
	log      appender
	cfg      Config
	id       string // message id prefix: unique per publisher run (see newPublisher)
	seq      atomic.Uint64
	parts    []*queue
	m        *Metrics
	maxBatch int          // readings per batch
	maxQueue int          // readings waiting per partition
	fence    func() error // nil: always may acknowledge; see SetFence

	stopped chan struct{} // closed when Run returns
}

// queue holds a partition's readings waiting to be published.
type queue struct {
	mu      sync.Mutex
	rs      []pipeline.Reading
	waiters []waiter
	kick    chan struct{}
}

// waiter is one submission: its readings are rs[:end] of the queue it joined,
// and done gets the outcome.
type waiter struct {
	n    int
	done chan error
}

// Publisher bounds: a batch of at most maxBatchPublish readings (well under
// NATS's 1 MB payload limit at ~100 bytes a reading), and at most
// queueBatches batches' worth waiting per partition.
const (
	maxBatchPublish = 2048
	queueBatches    = 8
)

// NewPublisher builds a publisher appending to l; node (cluster.node_id)
// names it in message ids. It starts nothing: Run publishes.
func NewPublisher(l *Log, node string, m *Metrics) *Publisher {
	return newPublisher(l, l.cfg, node, m)
}

// newPublisher builds a publisher whose message ids are
// <node>.<incarnation>.<sequence>: JetStream drops a batch whose id it saw
// within cluster.duplicate_window and acknowledges it as a duplicate, so an
// id used twice would acknowledge readings it never stored. A node id holds
// no "." and is unique in the cluster; the incarnation is 64 random bits,
// new at each start (a restarted gateway, or two nodes given one id by
// mistake, never repeat an id); the sequence counts this run's batches.
func newPublisher(l appender, cfg Config, node string, m *Metrics) *Publisher {
	if m == nil {
		m = NewMetrics(nil)
	}
	p := &Publisher{log: l, cfg: cfg, m: m, maxBatch: maxBatchPublish, maxQueue: queueBatches * maxBatchPublish,
		id:      node + "." + newIncarnation(),
		stopped: make(chan struct{})}
	p.parts = make([]*queue, cfg.Partitions)
	for i := range p.parts {
		p.parts[i] = &queue{kick: make(chan struct{}, 1)}
	}
	return p
}

// SetFence makes Submit refuse, as backpressure counted with reason
// "fenced", whenever may returns an error: at a disaster-recovery site that
// is not the active one (Standby.MayAcknowledge), devices are not
// acknowledged and send again later. Call it before Run.
func (p *Publisher) SetFence(may func() error) { p.fence = may }

// Submit publishes rs and returns nil once JetStream acknowledged all of
// them. An error means some may not be stored: the device must not be
// acknowledged (it sends again; the owner drops what is a duplicate). When
// JetStream did not acknowledge (no quorum, stream full, timeout) or too
// many readings wait, the error wraps pipeline.ErrBackpressure (and
// ErrNotDurable or ErrPublisherFull), as a full journal does on one machine;
// ErrPublisherStopped when stopping; ctx's error. rs may hold several
// devices; it may be reused once Submit returns.
func (p *Publisher) Submit(ctx context.Context, rs []pipeline.Reading) error {
	w, err := p.Begin(ctx, rs)
	if err != nil || w == nil {
		return err
	}
	return w.Wait(ctx)
}

// Publishing is a submission queued by Begin.
type Publishing struct {
	p     *Publisher
	start time.Time
	dones []chan error
}

// Begin queues rs for publishing behind the earlier submissions of the same
// partitions and returns at once (nil, nil for no readings); Wait says
// whether JetStream acknowledged them, with Submit's errors. rs is copied:
// it may be reused once Begin returns.
func (p *Publisher) Begin(_ context.Context, rs []pipeline.Reading) (*Publishing, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	select {
	case <-p.stopped:
		return nil, ErrPublisherStopped
	default:
	}
	if p.fence != nil {
		if err := p.fence(); err != nil {
			p.m.submitFailed.WithLabelValues("fenced").Inc()
			return nil, fmt.Errorf("%w: %w", pipeline.ErrBackpressure, err)
		}
	}
	w := &Publishing{p: p, start: time.Now()}
	for part, group := range p.byPartition(rs) {
		done, err := p.enqueue(part, group)
		if errors.Is(err, ErrPublisherStopped) {
			p.m.submitFailed.WithLabelValues("stopped").Inc()
			return nil, err
		}
		if err != nil {
			p.m.submitFailed.WithLabelValues("full").Inc()
			// What was enqueued already is published; the device sends all again.
			return nil, fmt.Errorf("%w: %w", pipeline.ErrBackpressure, err)
		}
		w.dones = append(w.dones, done)
	}
	return w, nil
}

// Wait returns nil once JetStream acknowledged every reading of the
// submission, or Submit's error.
func (w *Publishing) Wait(ctx context.Context) error {
	p := w.p
	for _, done := range w.dones {
		select {
		case err := <-done:
			if err != nil {
				p.m.submitFailed.WithLabelValues(failReason(err)).Inc()
				if errors.Is(err, ErrPublisherStopped) {
					return err
				}
				// For the gateways, JetStream not acknowledging is backpressure:
				// not acknowledged, the device retries later.
				return fmt.Errorf("%w: %w", pipeline.ErrBackpressure, err)
			}
		case <-ctx.Done():
			p.m.submitFailed.WithLabelValues("canceled").Inc()
			return ctx.Err()
		}
	}
	p.m.submitSeconds.Observe(time.Since(w.start).Seconds())
	return nil
}

// failReason is the label of a failed submission.
func failReason(err error) string {
	switch {
	case errors.Is(err, ErrPublisherStopped):
		return "stopped"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	default:
		return "not_acknowledged"
	}
}

// byPartition groups rs by partition, keeping their order.
func (p *Publisher) byPartition(rs []pipeline.Reading) map[int][]pipeline.Reading {
	first := PartitionOf(rs[0].Device, p.cfg.Partitions)
	same := true
	for i := 1; i < len(rs) && same; i++ {
		same = rs[i].Device == rs[0].Device
	}
	if same {
		return map[int][]pipeline.Reading{first: rs}
	}
	out := map[int][]pipeline.Reading{}
	for _, r := range rs {
		part := PartitionOf(r.Device, p.cfg.Partitions)
		out[part] = append(out[part], r)
	}
	return out
}

// enqueue adds rs to partition part's queue and wakes its publisher.
func (p *Publisher) enqueue(part int, rs []pipeline.Reading) (chan error, error) {
	q := p.parts[part]
	done := make(chan error, 1)
	q.mu.Lock()
	select {
	case <-p.stopped: // checked under the lock: Run fails what is queued after it closes stopped
		q.mu.Unlock()
		return nil, ErrPublisherStopped
	default:
	}
	if len(q.rs)+len(rs) > p.maxQueue && len(q.rs) > 0 {
		q.mu.Unlock()
		return nil, fmt.Errorf("%w (%d readings for partition %d)", ErrPublisherFull, len(q.rs), part)
	}
	q.rs = append(q.rs, rs...)
	q.waiters = append(q.waiters, waiter{n: len(rs), done: done})
	q.mu.Unlock()
	select {
	case q.kick <- struct{}{}:
	default:
	}
	return done, nil
}

// Run publishes the partitions' queues until ctx is done; then it publishes
// what is queued still, fails what comes later with ErrPublisherStopped, and
// returns.
func (p *Publisher) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for part, q := range p.parts {
		wg.Add(1)
		go func() { defer wg.Done(); p.runPartition(ctx, part, q) }()
	}
	wg.Wait()
	close(p.stopped)
	for _, q := range p.parts { // submissions that raced with the stop
		q.mu.Lock()
		failAll(q.waiters, ErrPublisherStopped)
		q.rs, q.waiters = nil, nil
		q.mu.Unlock()
	}
	return nil
}

func (p *Publisher) runPartition(ctx context.Context, part int, q *queue) {
	for {
		select {
		case <-q.kick:
			p.linger(ctx, q)
			for p.flush(part, q) {
			}
		case <-ctx.Done():
			for p.flush(part, q) {
			}
			return
		}
	}
}

// linger waits up to cluster.publish_linger for more submissions to q,
// while its batch is not full.
func (p *Publisher) linger(ctx context.Context, q *queue) {
	if p.cfg.PublishLinger <= 0 {
		return
	}
	t := time.NewTimer(p.cfg.PublishLinger)
	defer t.Stop()
	for {
		q.mu.Lock()
		full := len(q.rs) >= p.maxBatch
		q.mu.Unlock()
		if full {
			return
		}
		select {
		case <-t.C:
			return
		case <-ctx.Done():
			return
		case <-q.kick:
		}
	}
}

// flush publishes the first batch of q and tells its submitters the
// outcome; false when q was empty.
func (p *Publisher) flush(part int, q *queue) bool {
	q.mu.Lock()
	n, w := 0, 0
	for w < len(q.waiters) && (w == 0 || n+q.waiters[w].n <= p.maxBatch) {
		n += q.waiters[w].n
		w++
	}
	if w == 0 {
		q.mu.Unlock()
		return false
	}
	payload := AppendBatch(nil, q.rs[:n])
	waiters := q.waiters[:w:w]
	q.rs = append(q.rs[:0], q.rs[n:]...)
	q.waiters = append([]waiter(nil), q.waiters[w:]...)
	q.mu.Unlock()
	failAll(waiters, p.publish(part, payload))
	p.m.batchReadings.Observe(float64(n))
	return true
}

// publish appends one batch and waits for its acknowledgement, bounded by
// cluster.publish_timeout (and not by the run's context: a batch published
// at shutdown still gets its answer).
func (p *Publisher) publish(part int, payload []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.PublishTimeout+time.Second)
	defer cancel()
	id := p.id + "." + strconv.FormatUint(p.seq.Add(1), 36)
	wait, err := p.log.Append(ctx, part, id, payload)
	if err != nil {
		return err
	}
	return wait(ctx)
}

// failAll sends err (nil: success) to each waiter.
func failAll(ws []waiter, err error) {
	for _, w := range ws {
		w.done <- err
	}
}
