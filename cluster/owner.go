package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
)

// Message is one batch delivered to the owner of its partition.
type Message struct {
	Partition int
	// Seq is the batch's stream sequence: increasing in publish order.
	Seq uint64
	// Delivered counts deliveries of this batch (> 1: redelivered after a
	// failure or a hand-over; the handler may have seen it before).
	Delivered uint64
	// MsgID is the Nats-Msg-Id the batch was published with ("" if none).
	MsgID string
	Data  []byte
}

// Handler handles a partition's batches, in stream order, one call at a
// time per partition. On an error they are retried (with backoff) while the
// node still owns the partition. It must return within cluster.ack_wait or
// the batches are delivered again (to this node or, after a hand-over, to
// another one). When it returns nil the batches are acknowledged once the
// Commit it returned (if not nil) returned nil; meanwhile the next calls
// go on.
type Handler func(ctx context.Context, msgs []Message) (Commit, error)

// Commit waits until the readings of the batches a Handler took are where
// JetStream may forget them (the shared store), or ctx is done. It may be
// called again after an error.
type Commit func(ctx context.Context) error

// OwnershipFunc is told when the node gains (owned) or loses a partition. It
// is called from the partition's goroutine, before the first batch it gains
// and after the last one it handles.
type OwnershipFunc func(partition int, owned bool)

// Owner consumes the partitions this node owns. Each partition has a durable
// pull consumer in a priority group with the pinned-client policy: JetStream
// delivers a partition's batches to one client at a time and moves the pin to
// another waiting client only when the pinned one stopped pulling for
// cluster.pinned_ttl, or was unpinned (on a clean release). Which node waits
// on which partition is decided by heartbeats (see members): the live nodes
// are those heard of within cluster.alive_timeout, and each pulls the
// partitions rendezvous hashing prefers it for among them (Assign). A node
// that owns a partition another live node now prefers keeps it until that
// node pulls it, then releases it: partitions follow the nodes that join
// and leave.
type Owner struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	cfg     Config
	handle  Handler
	onOwned OwnershipFunc
	log     *slog.Logger
	m       *Metrics
	members *members
	owned   []atomic.Bool // partition → pinned to this node now
	pulling []atomic.Bool // partition → this node pulls it (owns it, or stands by for the pin)
	start   StartFunc     // see SetStart
}

// StartFunc returns the stream sequence up to which partition p's batches
// were handled already (0: none known), for a consumer being created.
type StartFunc func(ctx context.Context, p int) (uint64, error)

// SetStart sets where a partition consumer that does not exist yet starts:
// after the sequence f returns (at the stream's start if 0). A promoted
// standby site has the readings and the state mirrored but no consumers;
// without it, its owners would replay the whole stream. An existing
// consumer keeps its position. Call it before Run.
func (o *Owner) SetStart(f StartFunc) { o.start = f }

// NewOwner builds an owner on nc. It starts nothing; Run consumes.
func NewOwner(nc *nats.Conn, cfg Config, handle Handler, onOwned OwnershipFunc, log *slog.Logger, m *Metrics) (*Owner, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if handle == nil {
		return nil, errors.New("cluster owner: a handler is required")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("cluster owner: %w", err)
	}
	if onOwned == nil {
		onOwned = func(int, bool) {}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Owner{nc: nc, js: js, cfg: cfg, handle: handle, onOwned: onOwned, log: log, m: m,
		members: newMembers(cfg.NodeID, cfg.Partitions, cfg.AliveTimeout), owned: make([]atomic.Bool, cfg.Partitions), pulling: make([]atomic.Bool, cfg.Partitions)}, nil
}

// consumerConfig is partition p's consumer.
func (o *Owner) consumerConfig(p int) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:        consumerName(p),
		FilterSubject:  Subject(p),
		AckPolicy:      jetstream.AckExplicitPolicy,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckWait:        o.cfg.AckWait,
		MaxAckPending:  o.cfg.MaxAckPending,
		MaxDeliver:     -1, // a batch is never given up on: the handler's errors are the store's, not the batch's
		PriorityPolicy: jetstream.PriorityPolicyPinned,
		PriorityGroups: []string{o.cfg.Group},
		PinnedTTL:      o.cfg.PinnedTTL,
		Replicas:       0, // as the stream
	}
}

