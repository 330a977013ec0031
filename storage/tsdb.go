package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	promstorage "github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/internal/bymetric"
	"github.com/citypulse/citypulse/pipeline"
)

// TSDB is the embedded store: a Prometheus TSDB written by the pipeline as a
// sink and read by the query API. Series are <kind>_<metric>{device, district,
// kind}; a sample's time is the device's reading time, rounded to the nearest
// ms (pipeline.Millis).
//
// A second, different value of a series at a ms it already has is refused and
// counted (reason duplicate; Refused, shown by /api/v1/sinks): the store keeps
// one value per series and ms, and the first one written stays. An identical
// value at the same ms (a replay) is a no-op. (The TSDB itself checks only the
// latest committed sample: a duplicate within a batch it drops uncounted, a
// late one it takes into its out-of-order head, where it replaces the first
// value at query time; Write checks both, the latter against the batch and,
// for late samples only, the store.)
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
	gen    atomic.Uint64        // numbers the batches (batchSamples)
	logs   sync.Pool            // *[]batchSample: batchSamples.log arrays

	closeOnce sync.Once
	closeErr  error
}

type seriesEntry struct {
	ref  promstorage.SeriesRef
	lset labels.Labels
	// the latest sample appended through this cache (has: one was), so that a
	// second value at its ms is refused even within one batch: the TSDB checks
	// only against committed samples and drops such a sample at Commit silently.
	has   bool
	lastT int64
	lastV float64
	// primed: has/lastT were taken from the store for a series it already
	// had when first seen here (lastV is then unknown: valueAt looks it up)
	primed, vKnown bool
	// the first sample of the series in the batch being written (gen), kept
	// so that a late sample can be checked against it (batchSamples)
	gen    uint64
	firstT int64
	firstV float64
}

// batchKey is a series and a ms in the batch being written.
type batchKey struct {
	e  *seriesEntry
	ms int64
}

// batchSamples remembers the samples a batch appended to series that have
// more than one in it: a late sample is compared with them, since the TSDB
// would otherwise take it into its out-of-order head, where at query time it
// replaces the value the series already had at that ms. A series with one
// sample per batch costs nothing; the others are logged in order (cheap) and
// indexed only at the first lookup that needs them (a late sample, rare).
type batchSamples struct {
	gen  uint64
	log  []batchSample        // the samples after a series' first, in order, until m is built
	m    map[batchKey]float64 // built from log at the first lookup
	pool *sync.Pool           // where log's array goes back (release)
}

type batchSample struct {
	e  *seriesEntry
	ms int64
	v  float64
}

// add records a sample just appended to e.
func (b *batchSamples) add(e *seriesEntry, ms int64, v float64) {
	if e.gen != b.gen {
		e.gen, e.firstT, e.firstV = b.gen, ms, v
		return
	}
	if b.m == nil {
		b.log = append(b.log, batchSample{e, ms, v})
		return
	}
	b.index(e, ms, v)
}

func (b *batchSamples) index(e *seriesEntry, ms int64, v float64) {
	b.m[batchKey{e, e.firstT}] = e.firstV
	b.m[batchKey{e, ms}] = v
}

// get returns the value the batch appended to e at ms, if any.
func (b *batchSamples) get(e *seriesEntry, ms int64) (float64, bool) {
	if e.gen != b.gen {
		return 0, false
	}
	if e.firstT == ms {
		return e.firstV, true
	}
	if b.m == nil {
		b.m = make(map[batchKey]float64, 2*len(b.log))
		for _, s := range b.log {
			b.index(s.e, s.ms, s.v)
		}
		b.release()
	}
	v, ok := b.m[batchKey{e, ms}]
	return v, ok
}

// release hands the log's array back for the next batch.
func (b *batchSamples) release() {
	if b.log != nil && b.pool != nil {
		clear(b.log)
		l := b.log[:0]
		b.pool.Put(&l)
	}
	b.log = nil
}

// seriesCache maps a series to its TSDB reference and labels, so the hot path
// builds labels once per series. A stale reference (the series was garbage
// collected from the head) is harmless: the appender falls back to the labels.
//
// It is kept by device, looked up once per run of readings of one device (a
// batch holds whole records, each one device's), and per device by metric in
// a short list tried first where the last reading's metric was found: a
// device's readings repeat their metrics in one order, so a reading costs a
// string comparison or two rather than hashing device, district and metric
// (that map lookup per reading was the largest share of Write outside the
// TSDB itself).
type seriesCache struct {
	devs   map[string]*deviceSeries // by device
	series int
}

