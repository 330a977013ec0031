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

// Feed is the Handler that moves a partition's batches into the node's
// local pipeline: it decodes them, drops the readings that are redelivered
// duplicates and puts each device's readings in time order (a Dedupe per
// partition, new on each gain), and submits them one device at a time. It
// returns nil, and so lets the owner acknowledge the batches to JetStream,
// only when every reading is in the local journal.
type Feed struct {
	sub        Submitter
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

// NewFeed builds a feed into sub; window and maxDevices are each
// partition's Dedupe bounds.
func NewFeed(sub Submitter, window, maxDevices int, log *slog.Logger, m *Metrics) (*Feed, error) {
	if _, err := NewDedupe(window, maxDevices, nil); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Feed{sub: sub, window: window, maxDevices: maxDevices, log: log, m: m, dedupe: map[int]*Dedupe{}}, nil
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
func (f *Feed) Handle(ctx context.Context, msgs []Message) error {
	if len(msgs) == 0 {
		return nil
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
	rs = f.filter(p).Filter(rs)
	if err := f.submit(ctx, rs); err != nil {
		// The filter remembers readings that may not be journaled: a new
		// one, so that the retry passes them all (a reading journaled twice
		// is the same sample twice; the stores keep one).
		f.Owned(p, true)
		return fmt.Errorf("partition %d: %w", p, err)
	}
	f.m.fed.Add(float64(len(rs)))
	if f.barrier != nil {
		if err := f.barrier(ctx); err != nil {
			return fmt.Errorf("partition %d: %w", p, err)
		}
	}
	return nil
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
