package pipeline

import (
	"context"
	"fmt"
	"sync"
)

// Where submitted readings landed in the journal, and waiting until a sink
// has written them. In cluster mode the node's journal is only a buffer: a
// partition's owner may let JetStream forget a batch only once the shared
// store has its readings (cluster.ack_after_sinks). The owner records a Mark
// of what it submitted and waits for the store's sink to pass it.

// Mark is, per shard, the journal position a sink's cursor must reach for a
// set of journaled readings to be written by that sink; 0 asks nothing of
// that shard, and a nil Mark nothing at all. A Mark belongs to the pipeline
// that made it.
type Mark []uint64

// Landed returns m extended by where rs landed: readings journaled by
// Submit calls that returned nil (Submit sets each reading's Seq to its
// record's position). rs may hold any devices' readings. m is extended in
// place when it is not nil.
func (p *Pipeline) Landed(m Mark, rs []Reading) Mark {
	if len(rs) == 0 {
		return m
	}
	m = p.mark(m)
	shard := 0
	for i, r := range rs {
		if i == 0 || r.Device != rs[i-1].Device {
			shard = p.ShardOf(r.Device)
		}
		m[shard] = max(m[shard], r.Seq+1) // a cursor past the record's first byte is past the record
	}
	return m
}

// Tail returns m extended by the end of every shard's journal now: a sink
// that passed it has written everything journaled so far. It is the mark of
// readings known to be journaled whose positions are not known.
func (p *Pipeline) Tail(m Mark) Mark {
	m = p.mark(m)
	for i, s := range p.shards {
		m[i] = max(m[i], s.j.written.Load())
	}
	return m
}

func (p *Pipeline) mark(m Mark) Mark {
	if m == nil {
		m = make(Mark, len(p.shards))
	}
	return m
}

// WaitCommitted returns nil once the sink named sink has written everything
// before m (its Write returned for those readings, or refused them for good:
// see Sink) in every shard. It sleeps until the sink commits a batch, and
// returns ctx's error when ctx is done first, an error wrapping ErrClosed
// when the pipeline's sinks stopped before they got there, and an error for
// a sink the pipeline does not have.
func (p *Pipeline) WaitCommitted(ctx context.Context, sink string, m Mark) error {
	var st *sinkState
	for _, s := range p.sinks {
		if s.name == sink {
			st = s
		}
	}
	if st == nil {
		return fmt.Errorf("pipeline: no sink named %q to wait for", sink)
	}
	for {
		committed, stopped := st.commit.next() // before the check: no commit is missed
		if st.passed(m) {
			return nil
		}
		if stopped {
			return fmt.Errorf("%w: sink %s stopped before it wrote the readings waited for", ErrClosed, sink)
		}
		select {
		case <-committed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// passed reports whether the sink's cursor is at or past m in every shard.
func (st *sinkState) passed(m Mark) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	for s, pos := range m {
		if s < len(st.pos) && st.pos[s] < pos {
			return false
		}
	}
	return true
}

// stopCommitSignals wakes the waiters of every sink for good: the sinks have
// stopped (or never ran) and their cursors move no more.
func (p *Pipeline) stopCommitSignals() {
	for _, st := range p.sinks {
		st.commit.stop()
	}
}

// commitSignal wakes the waiters of a sink's commits. The zero value is
// ready; it costs a channel per commit only while someone waits. A commit
// wakes every waiter, and each checks its own Mark: the waiters are few (in
// cluster mode one per owned partition, as a partition's acker awaits only
// its oldest batch), so waking only those whose Mark was passed would
// save little for its bookkeeping.
type commitSignal struct {
	mu      sync.Mutex
	ch      chan struct{} // closed at the next commit; nil: nobody waits
	stopped bool
}

// next returns a channel closed at the next commit, and whether the sink has
// stopped for good.
func (c *commitSignal) next() (<-chan struct{}, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch == nil {
		c.ch = make(chan struct{})
	}
	return c.ch, c.stopped
}

// wake tells the waiters that the cursor moved.
func (c *commitSignal) wake() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch != nil {
		close(c.ch)
		c.ch = nil
	}
}

// stop wakes the waiters and tells them the cursor will not move again.
func (c *commitSignal) stop() {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
	c.wake()
}
