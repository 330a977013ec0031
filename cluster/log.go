package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrNotDurable wraps every append that JetStream did not acknowledge: the
// batch may or may not be stored, and the caller must not acknowledge it to
// the device (resending it with the same message id is safe within
// cluster.duplicate_window).
var ErrNotDurable = errors.New("batch not acknowledged by JetStream")

// Log appends encoded reading batches to the stream, one subject per
// partition. Appends are asynchronous with a bounded window of unacknowledged
// batches (cluster.max_in_flight); a batch is durable only when the wait
// function of its append returns nil, i.e. when JetStream acknowledged it
// (after a majority of the stream's replicas stored it).
type Log struct {
	cfg  Config
	js   jetstream.JetStream
	m    *Metrics
	sent sync.Map // *nats.Msg → time.Time, for the ack latency histogram
	opts []jetstream.PublishOpt
}

// NewLog builds a log publishing on nc. It starts nothing.
func NewLog(nc *nats.Conn, cfg Config, m *Metrics) (*Log, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	l := &Log{cfg: cfg, m: m}
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(cfg.MaxInFlight),
		jetstream.WithPublishAsyncTimeout(cfg.PublishTimeout),
		jetstream.WithPublishAsyncAckHandler(l.acked),
		jetstream.WithPublishAsyncErrHandler(l.failed))
	if err != nil {
		return nil, fmt.Errorf("cluster log: %w", err)
	}
	l.js = js
	// "No responders" is what a stream answers while its interest has not
	// reached this connection's server yet (just after it was created) or
	// while it elects a leader: resend, with the same message id (so never
	// stored twice), for up to half of publish_timeout.
	const retryWait = 100 * time.Millisecond
	l.opts = []jetstream.PublishOpt{jetstream.WithExpectStream(cfg.Stream), jetstream.WithStallWait(cfg.PublishTimeout),
		jetstream.WithRetryWait(retryWait), jetstream.WithRetryAttempts(max(2, int(cfg.PublishTimeout/retryWait/2)))}
	return l, nil
}

// JetStream is the log's JetStream context (to build an Owner on the same connection).
func (l *Log) JetStream() jetstream.JetStream { return l.js }

// EnsureStream creates the stream, or updates its limits and replicas to the
// config's. Subjects are citypulse.readings.* .
func (l *Log) EnsureStream(ctx context.Context) (jetstream.Stream, error) {
	return ensureStream(ctx, l.js, l.cfg)
}

func ensureStream(ctx context.Context, js jetstream.JetStream, cfg Config) (jetstream.Stream, error) {
	sc := jetstream.StreamConfig{
		Name:       cfg.Stream,
		Subjects:   []string{SubjectPrefix + ".*"},
		Storage:    jetstream.FileStorage,
		Replicas:   cfg.Replicas,
		Retention:  jetstream.LimitsPolicy,
		MaxAge:     cfg.MaxAge,
		MaxBytes:   cfg.MaxBytes,
		Discard:    jetstream.DiscardNew, // a full stream refuses appends: nothing is dropped silently
		Duplicates: cfg.DuplicateWindow,
	}
	if sc.MaxBytes == 0 {
		sc.MaxBytes = -1
	}
	for {
		s, err := js.CreateOrUpdateStream(ctx, sc)
		if err == nil {
			return s, waitForLeader(ctx, s)
		}
		if !peersOffline(err) {
			return nil, fmt.Errorf("create or update stream %s (%d replicas): %w", cfg.Stream, cfg.Replicas, err)
		}
		// A peer JetStream still thinks offline (a cluster starting, a node
		// restarting): it passes once the peer is seen again.
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("create or update stream %s (%d replicas): %w (%w)", cfg.Stream, cfg.Replicas, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// errNoSuitablePeers is JetStream's "no suitable peers for placement".
const errNoSuitablePeers jetstream.ErrorCode = 10005

func peersOffline(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == errNoSuitablePeers
}

// waitForLeader returns once a replicated stream has elected its leader: a
// stream just created answers no publish before that ("no response from
// stream"), and a gateway must not be told the log is ready when it is not.
func waitForLeader(ctx context.Context, s jetstream.Stream) error {
	for {
		info, err := s.Info(ctx)
		if err == nil && (info.Cluster == nil || info.Cluster.Leader != "") {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stream %s has no leader yet: %w", s.CachedInfo().Config.Name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Append publishes payload to partition p. msgID, if not empty, is the
// batch's Nats-Msg-Id: JetStream drops a copy with the same id published
// within cluster.duplicate_window (use one that names the batch, e.g. the
// gateway's id and its journal sequence). Append blocks while
// cluster.max_in_flight batches await their acknowledgement, up to
// cluster.publish_timeout (ctx is checked before, not during, that wait: the
// client library's stall does not take a context), and returns an error if
// the batch could not be sent. Otherwise wait returns nil once JetStream acknowledged the batch, or
// an error wrapping ErrNotDurable (no quorum, timeout, stream full, ...).
func (l *Log) Append(ctx context.Context, p int, msgID string, payload []byte) (wait func(context.Context) error, err error) {
	if p < 0 || p >= l.cfg.Partitions {
		return nil, fmt.Errorf("append to partition %d: want [0, %d)", p, l.cfg.Partitions)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	msg := &nats.Msg{Subject: Subject(p), Data: payload}
	opts := l.opts
	if msgID != "" {
		opts = append(opts[:len(opts):len(opts)], jetstream.WithMsgID(msgID))
	}
	l.sent.Store(msg, time.Now())
	f, err := l.js.PublishMsgAsync(msg, opts...)
	if err != nil {
		l.sent.Delete(msg)
		l.m.published.WithLabelValues("error").Inc()
		return nil, fmt.Errorf("append to %s: %w: %w", msg.Subject, ErrNotDurable, err)
	}
	return func(ctx context.Context) error {
		select {
		case <-f.Ok():
			return nil
		case err := <-f.Err():
			return fmt.Errorf("append to %s: %w: %w", msg.Subject, ErrNotDurable, err)
		case <-ctx.Done():
			return fmt.Errorf("append to %s: %w: %w", msg.Subject, ErrNotDurable, ctx.Err())
		}
	}, nil
}

// Pending is the number of batches published and not yet acknowledged.
func (l *Log) Pending() int { return l.js.PublishAsyncPending() }

func (l *Log) acked(_ jetstream.JetStream, msg *nats.Msg, ack *jetstream.PubAck) {
	if t, ok := l.sent.LoadAndDelete(msg); ok {
		l.m.ackSeconds.Observe(time.Since(t.(time.Time)).Seconds())
	}
	if ack.Duplicate {
		l.m.published.WithLabelValues("duplicate").Inc()
		return
	}
	l.m.published.WithLabelValues("ok").Inc()
}

func (l *Log) failed(_ jetstream.JetStream, msg *nats.Msg, _ error) {
	l.sent.Delete(msg)
	l.m.published.WithLabelValues("error").Inc()
}
