package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/citypulse/citypulse/pipeline"
)

// Submitter is where an owner's readings go: the node's local pipeline,
// whose Submit returns once they are in its journal (durable by its fsync
// policy).
type Submitter interface {
	Submit(ctx context.Context, rs []pipeline.Reading) error
}

// Committer tells where readings submitted to the local pipeline landed and
// waits until a sink has written them: the pipeline's Landed, Tail and
// WaitCommitted (pipeline/committed.go).
type Committer interface {
	Landed(m pipeline.Mark, rs []pipeline.Reading) pipeline.Mark
	Tail(m pipeline.Mark) pipeline.Mark
	WaitCommitted(ctx context.Context, sink string, m pipeline.Mark) error
}

// FeedOptions configures a Feed.
type FeedOptions struct {
	// Window and MaxDevices bound each partition's Dedupe.
	Window, MaxDevices int
	// AckAfter names the local pipeline's sinks that must have written a
	// batch's readings before the batch is acknowledged to JetStream
	// (cluster.ack_after_sinks: the shared store's). Committer is then
	// required. Empty: a batch is acknowledged once its readings are in the
	// local journal, and is lost from the store if the node dies for good
	// before its sinks wrote it (docs/cluster.md, failure modes).
	AckAfter  []string
	Committer Committer
	Logger    *slog.Logger
	Metrics   *Metrics
}

// Feed is the Handler that moves a partition's batches into the node's
// local pipeline: it decodes them, drops the readings that are redelivered
// duplicates and puts each device's readings in time order (a Dedupe per
// partition, new on each gain), and submits them one device at a time. It
// returns nil when every reading is in the local journal, with a Commit that
// returns once the sinks of FeedOptions.AckAfter have written them: the
// owner acknowledges the batches to JetStream after that.
type Feed struct {
	sub        Submitter
	store      Committer
	ackAfter   []string
	window     int
	maxDevices int
	log        *slog.Logger
	m          *Metrics

	mu     sync.Mutex
	dedupe map[int]*Dedupe // partition → its filter while owned

	barrier func(ctx context.Context) error // see SetBarrier
}

// SetBarrier sets f to be called after a batch's readings are in the local
// journal (and seen by its observers) and before the batch is acknowledged:
// the rules engine's Flush, so that the transitions the readings caused are
// recorded before JetStream forgets the readings. When it fails the batch
// is not acknowledged; its redelivery passes the filter as a duplicate and
// calls f again. Set it before the owner runs.
func (f *Feed) SetBarrier(barrier func(ctx context.Context) error) { f.barrier = barrier }

// feedParallel bounds the devices submitted at once by one handler call.
const feedParallel = 32

// NewFeed builds a feed into sub.
func NewFeed(sub Submitter, o FeedOptions) (*Feed, error) {
	if _, err := NewDedupe(o.Window, o.MaxDevices, nil); err != nil {
		return nil, err
	}
	if len(o.AckAfter) > 0 && o.Committer == nil {
		return nil, errors.New("cluster feed: acknowledging after sinks needs a Committer")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(nil)
	}
	return &Feed{sub: sub, store: o.Committer, ackAfter: o.AckAfter, window: o.Window, maxDevices: o.MaxDevices,
		log: o.Logger, m: o.Metrics, dedupe: map[int]*Dedupe{}}, nil
}

// Owned is the feed's OwnershipFunc: a gained partition starts with a new
// filter, a lost one forgets its filter.
func (f *Feed) Owned(p int, owned bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !owned {
		delete(f.dedupe, p)
		return
	}
	d, _ := NewDedupe(f.window, f.maxDevices, f.m)
	f.dedupe[p] = d
}

func (f *Feed) filter(p int) *Dedupe {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.dedupe[p]
	if !ok {
		d, _ = NewDedupe(f.window, f.maxDevices, f.m)
		f.dedupe[p] = d
	}
	return d
}

// Handle is the owner's Handler.
func (f *Feed) Handle(ctx context.Context, msgs []Message) (Commit, error) {
	if len(msgs) == 0 {
		return nil, nil
	}
	p := msgs[0].Partition
	var rs []pipeline.Reading
	for _, m := range msgs {
		var err error
		if rs, err = DecodeBatch(m.Data, rs); err != nil {
			// Not from a CityPulse gateway of this version: nothing to
			// retry. Counted and logged, then acknowledged.
			f.m.badBatches.Inc()
			f.log.Error("undecodable batch in the log; skipped", "partition", p, "seq", m.Seq, "msg_id", m.MsgID, "err", err)
		}
	}
	decoded := len(rs)
	rs = f.filter(p).Filter(rs)
	if err := f.submit(ctx, rs); err != nil {
		// The filter remembers readings that may not be journaled: a new
		// one, so that the retry passes them all (a reading journaled twice
		// is the same sample twice; the stores keep one).
		f.Owned(p, true)
		return nil, fmt.Errorf("partition %d: %w", p, err)
	}
	f.m.fed.Add(float64(len(rs)))
	if f.barrier != nil {
		if err := f.barrier(ctx); err != nil {
			return nil, fmt.Errorf("partition %d: %w", p, err)
		}
	}
	return f.commit(rs, len(rs) < decoded), nil
}

// commit is the Commit of readings rs just journaled: it waits until every
// sink of ackAfter has written them. dropped: some readings of the batches
// were dropped as duplicates of readings this node journaled before, whose
// positions are not known: then it waits for everything journaled so far
// (without that, a batch delivered again while its first delivery waits
// for the store would be acknowledged before the store has it).
func (f *Feed) commit(rs []pipeline.Reading, dropped bool) Commit {
	if len(f.ackAfter) == 0 || len(rs) == 0 && !dropped {
		return nil
	}
	mark := f.store.Landed(nil, rs)
	if dropped {
		mark = f.store.Tail(mark)
	}
	return func(ctx context.Context) error {
		for _, sink := range f.ackAfter {
			if err := f.store.WaitCommitted(ctx, sink, mark); err != nil {
				return err
			}
		}
		return nil
	}
}

// submit submits rs (sorted by device, then time): each device's readings
// in order, by runs of one kind and district, different devices at once.
func (f *Feed) submit(ctx context.Context, rs []pipeline.Reading) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(feedParallel)
	for start := 0; start < len(rs); {
		end := start + 1
		for end < len(rs) && rs[end].Device == rs[start].Device {
			end++
		}
		dev := rs[start:end]
		g.Go(func() error {
			for len(dev) > 0 {
				n := 1
				for n < len(dev) && dev[n].Kind == dev[0].Kind && dev[n].District == dev[0].District {
					n++
				}
				if err := f.sub.Submit(gctx, dev[:n]); err != nil {
					return err
				}
				dev = dev[n:]
			}
			return nil
		})
		start = end
	}
	err := g.Wait()
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}