// Run creates or updates the stream and the partition consumers, then
// consumes until ctx is done. On return every partition it owned was
// released (UnpinConsumer), so another node takes it over at once.
func (o *Owner) Run(ctx context.Context) error {
	cons, err := o.setup(ctx)
	if err != nil || ctx.Err() != nil {
		return err
	}
	sub, err := o.members.listen(o.nc, o.log)
	if err != nil {
		return fmt.Errorf("subscribe to cluster heartbeats: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	o.members.start()

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { o.members.announce(gctx, o.nc, o.cfg.AliveInterval, o.Owned, o.Pulling, o.m); return nil })
	for p := range cons {
		g.Go(func() error { return o.runPartition(gctx, p, cons[p]) })
	}
	err = g.Wait()
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		err = nil
	}
	return err
}

// setup creates or updates the stream and the partition consumers. JetStream
// may be unavailable for a while (a server restarting, no quorum yet): it
// retries with backoff until ctx is done, and fails only for a refused config.
func (o *Owner) setup(ctx context.Context) ([]jetstream.Consumer, error) {
	cons := make([]jetstream.Consumer, o.cfg.Partitions)
	backoff := 200 * time.Millisecond
	for p := -1; p < len(cons); {
		var err error
		if p < 0 {
			_, err = ensureStream(ctx, o.js, o.cfg)
		} else {
			cons[p], err = o.ensureConsumer(ctx, p)
		}
		if err == nil {
			p++
			continue
		}
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && apiErr.Code == 400 {
			return nil, err // the server refuses the config itself: retrying cannot help
		}
		o.log.Warn("JetStream not available for the partition consumers; retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil, nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	return cons, nil
}

// ensureConsumer creates or updates p's consumer; a new one starts where
// o.start says, an existing one keeps its delivery policy (JetStream
// refuses to change it).
func (o *Owner) ensureConsumer(ctx context.Context, p int) (jetstream.Consumer, error) {
	cfg := o.consumerConfig(p)
	c, err := o.js.Consumer(ctx, o.cfg.Stream, cfg.Durable)
	switch {
	case err == nil:
		old := c.CachedInfo().Config
		cfg.DeliverPolicy, cfg.OptStartSeq = old.DeliverPolicy, old.OptStartSeq
	case !errors.Is(err, jetstream.ErrConsumerNotFound):
		return nil, fmt.Errorf("consumer %s: %w", cfg.Durable, err)
	case o.start != nil:
		seq, err := o.start(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("consumer %s: where to start: %w", cfg.Durable, err)
		}
		if seq > 0 {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, seq+1
			o.log.Info("partition consumer created after the handled position", "partition", p, "start_seq", seq+1)
		}
	}
	c, err = o.js.CreateOrUpdateConsumer(ctx, o.cfg.Stream, cfg)
	if err != nil {
		return nil, fmt.Errorf("create or update consumer %s: %w", cfg.Durable, err)
	}
	return c, nil
}

// runPartition pulls partition p whenever this node should, until ctx is done.
func (o *Owner) runPartition(ctx context.Context, p int, c jetstream.Consumer) error {
	t := time.NewTicker(o.cfg.AliveInterval / 2)
	defer t.Stop()
	for {
		if o.members.shouldPull(p, false) {
			o.pulling[p].Store(true)
			err := o.consume(ctx, p, c)
			o.pulling[p].Store(false)
			if err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// partition is the state of one partition while this node pulls it.
type partition struct {
	p    int
	c    jetstream.Consumer
	msgs chan jetstream.Msg
	// lost is signalled (without blocking) by the library's error handler
	// when JetStream moved the pin away; lostSeen records that settle or
	// deliver took the signal, for take to act on it. The signal is never
	// put back into lost: the handler may have filled it again meanwhile,
	// and the consume loop (the only reader) is the caller.
	lost     chan struct{}
	lostSeen bool
	stop     chan struct{}
	owned    bool
	acks     *acker // the handled batches waiting for their commit (acker.go)
}

// consume pulls p until ctx is done or this node should no longer pull it.
func (o *Owner) consume(ctx context.Context, p int, c jetstream.Consumer) error {
	st := &partition{p: p, c: c, msgs: make(chan jetstream.Msg, o.cfg.MaxBatch),
		lost: make(chan struct{}, 1), stop: make(chan struct{}), acks: newAcker(p, o.cfg.AckWait, o.cfg.MaxAckPending, o.log, o.m)}
	expiry := max(o.cfg.PinnedTTL/2, time.Second)
	cc, err := c.Consume(func(m jetstream.Msg) {
		select {
		case st.msgs <- m:
		case <-st.stop:
			// Released: given back at once, so that the next owner gets it
			// before newer batches instead of after cluster.ack_wait.
			_ = m.Nak()
		}
	},
		jetstream.PullPriorityGroup(o.cfg.Group),
		jetstream.PullMaxMessages(o.cfg.MaxBatch),
		// A pinned client that sends no pull request for PinnedTTL loses the
		// pin: an idle one must renew its request well before.
		jetstream.PullExpiry(expiry),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if errors.Is(err, jetstream.ErrPinIDMismatch) {
				select {
				case st.lost <- struct{}{}:
				default:
				}
			}
		}))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		o.log.Warn("cannot pull partition; retrying", "partition", p, "err", err)
		return nil
	}
	actx, stopAcks := context.WithCancel(context.WithoutCancel(ctx))
	acked := make(chan struct{})
	go func() { defer close(acked); st.acks.run(actx) }()
	defer o.stopConsuming(st, cc, func() { st.acks.finish(o.cfg.AckWait/2, stopAcks, acked) })
	closed := cc.Closed()
	t := time.NewTicker(o.cfg.AliveInterval / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-closed:
			// Ended by the library (consumer deleted, connection closed):
			// runPartition starts pulling again if it still should.
			o.log.Warn("pulling a partition stopped; starting again", "partition", p)
			return nil
		case <-t.C:
			if !o.members.shouldPull(p, st.owned) {
				return nil // another live node prefers p (and pulls it, if p is owned here)
			}
		case <-st.lost:
			o.lose(st)
		case m := <-st.msgs:
			o.take(ctx, st, m)
		}
	}
}

// lose records that another node took p's pin.
func (o *Owner) lose(st *partition) {
	if !st.owned {
		return
	}
	st.owned = false
	o.owned[st.p].Store(false)
	o.m.owned.Dec()
	o.m.changes.WithLabelValues("lost").Inc()
	o.log.Info("partition lost to another node", "partition", st.p)
	o.onOwned(st.p, false)
}

// take hands m, and what waits behind it, to the handler in chunks of
// cluster.max_batch; the first batch after gaining p waits until it is
// settled (no older batch outstanding).
func (o *Owner) take(ctx context.Context, st *partition, m jetstream.Msg) {
	batch := []jetstream.Msg{m}
	first := !st.owned
	if first {
		st.owned = true
		o.owned[st.p].Store(true)
		o.m.owned.Inc()
		o.m.changes.WithLabelValues("gained").Inc()
		o.log.Info("partition gained", "partition", st.p)
		batch = append(batch, o.holding(st, func() { o.onOwned(st.p, true) })...)
		var settled bool
		if batch, settled = o.settle(ctx, st, batch); !settled {
			nakAll(batch) // ctx done or lost: to the next owner at once
			o.loseIfSeen(st)
			return
		}
	} else {
		batch = drain(st.msgs, batch, o.cfg.MaxBatch)
	}
	for len(batch) > 0 {
		n := chunkEnd(batch, o.cfg.MaxBatch)
		if !o.deliver(ctx, st, batch[:n]) {
			nakAll(batch) // ctx done or lost: to the next owner at once
			o.loseIfSeen(st)
			return
		}
		if first {
			// The end of a hand-over: the tests and the operators measure it.
			o.log.Info("partition taken over: first batches handled", "partition", st.p, "batches", n)
			first = false
		}
		batch = batch[n:]
	}
}

// holding runs f (the gain's hooks: a state restore may take up to 30 s)
// while it takes p's deliveries off st.msgs, and returns them. The library
// calls the consume callback and sends the next pull request from one
// goroutine, so a callback blocked on a full st.msgs for cluster.pinned_ttl
// would cost the pin (and a restore on the next gain). The batches taken
// are kept in progress meanwhile (no redelivery); JetStream delivers at
// most cluster.max_ack_pending of them.
func (o *Owner) holding(st *partition, f func()) []jetstream.Msg {
	done, out := make(chan struct{}), make(chan []jetstream.Msg)
	go func() {
		var held []jetstream.Msg
		t := time.NewTicker(o.cfg.AckWait / 2)
		defer t.Stop()
		for {
			select {
			case m := <-st.msgs:
				held = append(held, m)
			case <-t.C:
				for _, m := range held {
					_ = m.InProgress()
				}
			case <-done:
				out <- held
				return
			}
		}
	}()
	f()
	close(done)
	return <-out
}

// loseIfSeen records the loss of p that settle or deliver saw.
func (o *Owner) loseIfSeen(st *partition) {
	if st.lostSeen {
		st.lostSeen = false
		o.lose(st)
	}
}

// stopConsuming ends pulling p. The batches handled and waiting for their
// commit get up to ack_wait/2 to be acknowledged (finishAcks); those that
// do not, and the batches delivered and not handled (in the library's
// buffer or in st.msgs), are given back with a Nak before the consumer is
// unpinned: they are then delivered again ahead of newer ones, and the next
// owner need not wait cluster.ack_wait for them (see settle).
func (o *Owner) stopConsuming(st *partition, cc jetstream.ConsumeContext, finishAcks func()) {
	close(st.stop) // from now on the callback naks what it gets
	cc.Drain()     // the buffered batches go through the callback
	select {
	case <-cc.Closed():
	case <-time.After(2 * time.Second):
		cc.Stop()
		<-cc.Closed()
	}
	for {
		select {
		case m := <-st.msgs:
			_ = m.Nak()
			continue
		default:
		}
		break
	}
	finishAcks()
	if st.owned {
		o.release(st)
	}
}

// release hands p back: after the last batch was handled, unpin the consumer
// so a waiting node is pinned at once instead of after PinnedTTL.
func (o *Owner) release(st *partition) {
	st.owned = false
	o.owned[st.p].Store(false)
	o.m.owned.Dec()
	o.m.changes.WithLabelValues("released").Inc()
	o.onOwned(st.p, false)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := o.js.Stream(ctx, o.cfg.Stream)
	if err == nil {
		err = s.UnpinConsumer(ctx, consumerName(st.p), o.cfg.Group)
	}
	if err != nil {
		o.log.Warn("cannot unpin partition; another node takes it after cluster.pinned_ttl", "partition", st.p, "err", err)
		return
	}
	o.log.Info("partition released", "partition", st.p)
}

// settle holds back the first call of the handler after a gain until the
// batches still unacknowledged on p's consumer are all here, then sorts them
// by stream sequence. The previous owner may have had batches delivered and
// not acknowledged: given back (Nak) on a clean release, or redelivered
// after cluster.ack_wait when it died or when they were in flight to it.
// They come to this node again, possibly after newer ones; handling a newer
// one first would break the partition's order. The check: the consumer's
// num_ack_pending, asked after the batches held here were received, is no
// more than their number, so no older batch is outstanding elsewhere; later
// deliveries are new batches (newer) or repeats of held ones. It collects
// for cluster.settle at least, and gives up waiting after 2 × ack_wait (a
// batch acknowledged late by a previous owner can make the count disagree).
// ok is false if ctx is done or p was lost meanwhile.
func (o *Owner) settle(ctx context.Context, st *partition, batch []jetstream.Msg) (_ []jetstream.Msg, ok bool) {
	start := time.Now()
	deadline := start.Add(2 * o.cfg.AckWait)
	wait := o.cfg.Settle
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
		collect:
			for {
				select {
				case m := <-st.msgs:
					batch = append(batch, m)
				case <-t.C:
					break collect
				case <-ctx.Done():
					t.Stop()
					return batch, false
				case <-st.lost:
					t.Stop()
					st.lostSeen = true
					return batch, false
				}
			}
		}
		batch = append(batch, drainAll(st.msgs)...)
		held := distinctSeqs(batch)
		pending, err := o.ackPending(ctx, st.c)
		if err == nil && pending <= held {
			break
		}
		if time.Now().After(deadline) {
			o.log.Warn("partition gained with batches outstanding elsewhere; handling on, out of order if they come", "partition", st.p, "held", held, "ack_pending", pending, "err", err)
			break
		}
		wait = settlePoll
	}
	slices.SortStableFunc(batch, func(a, b jetstream.Msg) int { return cmp.Compare(streamSeq(a), streamSeq(b)) })
	o.log.Info("partition settled", "partition", st.p, "batches", len(batch), "waited", time.Since(start))
	return batch, true
}

