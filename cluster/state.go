package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// The state that moves with a partition lives in JetStream in two places:
//
//   - the snapshot of partition p, object "p<p>" of the object store
//     cluster.state.bucket (an object store, not a KV bucket: 10,000 alerts
//     are megabytes, and a KV value is bounded by max_payload, 1 MB), with
//     the sequence of the last transition it holds in its metadata;
//   - the transitions since, appended to subject citypulse.state.<p>.t of the
//     stream cluster.state.stream, and the notifications not yet delivered,
//     on citypulse.state.<p>.n (each removed once delivered).
//
// The fleet alerts' state is kept the same way, under key "fleet"
// (FleetState). A checkpoint writes the snapshot, then purges the
// transitions it holds. A new owner reads the snapshot, then the transitions after it and the
// pending notifications, before it evaluates anything.

// StateSubjectPrefix prefixes the state log's subjects.
const StateSubjectPrefix = "citypulse.state"

// noteKeyHeader carries a pending notification's key.
const noteKeyHeader = "Citypulse-Note"

// afterMeta is the snapshot's metadata key: the stream sequence of the last
// transition the snapshot holds.
const afterMeta = "after"

// readingsMeta is the snapshot's metadata key: the sequence in the readings
// stream up to which every batch of the partition was handled before the
// snapshot was taken (its state holds them; see Progress).
const readingsMeta = "readings"

// StateRecord is one transition of partition p, with the notification it
// raised (NoteKey and Note empty: none).
type StateRecord struct {
	Partition  int
	Transition []byte
	NoteKey    string
	Note       []byte
}

// PartitionState is what a new owner of a partition restores.
type PartitionState struct {
	Snapshot    []byte   // nil: none written yet
	Transitions [][]byte // after the snapshot, in order
	Notes       [][]byte // notifications recorded and not yet delivered, in order
}

// Snapshotter returns partition p's snapshot (opaque to the store).
type Snapshotter func(p int) ([]byte, error)

// StateStore keeps the state of the partitions this node owns in JetStream.
// Restore marks a partition owned, Release checkpoints it and unmarks it;
// Run checkpoints the owned ones every cluster.state.checkpoint.
type StateStore struct {
	js   jetstream.JetStream
	cfg  StateConfig
	snap Snapshotter
	log  *slog.Logger
	m    *StateMetrics

	obs jetstream.ObjectStore
	str jetstream.Stream

	id   string        // prefix of this store's message ids
	msgs atomic.Uint64 // numbers its messages

	progress func(p int) uint64 // see SetProgress; nil: no position recorded

	mu      sync.Mutex
	owned   map[int]bool
	lastSeq map[int]uint64     // the last transition of p appended or restored
	notes   map[string]noteRef // pending notification key → its message
	handled map[int]uint64     // p's position in the readings stream, as restored or checkpointed
}

