package clusterstate

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

	"github.com/citypulse/citypulse/silence"
)

// maxSilenceRecord bounds one silence or acknowledgement in the bucket (16
// matchers and two texts of silence.MaxTextLen fit in far less).
const maxSilenceRecord = 32 << 10

// Silences keeps the operators' silences and acknowledgements of every node
// in a JetStream key-value bucket (silence.Replica): a change made through
// any node's API is written to the bucket and reaches every node's store
// through its watch, so the node that owns an alert's partition holds back
// its notification whoever silenced it. At a standby site the bucket is the
// mirror of the active site's: it is read, never written (a change there is
// refused with silence.ErrReadOnly) until the site is active; then the
// bucket is bound again as this site's own.
type Silences struct {
	store    *silence.Store
	bucket   string
	replicas int
	log      *slog.Logger
	applied  *prometheus.CounterVec

	mu       sync.Mutex
	js       jetstream.JetStream // set by Run
	writable func() error        // set by Run; nil when this site may always write
	kv       jetstream.KeyValue  // bound by Run; nil before
	kvActive bool                // kv was bound while this site was active (writable)
	ready    chan struct{}       // closed once the bucket's contents are in the store
	once     sync.Once

	// markerAge: the delete markers older than this are purged from the
	// bucket every markerAge/2 (see purgeMarkers)
	markerAge time.Duration
}

// deleteMarkerAge is how long a deleted silence's delete marker stays in
// the bucket. Every node's watch sees a delete as it happens, and a node
// that (re)starts reads the bucket's contents whole, so the marker is only
// kept for a watcher that is briefly behind.
const deleteMarkerAge = time.Hour

// SilencesOptions configure Silences.
type SilencesOptions struct {
	Bucket     string
	Replicas   int
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// NewSilences builds the shared silences with an empty store (Store), which
// refuses changes until Run has bound the bucket. It starts nothing.
func NewSilences(o SilencesOptions) *Silences {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Silences{bucket: o.Bucket, replicas: o.Replicas, log: o.Logger, ready: make(chan struct{}), markerAge: deleteMarkerAge,
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_cluster_silence_changes_total",
			Help: "Silence and acknowledgement changes read from the shared bucket, by result (applied, rejected: unreadable)."},
			[]string{"result"})}
	s.store = silence.NewReplicated(s, nil)
	if o.Registerer != nil {
		o.Registerer.MustRegister(s.applied)
	}
	return s
}

// Store is the node's store, kept in the bucket.
func (s *Silences) Store() *silence.Store { return s.store }

// Ready is closed once the bucket's contents are in the store.
func (s *Silences) Ready() <-chan struct{} { return s.ready }

// mayWrite is nil when this site may write to the bucket.
func (s *Silences) mayWrite() error {
	s.mu.Lock()
	w := s.writable
	s.mu.Unlock()
	if w == nil {
		return nil
	}
	return w()
}

// handle is the bound bucket for a write.
func (s *Silences) handle() (jetstream.KeyValue, error) {
	if err := s.mayWrite(); err != nil {
		return nil, fmt.Errorf("%w: %v; change silences at the active site (they reach this one through the mirror)", silence.ErrReadOnly, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.kv == nil || !s.kvActive {
		return nil, fmt.Errorf("%w: the silences bucket %s is not bound yet; retry in a few seconds", silence.ErrReadOnly, s.bucket)
	}
	return s.kv, nil
}

// Put writes one item (silence.Replica).
func (s *Silences) Put(ctx context.Context, key string, value []byte) error {
	kv, err := s.handle()
	if err != nil {
		return err
	}
	if err := retryWrite(ctx, func(ctx context.Context, _ bool) error { _, err := kv.Put(ctx, key, value); return err }); err != nil {
		return fmt.Errorf("bucket %s: %w", s.bucket, err)
	}
	return nil
}

// Delete removes one item (silence.Replica).
func (s *Silences) Delete(ctx context.Context, key string) error {
	kv, err := s.handle()
	if err != nil {
		return err
	}
	if err := retryWrite(ctx, func(ctx context.Context, _ bool) error { return kv.Delete(ctx, key) }); err != nil {
		return fmt.Errorf("bucket %s: %w", s.bucket, err)
	}
	return nil
}

// bind opens the bucket: this site's own (created when missing) while it
// may write, else its mirror of the active site's.
func (s *Silences) bind(ctx context.Context) error {
	active := s.mayWrite() == nil
	s.mu.Lock()
	js := s.js
	s.mu.Unlock()
	kv, err := js.KeyValue(ctx, s.bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) && active {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: s.bucket, Description: "CityPulse operators' silences and acknowledgements",
			History: 1, MaxValueSize: maxSilenceRecord, Storage: jetstream.FileStorage, Replicas: s.replicas})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, s.bucket)
		}
	}
	if err != nil {
		return fmt.Errorf("bind silences bucket %s: %w", s.bucket, err)
	}
	s.mu.Lock()
	s.kv, s.kvActive = kv, active
	s.mu.Unlock()
	return nil
}

