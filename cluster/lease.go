package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Lease elects one node for a task (the city roll-ups) with a key in a
// JetStream key-value bucket whose entries expire after the lease's TTL: the
// node that creates the key leads and renews it every TTL/3 with a
// compare-and-set on its revision; the others try to create it every TTL/3.
// When the leader dies or is cut off, the key expires and another node
// creates it: a new leader within TTL + TTL/3. A leader whose renewal fails
// stops leading at once, and in any case TTL × 2/3 after its last renewal,
// before the key can expire: two nodes never both believe they lead (with
// clocks that run at the same rate).
type Lease struct {
	js       jetstream.JetStream
	bucket   string
	key      string
	id       string
	ttl      time.Duration
	replicas int
	log      *slog.Logger
	now      func() time.Time

	kv      jetstream.KeyValue
	until   atomic.Int64 // unix ns until which this node leads (0: it does not)
	changes atomic.Uint64
}

// NewLease builds a lease on nc for key in bucket, held by id (unique per
// node). It starts nothing; Run campaigns.
func NewLease(nc *nats.Conn, bucket, key, id string, ttl time.Duration, replicas int, log *slog.Logger) (*Lease, error) {
	if ttl < time.Second {
		return nil, fmt.Errorf("lease %s: the TTL must be at least 1s, got %v", key, ttl)
	}
	if id == "" || key == "" || bucket == "" {
		return nil, errors.New("lease: bucket, key and id must not be empty")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("lease %s: %w", key, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Lease{js: js, bucket: bucket, key: key, id: id, ttl: ttl, replicas: replicas, log: log, now: time.Now}, nil
}

// Leader reports whether this node leads now.
func (l *Lease) Leader() bool { return l.now().UnixNano() < l.until.Load() }

// Changes counts how often this node became leader.
func (l *Lease) Changes() uint64 { return l.changes.Load() }

// Run campaigns and renews until ctx is done; then a leader deletes the key,
// so another node leads at once.
func (l *Lease) Run(ctx context.Context) error {
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	var rev uint64
	for {
		if l.kv == nil {
			l.open(ctx)
		}
		if l.kv != nil {
			rev = l.step(ctx, rev)
		}
		select {
		case <-ctx.Done():
			l.resign(rev)
			return nil
		case <-t.C:
		}
	}
}

func (l *Lease) open(ctx context.Context) {
	kv, err := l.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: l.bucket,
		Description: "CityPulse leases (one elected node per task)", History: 1, TTL: l.ttl,
		Storage: jetstream.FileStorage, Replicas: l.replicas})
	if err != nil {
		if ctx.Err() == nil {
			l.log.Warn("lease bucket not available; retrying", "bucket", l.bucket, "err", err)
		}
		return
	}
	l.kv = kv
}

// step renews the lease (rev > 0) or tries to take it; it returns the
// revision held (0: none).
func (l *Lease) step(ctx context.Context, rev uint64) uint64 {
	ctx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	start := l.now()
	var err error
	if rev > 0 {
		rev, err = l.kv.Update(ctx, l.key, []byte(l.id), rev)
	} else {
		rev, err = l.kv.Create(ctx, l.key, []byte(l.id))
	}
	if err != nil {
		if l.until.Swap(0) != 0 {
			l.log.Warn("lease lost", "key", l.key, "err", err)
		}
		return 0
	}
	// led from the request's start: the key expires TTL after it was stored
	if l.until.Swap(start.Add(l.ttl*2/3).UnixNano()) == 0 {
		l.changes.Add(1)
		l.log.Info("lease taken: this node leads", "key", l.key)
	}
	return rev
}

// resign deletes the key held at rev so another node leads at once.
func (l *Lease) resign(rev uint64) {
	l.until.Store(0)
	if rev == 0 || l.kv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := l.kv.Delete(ctx, l.key, jetstream.LastRevision(rev)); err != nil {
		l.log.Warn("cannot give up the lease; another node leads after its TTL", "key", l.key, "err", err)
	}
}
