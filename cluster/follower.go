package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/internal/backoff"
	"github.com/citypulse/citypulse/pipeline"
)

// FollowerConsumer is the durable consumer of the store follower on a
// standby site's mirror of the readings stream, and FollowerGroup its
// priority group: one node of the site holds its pin.
const (
	FollowerConsumer = "citypulse-store-follower"
	FollowerGroup    = "store-follower"
)

// Follower keeps a standby site's store current (docs/disaster-recovery.md):
// it consumes the site's mirror of the readings stream and writes the
// readings straight to the site's shared store sinks, acknowledging a
// message only once every sink stored it (a store outage is retried with
// backoff, nothing is skipped). Nothing else happens to the readings at a
// standby: no rules, no notifications. The consumer is pinned (a priority
// group), so one node of the site follows; another takes over PinnedTTL
// after it stops pulling. At a promotion the follower is stopped and its
// AckFloor bounds where the owners start (every message up to it is in the
// store).
type Follower struct {
	js    jetstream.JetStream
	cfg   Config
	sinks []pipeline.Sink
	log   *slog.Logger
	m     *followerMetrics
	sleep func(ctx context.Context, d time.Duration) bool // false: ctx ended

	mu sync.Mutex
	st FollowerStatus
}

// FollowerStatus is the follower's part of /api/v1/cluster's dr object.
// LagMessages is the mirror's messages not yet in the store (pending and
// delivered unacknowledged, as of the last check, once a second);
// SecondsBehind is 0 when none is, else an upper bound on the age of what
// the store lacks: the time since the store last held everything, since the
// last message it stored was stored at the source, or since the follower
// started, whichever is the latest.
type FollowerStatus struct {
	Following        bool    `json:"following"` // this node's follower runs (it may not hold the pin)
	ReadingsFollowed uint64  `json:"readings_followed"`
	AckFloor         uint64  `json:"ack_floor"`
	LagMessages      uint64  `json:"lag_messages"`
	SecondsBehind    float64 `json:"seconds_behind"`
	StoreRetries     uint64  `json:"store_retries"`
	Error            string  `json:"error,omitempty"`
}

type followerMetrics struct {
	readings, retries, refused prometheus.Counter
	lagMsgs, lagSec, following prometheus.Gauge
}

func newFollowerMetrics(reg prometheus.Registerer) *followerMetrics {
	m := &followerMetrics{
		readings: prometheus.NewCounter(prometheus.CounterOpts{Name: "citypulse_dr_follower_readings_total",
			Help: "Readings the standby site's store follower wrote to the site's store."}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{Name: "citypulse_dr_follower_store_retries_total",
			Help: "Failed writes of the store follower to a sink, retried with backoff."}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "citypulse_dr_follower_refused_total",
			Help: "Readings a sink refused for their own sake (permanent errors), counted and not retried."}),
		lagMsgs: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_dr_follower_lag_messages",
			Help: "Messages of the readings mirror not yet written to the standby site's store."}),
		lagSec: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_dr_follower_lag_seconds",
			Help: "How far the standby site's store is behind its readings mirror: 0 when caught up, else the time since it last was (or since the last message it stored was stored at the source, if later)."}),
		following: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_dr_follower_running",
			Help: "1 while this node's store follower runs (the site is a standby)."}),
	}
	if reg != nil {
		reg.MustRegister(m.readings, m.retries, m.refused, m.lagMsgs, m.lagSec, m.following)
	}
	return m
}

// NewFollower builds a follower of cfg.Stream on nc writing to sinks. It
// starts nothing; Run follows.
func NewFollower(nc *nats.Conn, cfg Config, sinks []pipeline.Sink, reg prometheus.Registerer, log *slog.Logger) (*Follower, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(sinks) == 0 {
		return nil, errors.New("store follower: no sink to write to")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("store follower: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Follower{js: js, cfg: cfg, sinks: sinks, log: log, m: newFollowerMetrics(reg), sleep: backoff.Sleep}, nil
}

// Status is the follower's state as of its last check.
func (f *Follower) Status() FollowerStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st
}

func (f *Follower) update(fn func(st *FollowerStatus)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(&f.st)
}

// Run follows until ctx is done. It creates the consumer only on a mirror
// (a site that is active has no business following its own stream) and
// waits while the stream is absent or not a mirror.
func (f *Follower) Run(ctx context.Context) error {
	f.m.following.Set(1)
	f.update(func(st *FollowerStatus) { st.Following = true })
	defer func() {
		f.m.following.Set(0)
		f.update(func(st *FollowerStatus) { st.Following = false })
	}()
	started := time.Now()
	wait := 200 * time.Millisecond
	for ctx.Err() == nil {
		c, err := f.consumer(ctx)
		if err == nil {
			f.update(func(st *FollowerStatus) { st.Error = "" })
			err = f.follow(ctx, c, started)
		}
		if ctx.Err() != nil {
			return nil
		}
		f.update(func(st *FollowerStatus) { st.Error = err.Error() })
		f.log.Warn("store follower: retrying", "err", err, "retry_in", wait)
		if !f.sleep(ctx, wait) {
			return nil
		}
		wait = min(2*wait, 5*time.Second)
	}
	return nil
}

// consumer creates or binds the follower's consumer on the mirror.
func (f *Follower) consumer(ctx context.Context) (jetstream.Consumer, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := f.js.Stream(ctx, f.cfg.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", f.cfg.Stream, err)
	}
	if st.CachedInfo().Config.Mirror == nil {
		return nil, fmt.Errorf("stream %s is not a mirror: nothing to follow", f.cfg.Stream)
	}
	return st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable:        FollowerConsumer,
		Description:    "CityPulse standby site: the readings written to the site's store",
		AckPolicy:      jetstream.AckExplicitPolicy,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckWait:        f.cfg.AckWait,
		MaxAckPending:  f.cfg.MaxAckPending,
		MaxDeliver:     -1,
		PriorityPolicy: jetstream.PriorityPolicyPinned,
		PriorityGroups: []string{FollowerGroup},
		PinnedTTL:      f.cfg.PinnedTTL,
	})
}