// deviceSeries is the series of one device, by metric.
type deviceSeries struct {
	device, kind, district string
	metrics                bymetric.List[*seriesEntry]
	// moved is the device's series under another kind or district (a
	// device re-registered or moved: its series are others), nil for most.
	moved *deviceSeries
}

// entry returns the series of reading r, d being r's device (nil: not
// looked up yet; it returns the one it used).
func (c *seriesCache) entry(d *deviceSeries, r *pipeline.Reading) (*deviceSeries, *seriesEntry) {
	if d == nil || d.device != r.Device || d.district != r.District || d.kind != r.Kind {
		first := c.devs[r.Device]
		d = first
		for d != nil && (d.district != r.District || d.kind != r.Kind) {
			d = d.moved
		}
		if d == nil {
			d = &deviceSeries{device: r.Device, kind: r.Kind, district: r.District, moved: first}
			c.devs[r.Device] = d
		}
	}
	if e, ok := d.metrics.Find(r.Metric); ok {
		return d, e
	}
	e := &seriesEntry{lset: seriesLabels(r)}
	d.metrics.Add(r.Metric, e)
	c.series++
	return d, e
}

const maxCachedSeries = 1 << 20

type tsdbMetrics struct {
	appended prometheus.Counter
	rejected *prometheus.CounterVec
	// the same counts, readable for Refused
	tooOld, duplicate atomic.Uint64
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
			Help: "Samples the embedded store refused, by reason (too_old: older than storage.tsdb.out_of_order_window behind the newest sample; duplicate: a different value of the series at the same ms as its latest sample, the first value stays)."},
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

func (t *TSDB) cache(shard int) *seriesCache {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.caches[shard]
	if !ok || c.series > maxCachedSeries {
		c = &seriesCache{devs: map[string]*deviceSeries{}}
		t.caches[shard] = c
	}
	return c
}

// Write appends a batch in one TSDB transaction. Samples the store refuses for
// their own sake (too old, a different value at the same ms) are counted and
// skipped; only a failure of the store itself fails the batch (retried).
func (t *TSDB) Write(ctx context.Context, b pipeline.Batch) error {
	cache := t.cache(b.Shard)
	app := t.db.Appender(ctx)
	appended := 0
	batch := batchSamples{gen: t.gen.Add(1), pool: &t.logs}
	if l, ok := t.logs.Get().(*[]batchSample); ok {
		batch.log = *l
	}
	defer batch.release()
	var dev *deviceSeries
	for i := range b.Readings {
		r := &b.Readings[i]
		var e *seriesEntry
		dev, e = cache.entry(dev, r)
		ms := pipeline.Millis(r.Time)
		if !e.primed {
			t.prime(app, e)
		}
		if e.has && ms <= e.lastT {
			if v, found := t.valueAt(ctx, e, ms, &batch); found {
				if math.Float64bits(r.Value) != math.Float64bits(v) {
					t.refuse("duplicate")
				}
				continue // an identical sample is a no-op, as in the TSDB
			}
		}
		ref, err := app.Append(e.ref, e.lset, ms, r.Value)
		switch {
		case err == nil:
			e.ref = ref
			if !e.has || ms > e.lastT {
				e.has, e.lastT, e.lastV, e.vKnown = true, ms, r.Value, true
			}
			batch.add(e, ms, r.Value)
			appended++
		case errors.Is(err, promstorage.ErrOutOfBounds), errors.Is(err, promstorage.ErrTooOldSample),
			errors.Is(err, promstorage.ErrOutOfOrderSample):
			t.refuse("too_old")
		case errors.Is(err, promstorage.ErrDuplicateSampleForTimestamp):
			t.refuse("duplicate")
		default:
			_ = app.Rollback()
			t.dropCache(b.Shard)
			return fmt.Errorf("append to embedded store: %w", err)
		}
	}
	if err := app.Commit(); err != nil {
		t.dropCache(b.Shard)
		return fmt.Errorf("commit to embedded store: %w", err)
	}
	t.m.appended.Add(float64(appended))
	return nil
}