// NewStateStore builds a store on nc. It starts nothing; Ensure creates the
// bucket and the stream.
func NewStateStore(nc *nats.Conn, cfg StateConfig, snap Snapshotter, log *slog.Logger, m *StateMetrics) (*StateStore, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if snap == nil {
		return nil, errors.New("cluster state: a snapshotter is required")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("cluster state: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewStateMetrics(nil)
	}
	return &StateStore{js: js, cfg: cfg, snap: snap, log: log, m: m, id: nuid.Next(),
		owned: map[int]bool{}, lastSeq: map[int]uint64{}, notes: map[string]noteRef{}, handled: map[int]uint64{}}, nil
}

// SetProgress sets where Checkpoint reads a partition's position in the
// readings stream (Progress.Handled), to record it with the snapshot. Call
// it before Run and before the first Restore.
func (s *StateStore) SetProgress(handled func(p int) uint64) { s.progress = handled }

// Ensure creates or updates the snapshot bucket and the state log.
func (s *StateStore) Ensure(ctx context.Context) error {
	// Create the bucket only when it is missing: an update would turn direct
	// gets on again (an object store's default), and another node's handle,
	// opened with direct gets off, would then read from a replica that lags,
	// or a handle opened with them on would find no responders once a node
	// turned them off again.
	if _, err := s.js.ObjectStore(ctx, s.cfg.Bucket); errors.Is(err, jetstream.ErrBucketNotFound) {
		_, err = s.js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket: s.cfg.Bucket, Description: "CityPulse partition snapshots (alert state)",
			Storage: jetstream.FileStorage, Replicas: s.cfg.Replicas})
		if err != nil && !errors.Is(err, jetstream.ErrBucketExists) {
			return fmt.Errorf("create object store %s: %w", s.cfg.Bucket, err)
		}
	} else if err != nil {
		return fmt.Errorf("open object store %s: %w", s.cfg.Bucket, err)
	}
	// Direct gets may be answered by a replica that lags: a new owner would
	// read an older snapshot than the log was purged for. Every read goes to
	// the stream leader instead.
	if err := s.noDirectGets(ctx, "OBJ_"+s.cfg.Bucket); err != nil {
		return err
	}
	obs, err := s.js.ObjectStore(ctx, s.cfg.Bucket)
	if err != nil {
		return fmt.Errorf("open object store %s: %w", s.cfg.Bucket, err)
	}
	str, err := s.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: s.cfg.Stream, Description: "CityPulse alert transitions and pending notifications per partition",
		Subjects: []string{StateSubjectPrefix + ".*.*"}, Storage: jetstream.FileStorage, Replicas: s.cfg.Replicas,
		Retention: jetstream.LimitsPolicy, Discard: jetstream.DiscardNew, MaxBytes: s.cfg.MaxBytes})
	if err != nil {
		return fmt.Errorf("create stream %s: %w", s.cfg.Stream, err)
	}
	s.mu.Lock()
	s.obs, s.str = obs, str
	s.mu.Unlock()
	return nil
}

// noDirectGets turns direct gets off on a stream.
func (s *StateStore) noDirectGets(ctx context.Context, name string) error {
	str, err := s.js.Stream(ctx, name)
	if err != nil {
		return fmt.Errorf("stream %s: %w", name, err)
	}
	cfg := str.CachedInfo().Config
	if !cfg.AllowDirect {
		return nil
	}
	cfg.AllowDirect = false
	if _, err := s.js.UpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("stream %s: turn direct gets off: %w", name, err)
	}
	return nil
}

// FleetState is the pseudo-partition of the fleet alerts: the node holding
// the fleet lease judges them, whatever partitions it owns, and their state
// moves with the lease. It is kept as a partition's is, under key "fleet":
// snapshot "fleet", log citypulse.state.fleet.t and .n.
const FleetState = -1

// stateKey names partition p's state: its number, or "fleet".
func stateKey(p int) string {
	if p == FleetState {
		return "fleet"
	}
	return strconv.Itoa(p)
}

func transitionSubject(p int) string { return StateSubjectPrefix + "." + stateKey(p) + ".t" }
func noteSubject(p int) string       { return StateSubjectPrefix + "." + stateKey(p) + ".n" }
func deliveredSubject(p int) string  { return StateSubjectPrefix + "." + stateKey(p) + ".d" }

// noteRef is where a pending notification is in the state log.
type noteRef struct {
	seq uint64
	p   int
}

func snapshotName(p int) string {
	if p == FleetState {
		return "fleet"
	}
	return "p" + stateKey(p)
}