// rebindEvery is how often Run checks whether a standby site became active
// (then the bucket is bound again as this site's own).
const rebindEvery = time.Second

// Run binds the bucket on nc and keeps the store equal to it until ctx is
// done: the contents first (replacing the store's), then every change. A
// watch that ends, or a standby site that became active, binds and watches
// again. writable says whether this site may change the bucket (nil:
// always); a standby site's says why not while it is not active.
func (s *Silences) Run(ctx context.Context, nc *nats.Conn, writable func() error) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("silences bucket: %w", err)
	}
	s.mu.Lock()
	s.js, s.writable = js, writable
	s.mu.Unlock()
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		err := s.bind(ctx)
		if err == nil {
			err = s.watch(ctx)
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			s.log.Warn("silences bucket not available; retrying", "bucket", s.bucket, "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 200 * time.Millisecond
	}
	return nil
}

// watch feeds the store from the bound bucket until ctx is done (nil), the
// watch ends (an error), or the site may now write to a bucket bound as a
// mirror (nil: bind again).
func (s *Silences) watch(ctx context.Context) error {
	s.mu.Lock()
	kv, active := s.kv, s.kvActive
	s.mu.Unlock()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := kv.WatchAll(wctx)
	if err != nil {
		return fmt.Errorf("watch silences bucket %s: %w", s.bucket, err)
	}
	defer func() { _ = w.Stop() }()
	t := time.NewTicker(rebindEvery)
	defer t.Stop()
	purged := time.Now()
	initial := map[string][]byte{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if s.mayWrite() != nil {
				continue
			}
			if !active {
				s.log.Info("this site is active: the silences bucket is its own now", "bucket", s.bucket)
				return nil
			}
			s.prune()
			if time.Since(purged) >= s.markerAge/2 {
				purged = time.Now()
				s.purgeMarkers(ctx, kv)
			}
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("watch silences bucket %s: ended", s.bucket)
			}
			switch {
			case e == nil && initial != nil: // the contents are all delivered
				s.count(s.store.Replace(initial))
				initial = nil
				s.once.Do(func() { close(s.ready) })
			case e == nil:
			case initial != nil:
				if e.Operation() == jetstream.KeyValuePut {
					initial[e.Key()] = e.Value()
				} else {
					delete(initial, e.Key())
				}
			default:
				var v []byte
				if e.Operation() == jetstream.KeyValuePut {
					v = e.Value()
				}
				s.count(s.store.Apply(e.Key(), v))
			}
		}
	}
}

// prune deletes the ended silences from the bucket (every node of an active
// site does, each for the ones it saw end: a key deleted twice is deleted).
// The bucket keeps a small delete marker per key until purgeMarkers.
func (s *Silences) prune() {
	n, err := s.store.Prune()
	if err != nil {
		s.log.Warn("silences bucket: cannot delete the ended silences; retrying", "bucket", s.bucket, "deleted", n, "err", err)
		return
	}
	if n > 0 {
		s.log.Debug("silences bucket: ended silences deleted", "bucket", s.bucket, "deleted", n)
	}
}

// purgeMarkers removes the delete markers older than markerAge from the
// bucket (prune leaves one per deleted silence). It reads the whole bucket,
// so it runs every markerAge/2, not every tick. It runs only where the
// site may write; a standby site's mirror is not purged by it here.
func (s *Silences) purgeMarkers(ctx context.Context, kv jetstream.KeyValue) {
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := kv.PurgeDeletes(pctx, jetstream.DeleteMarkersOlderThan(s.markerAge)); err != nil && ctx.Err() == nil {
		s.log.Warn("silences bucket: cannot purge the delete markers; retrying later", "bucket", s.bucket, "err", err)
	}
}

func (s *Silences) count(err error) {
	if err != nil {
		s.applied.WithLabelValues("rejected").Inc()
		s.log.Error("silences bucket: change rejected", "bucket", s.bucket, "err", err)
		return
	}
	s.applied.WithLabelValues("applied").Inc()
}