// valueAt returns the value series e already has at ms, which is not after
// its latest sample: the latest itself, one appended earlier in this batch,
// or a committed one (looked up in the store: only for late samples).
func (t *TSDB) valueAt(ctx context.Context, e *seriesEntry, ms int64, batch *batchSamples) (float64, bool) {
	if ms == e.lastT && e.vKnown {
		return e.lastV, true
	}
	if v, ok := batch.get(e, ms); ok {
		return v, true
	}
	q, err := t.db.Querier(ms, ms)
	if err != nil {
		return 0, false // the TSDB decides, as before
	}
	defer q.Close()
	matchers := make([]*labels.Matcher, 0, e.lset.Len())
	e.lset.Range(func(l labels.Label) {
		matchers = append(matchers, labels.MustNewMatcher(labels.MatchEqual, l.Name, l.Value))
	})
	ss := q.Select(ctx, false, nil, matchers...)
	for ss.Next() {
		it := ss.At().Iterator(nil)
		if it.Seek(ms) == chunkenc.ValFloat {
			if ts, v := it.At(); ts == ms {
				return v, true
			}
		}
	}
	return 0, false
}

// prime takes the time of a series' latest in-order sample from the store's
// head when the series is first seen by this cache (after a start, or a cache
// reset), so that a late sample of it is checked by valueAt like any other.
func (t *TSDB) prime(app promstorage.Appender, e *seriesEntry) {
	e.primed = true
	g, ok := app.(promstorage.GetRef)
	if !ok {
		return
	}
	ref, _ := g.GetRef(e.lset, e.lset.Hash())
	if ref == 0 {
		return // not in the head: a new series, or one idle long enough to leave it
	}
	ir, err := t.db.Head().Index()
	if err != nil {
		return
	}
	defer ir.Close()
	var b labels.ScratchBuilder
	var chks []chunks.Meta
	if ir.Series(ref, &b, &chks) != nil || len(chks) == 0 {
		return
	}
	last := chks[0].MaxTime
	for _, c := range chks[1:] {
		last = max(last, c.MaxTime)
	}
	e.ref, e.has, e.lastT, e.vKnown = ref, true, last, false
}

// dropCache forgets a shard's cache after a failed batch: its latest samples
// were never committed, and the retry must not take them for duplicates.
func (t *TSDB) dropCache(shard int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.caches, shard)
}

func (t *TSDB) refuse(reason string) {
	t.m.rejected.WithLabelValues(reason).Inc()
	if reason == "duplicate" {
		t.m.duplicate.Add(1)
	} else {
		t.m.tooOld.Add(1)
	}
}

// Refused returns the samples refused since the store was opened, by reason
// (pipeline.RefusalReporter: /api/v1/sinks shows them).
func (t *TSDB) Refused() map[string]uint64 {
	return map[string]uint64{"too_old": t.m.tooOld.Load(), "duplicate": t.m.duplicate.Load()}
}

// seriesLabels names a reading's series: <kind>_<metric>{device, district,
// kind}, or for a city series (kind "city") city_<name>{district}. A city
// series that belongs to one thing rather than a district (its Device is not
// "city") carries it too: the corridor of a green-wave series
// (city_corridor_*{corridor}), otherwise the junction or device
// (city_signal_cycle_seconds{device, district}).
func seriesLabels(r *pipeline.Reading) labels.Labels {
	if r.Kind == string(devices.KindCity) {
		name := "city_" + r.Metric
		switch {
		case r.Device == "" || r.Device == cityDevice:
			return labels.FromStrings(model.MetricNameLabel, name, "district", r.District)
		case strings.HasPrefix(r.Metric, "corridor_"):
			return labels.FromStrings(model.MetricNameLabel, name, "corridor", r.Device)
		}
		return labels.FromStrings(model.MetricNameLabel, name, "device", r.Device, "district", r.District)
	}
	return labels.FromStrings(
		model.MetricNameLabel, r.Kind+"_"+r.Metric,
		"device", r.Device,
		"district", r.District,
		"kind", r.Kind,
	)
}

// cityDevice is the Device of a district's roll-up (rules.CityDevice).
const cityDevice = "city"

// Close flushes and closes the store; it is idempotent.
func (t *TSDB) Close() error {
	t.closeOnce.Do(func() { t.closeErr = t.db.Close() })
	return t.closeErr
}