// Append records transitions (and their notifications) and returns once
// JetStream acknowledged every one: only then may they be notified. A
// message that fails (the publish window stalled, no answer in time, a
// leader election) is sent again, with the ones after it, in order and
// with its message id, so that JetStream stores it once; until ctx is done.
func (s *StateStore) Append(ctx context.Context, recs []StateRecord) error {
	if len(recs) == 0 {
		return nil
	}
	if _, _, err := s.ensured(ctx); err != nil {
		return fmt.Errorf("append to %s: %w", s.cfg.Stream, err)
	}
	var msgs []stateMsg
	for i := range recs {
		r := &recs[i]
		msgs = append(msgs, stateMsg{rec: r, msg: s.message(transitionSubject(r.Partition), r.Transition)})
		if r.NoteKey != "" {
			m := s.message(noteSubject(r.Partition), r.Note)
			m.Header.Set(noteKeyHeader, r.NoteKey)
			msgs = append(msgs, stateMsg{rec: r, note: true, msg: m})
		}
	}
	for attempt := 1; ; attempt++ {
		var err error
		if msgs, err = s.publish(ctx, msgs); len(msgs) == 0 {
			s.m.appends.WithLabelValues("ok").Add(float64(len(recs)))
			return nil
		}
		if ctx.Err() != nil {
			s.m.appends.WithLabelValues("error").Add(float64(len(recs)))
			return fmt.Errorf("append to %s: %d of %d messages not acknowledged after %d attempts: %w", s.cfg.Stream, len(msgs), len(recs), attempt, err)
		}
		s.log.Warn("state log append failed; sending again", "messages", len(msgs), "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stateMsg is one message of an Append: a transition or its notification.
type stateMsg struct {
	rec  *StateRecord
	note bool
	msg  *nats.Msg
}

// message is a message with a message id unique to this store.
func (s *StateStore) message(subject string, data []byte) *nats.Msg {
	m := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	m.Header.Set(jetstream.MsgIDHeader, s.id+"-"+strconv.FormatUint(s.msgs.Add(1), 36))
	return m
}

// publish sends msgs asynchronously and returns those not acknowledged, in
// order, from the first one that failed: none after a failed one is sent.
func (s *StateStore) publish(ctx context.Context, msgs []stateMsg) ([]stateMsg, error) {
	stall := 5 * time.Second
	if d, ok := ctx.Deadline(); ok {
		stall = max(time.Until(d), time.Millisecond)
	}
	futures := make([]jetstream.PubAckFuture, 0, len(msgs))
	var err error
	for _, m := range msgs {
		var f jetstream.PubAckFuture
		if f, err = s.js.PublishMsgAsync(m.msg, jetstream.WithStallWait(stall)); err != nil {
			break
		}
		futures = append(futures, f)
	}
	first := len(futures) // the first message not acknowledged
	for i, f := range futures {
		select {
		case ack := <-f.Ok():
			if i < first {
				s.acked(msgs[i], ack.Sequence)
			}
		case e := <-f.Err():
			first, err = min(first, i), e
		case <-ctx.Done():
			return msgs[min(first, i):], ctx.Err()
		}
	}
	return msgs[first:], err
}

// acked records an acknowledged message's sequence.
func (s *StateStore) acked(m stateMsg, seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m.note {
		s.notes[m.rec.NoteKey] = noteRef{seq: seq, p: m.rec.Partition}
	} else if seq > s.lastSeq[m.rec.Partition] {
		s.lastSeq[m.rec.Partition] = seq
	}
}

// Delivered removes a pending notification once every receiver has it; an
// unknown key (not recorded by this node) is ignored. A mirror of the state
// log does not see the removal (mirrors copy messages, not deletions), so a
// marker naming the key is appended first: a standby site promoted later
// restores the notification as delivered instead of sending it again.
func (s *StateStore) Delivered(ctx context.Context, noteKey string) error {
	s.mu.Lock()
	ref, ok := s.notes[noteKey]
	delete(s.notes, noteKey)
	str := s.str
	s.mu.Unlock()
	if !ok || str == nil {
		return nil
	}
	m := s.message(deliveredSubject(ref.p), nil)
	m.Header.Set(noteKeyHeader, noteKey)
	if _, err := s.js.PublishMsg(ctx, m); err != nil {
		return fmt.Errorf("mark notification %s delivered: %w", noteKey, err)
	}
	if err := str.DeleteMsg(ctx, ref.seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return fmt.Errorf("remove delivered notification %s: %w", noteKey, err)
	}
	return nil
}