// followWait is how long one pull waits for a full batch.
const followWait = 250 * time.Millisecond

// follow fetches bounded batches (cluster.max_batch messages) and stores
// them until ctx is done or the consumer fails.
func (f *Follower) follow(ctx context.Context, c jetstream.Consumer, started time.Time) error {
	// lastStored: the stream time of the last message stored; caughtUp:
	// when the store last held everything the mirror had.
	var lastCheck, lastStored, caughtUp time.Time
	for ctx.Err() == nil {
		// A pull returns when it has MaxBatch messages or its wait is over:
		// a short wait keeps the store's lag short at a low write rate (and
		// renews the pin well within PinnedTTL).
		batch, err := c.Fetch(f.cfg.MaxBatch, jetstream.FetchPriorityGroup(FollowerGroup),
			jetstream.FetchMaxWait(followWait))
		if err != nil {
			return fmt.Errorf("fetch: %w", err)
		}
		var msgs []jetstream.Msg
		for m := range batch.Messages() {
			msgs = append(msgs, m)
		}
		if len(msgs) > 0 {
			if err := f.store(ctx, msgs); err != nil {
				return err
			}
			if md, err := msgs[len(msgs)-1].Metadata(); err == nil {
				lastStored = md.Timestamp
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrPinIDMismatch) {
			return fmt.Errorf("fetch: %w", err)
		}
		if time.Since(lastCheck) >= time.Second {
			lastCheck = time.Now()
			if f.check(ctx, c, lastStored, caughtUp, started) {
				caughtUp = lastCheck
			}
		}
	}
	return nil
}

// store decodes msgs and writes their readings to every sink, retrying a
// failed sink with backoff until it succeeds (or ctx ends), then
// acknowledges them.
func (f *Follower) store(ctx context.Context, msgs []jetstream.Msg) error {
	var rs []pipeline.Reading
	for _, m := range msgs {
		var err error
		if rs, err = DecodeBatch(m.Data(), rs); err != nil {
			// Not a batch this version can read: it can never be stored.
			f.log.Error("store follower: undecodable message skipped", "subject", m.Subject(), "err", err)
		}
	}
	done := make([]bool, len(f.sinks))
	wait := 100 * time.Millisecond
	for {
		var failed error
		for i, s := range f.sinks {
			if done[i] {
				continue
			}
			err := s.Write(ctx, pipeline.Batch{Shard: -1, Readings: rs})
			var dropped interface{ Dropped() int }
			switch {
			case err == nil:
				done[i] = true
			case errors.Is(err, pipeline.ErrPermanent):
				n := len(rs)
				if errors.As(err, &dropped) {
					n = dropped.Dropped()
				}
				f.m.refused.Add(float64(n))
				f.log.Warn("store follower: the store refused readings", "sink", s.Name(), "readings", n, "err", err)
				done[i] = true
			default:
				failed = fmt.Errorf("sink %s: %w", s.Name(), err)
			}
		}
		if failed == nil {
			break
		}
		f.m.retries.Inc()
		f.update(func(st *FollowerStatus) { st.StoreRetries++; st.Error = failed.Error() })
		f.log.Warn("store follower: store write failed; retrying the batch", "err", failed, "retry_in", wait)
		for _, m := range msgs {
			_ = m.InProgress() // not redelivered meanwhile
		}
		if !f.sleep(ctx, wait) {
			return ctx.Err()
		}
		wait = min(2*wait, 5*time.Second)
	}
	for _, m := range msgs {
		if err := m.Ack(); err != nil {
			return fmt.Errorf("ack: %w", err)
		}
	}
	f.m.readings.Add(float64(len(rs)))
	f.update(func(st *FollowerStatus) { st.ReadingsFollowed += uint64(len(rs)); st.Error = "" })
	return nil
}

// check reads the consumer's info: the lag and the ack floor. It reports
// whether the store holds everything the mirror has (lag 0).
func (f *Follower) check(ctx context.Context, c jetstream.Consumer, lastStored, caughtUp, started time.Time) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := c.Info(ctx)
	if err != nil {
		return false
	}
	lag := info.NumPending + uint64(info.NumAckPending)
	var behind float64
	if lag > 0 {
		ref := started
		if lastStored.After(ref) {
			ref = lastStored
		}
		if caughtUp.After(ref) {
			ref = caughtUp
		}
		behind = time.Since(ref).Seconds()
	}
	f.m.lagMsgs.Set(float64(lag))
	f.m.lagSec.Set(behind)
	f.update(func(st *FollowerStatus) {
		st.LagMessages, st.SecondsBehind, st.AckFloor = lag, behind, info.AckFloor.Stream
	})
	return lag == 0
}

// FollowedFloor returns the stream sequence up to which the follower's
// consumer on stream has acknowledged every message (so the site's store
// holds it), and false when the consumer does not exist (no follower ran).
func FollowedFloor(ctx context.Context, js jetstream.JetStream, stream string) (uint64, bool, error) {
	c, err := js.Consumer(ctx, stream, FollowerConsumer)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("store follower consumer on %s: %w", stream, err)
	}
	return c.CachedInfo().AckFloor.Stream, true, nil
}