// settlePoll is how often settle asks for the consumer's state.
const settlePoll = 20 * time.Millisecond

// ackPending asks JetStream how many of c's batches are delivered and not
// acknowledged.
func (o *Owner) ackPending(ctx context.Context, c jetstream.Consumer) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	info, err := c.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.NumAckPending, nil
}

// deliver hands a batch to the handler until it succeeds, then queues it to
// be acknowledged once its commit returns (acker.go). While it fails, the
// batch is kept in progress (no redelivery) and retried with backoff,
// unless the partition was lost or ctx is done: then it returns false, the
// batch not acknowledged. Repeats of a batch in batch (adjacent: sorted)
// are handed over once and all acknowledged.
func (o *Owner) deliver(ctx context.Context, st *partition, batch []jetstream.Msg) bool {
	msgs := make([]Message, 0, len(batch))
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			o.log.Warn("batch without JetStream metadata; terminated", "partition", st.p, "err", err)
			_ = m.Term()
			continue
		}
		if md.NumDelivered > 1 {
			o.m.redelivered.Inc()
		}
		if len(msgs) > 0 && msgs[len(msgs)-1].Seq == md.Sequence.Stream {
			continue
		}
		msgs = append(msgs, Message{Partition: st.p, Seq: md.Sequence.Stream, Delivered: md.NumDelivered,
			MsgID: m.Headers().Get(jetstream.MsgIDHeader), Data: m.Data()})
	}
	backoff := 100 * time.Millisecond
	taken := time.Now()
	for {
		commit, err := o.handle(ctx, msgs)
		if err == nil {
			st.acks.add(batch, commit, taken)
			return true
		}
		o.m.handlerErrs.Inc()
		o.log.Warn("partition handler failed; retrying", "partition", st.p, "batches", len(msgs), "err", err)
		for _, m := range batch {
			_ = m.InProgress()
		}
		taken = time.Now()
		select {
		case <-ctx.Done():
			return false
		case <-st.lost:
			st.lostSeen = true
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, o.cfg.AckWait/2)
	}
}
