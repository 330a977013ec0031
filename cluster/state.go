package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
// A checkpoint writes the snapshot, then purges the transitions it holds. A
// new owner reads the snapshot, then the transitions after it and the
// pending notifications, before it evaluates anything.

// StateSubjectPrefix prefixes the state log's subjects.
const StateSubjectPrefix = "citypulse.state"

// noteKeyHeader carries a pending notification's key.
const noteKeyHeader = "Citypulse-Note"

// afterMeta is the snapshot's metadata key: the stream sequence of the last
// transition the snapshot holds.
const afterMeta = "after"

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

	mu      sync.Mutex
	owned   map[int]bool
	lastSeq map[int]uint64    // the last transition of p appended or restored
	notes   map[string]uint64 // pending notification key → its message
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
	return &StateStore{js: js, cfg: cfg, snap: snap, log: log, m: m,
		owned: map[int]bool{}, lastSeq: map[int]uint64{}, notes: map[string]uint64{}}, nil
}

// Ensure creates or updates the snapshot bucket and the state log.
func (s *StateStore) Ensure(ctx context.Context) error {
	if _, err := s.js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket: s.cfg.Bucket, Description: "CityPulse partition snapshots (alert state)",
		Storage: jetstream.FileStorage, Replicas: s.cfg.Replicas}); err != nil {
		return fmt.Errorf("create object store %s: %w", s.cfg.Bucket, err)
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

func transitionSubject(p int) string { return StateSubjectPrefix + "." + strconv.Itoa(p) + ".t" }
func noteSubject(p int) string       { return StateSubjectPrefix + "." + strconv.Itoa(p) + ".n" }
func snapshotName(p int) string      { return "p" + strconv.Itoa(p) }

// Append records transitions (and their notifications) and returns once
// JetStream acknowledged every one: only then may they be notified.
func (s *StateStore) Append(ctx context.Context, recs []StateRecord) error {
	if len(recs) == 0 {
		return nil
	}
	if _, _, err := s.ensured(ctx); err != nil {
		return fmt.Errorf("append to %s: %w", s.cfg.Stream, err)
	}
	type sent struct {
		rec  *StateRecord
		note bool
		f    jetstream.PubAckFuture
	}
	var all []sent
	var errs []error
	for i := range recs {
		r := &recs[i]
		f, err := s.js.PublishMsgAsync(&nats.Msg{Subject: transitionSubject(r.Partition), Data: r.Transition})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		all = append(all, sent{rec: r, f: f})
		if r.NoteKey == "" {
			continue
		}
		msg := &nats.Msg{Subject: noteSubject(r.Partition), Data: r.Note, Header: nats.Header{}}
		msg.Header.Set(noteKeyHeader, r.NoteKey)
		if f, err = s.js.PublishMsgAsync(msg); err != nil {
			errs = append(errs, err)
			continue
		}
		all = append(all, sent{rec: r, note: true, f: f})
	}
	for _, x := range all {
		select {
		case ack := <-x.f.Ok():
			s.mu.Lock()
			if x.note {
				s.notes[x.rec.NoteKey] = ack.Sequence
			} else if ack.Sequence > s.lastSeq[x.rec.Partition] {
				s.lastSeq[x.rec.Partition] = ack.Sequence
			}
			s.mu.Unlock()
		case err := <-x.f.Err():
			errs = append(errs, err)
		case <-ctx.Done():
			errs = append(errs, ctx.Err())
		}
	}
	if err := errors.Join(errs...); err != nil {
		s.m.appends.WithLabelValues("error").Add(float64(len(recs)))
		return fmt.Errorf("append to %s: %w", s.cfg.Stream, err)
	}
	s.m.appends.WithLabelValues("ok").Add(float64(len(recs)))
	return nil
}

// Delivered removes a pending notification once every receiver has it; an
// unknown key (not recorded by this node) is ignored.
func (s *StateStore) Delivered(ctx context.Context, noteKey string) error {
	s.mu.Lock()
	seq, ok := s.notes[noteKey]
	delete(s.notes, noteKey)
	str := s.str
	s.mu.Unlock()
	if !ok || str == nil {
		return nil
	}
	if err := str.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return fmt.Errorf("remove delivered notification %s: %w", noteKey, err)
	}
	return nil
}
