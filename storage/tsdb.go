package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	promstorage "github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb"

	"github.com/citypulse/citypulse/pipeline"
)

// TSDB is the embedded store: a Prometheus TSDB written by the pipeline as a
// sink and read by the query API. Series are <kind>_<metric>{device, district,
// kind}; a sample's time is the device's reading time (ms precision).
//
// The TSDB keeps its own WAL: a committed appender has written its WAL record
// (write(2), like the journal), and the pipeline advances this sink's cursor
// only after Write returns, so a crash between the two replays a batch, which
// the TSDB absorbs (an identical sample at the same time is a no-op).
type TSDB struct {
	db  *tsdb.DB
	log *slog.Logger
	m   *tsdbMetrics
	cfg TSDBConfig

	mu     sync.Mutex
	caches map[int]*seriesCache // per pipeline shard: one writer each, no lock on the hot path

	closeOnce sync.Once
	closeErr  error
}

type seriesKey struct{ device, district, metric string }

type seriesEntry struct {
	ref  promstorage.SeriesRef
	lset labels.Labels
}

// seriesCache maps a series to its TSDB reference and labels, so the hot path
// builds labels once per series. A stale reference (the series was garbage
// collected from the head) is harmless: the appender falls back to the labels.
type seriesCache map[seriesKey]*seriesEntry

const maxCachedSeries = 1 << 20

type tsdbMetrics struct {
	appended prometheus.Counter
	rejected *prometheus.CounterVec
}

// OpenTSDB opens (or creates) the store in dir.
func OpenTSDB(dir string, cfg TSDBConfig, log *slog.Logger, reg prometheus.Registerer) (*TSDB, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opts := tsdb.DefaultOptions()
	opts.RetentionDuration = cfg.Retention.Milliseconds()
	opts.OutOfOrderTimeWindow = cfg.OutOfOrderWindow.Milliseconds()
	// The TSDB's own metrics go to a private registry: they are numerous and
	// would collide when two stores share a process (tests).
	db, err := tsdb.Open(dir, log, nil, opts, nil)
	if err != nil {
		return nil, fmt.Errorf("open embedded store at %s: %w", dir, err)
	}
	m := &tsdbMetrics{
		appended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_storage_tsdb_samples_appended_total", Help: "Samples committed to the embedded store."}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_storage_tsdb_samples_rejected_total",
			Help: "Samples the embedded store refused, by reason (too_old: older than storage.tsdb.out_of_order_window behind the newest sample; duplicate: another value at the same time)."},
			[]string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.appended, m.rejected)
	}
	return &TSDB{db: db, log: log, m: m, cfg: cfg, caches: map[int]*seriesCache{}}, nil
}

// Name is the sink's name.
func (t *TSDB) Name() string { return "tsdb" }

// DB returns the underlying Prometheus TSDB (a storage.Queryable).
func (t *TSDB) DB() *tsdb.DB { return t.db }

func (t *TSDB) cache(shard int) seriesCache {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.caches[shard]
	if !ok || len(*c) > maxCachedSeries {
		m := make(seriesCache)
		c = &m
		t.caches[shard] = c
	}
	return *c
}

// Write appends a batch in one TSDB transaction. Samples the store refuses for
// their own sake (too old, a conflicting value at the same time) are counted
// and skipped; only a failure of the store itself fails the batch (retried).
func (t *TSDB) Write(ctx context.Context, b pipeline.Batch) error {
	cache := t.cache(b.Shard)
	app := t.db.Appender(ctx)
	appended := 0
	for i := range b.Readings {
		r := &b.Readings[i]
		k := seriesKey{r.Device, r.District, r.Metric}
		e := cache[k]
		if e == nil {
			e = &seriesEntry{lset: seriesLabels(r)}
			cache[k] = e
		}
		ref, err := app.Append(e.ref, e.lset, r.Time/int64(time.Millisecond), r.Value)
		switch {
		case err == nil:
			e.ref = ref
			appended++
		case errors.Is(err, promstorage.ErrOutOfBounds), errors.Is(err, promstorage.ErrTooOldSample),
			errors.Is(err, promstorage.ErrOutOfOrderSample):
			t.m.rejected.WithLabelValues("too_old").Inc()
		case errors.Is(err, promstorage.ErrDuplicateSampleForTimestamp):
			t.m.rejected.WithLabelValues("duplicate").Inc()
		default:
			_ = app.Rollback()
			return fmt.Errorf("append to embedded store: %w", err)
		}
	}
	if err := app.Commit(); err != nil {
		return fmt.Errorf("commit to embedded store: %w", err)
	}
	t.m.appended.Add(float64(appended))
	return nil
}

// seriesLabels names a reading's series: <kind>_<metric>{device, district,
// kind}, or for a city roll-up (kind "city") city_<name>{district}.
func seriesLabels(r *pipeline.Reading) labels.Labels {
	if r.Kind == "city" {
		return labels.FromStrings(model.MetricNameLabel, "city_"+r.Metric, "district", r.District)
	}
	return labels.FromStrings(
		model.MetricNameLabel, r.Kind+"_"+r.Metric,
		"device", r.Device,
		"district", r.District,
		"kind", r.Kind,
	)
}

// Close flushes and closes the store; it is idempotent.
func (t *TSDB) Close() error {
	t.closeOnce.Do(func() { t.closeErr = t.db.Close() })
	return t.closeErr
}
