package storage

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/apache/arrow/go/v15/arrow"
	"github.com/apache/arrow/go/v15/arrow/array"
	"github.com/apache/arrow/go/v15/arrow/memory"
	"github.com/apache/arrow/go/v15/parquet"
	"github.com/apache/arrow/go/v15/parquet/compress"
	"github.com/apache/arrow/go/v15/parquet/pqarrow"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/internal/durable"
	"github.com/citypulse/citypulse/pipeline"
)

// ArchiveConfig configures the Parquet open-data archive.
type ArchiveConfig struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// Grace is how long after the end of an hour its partition stays open for
	// late readings before it is sealed into Parquet.
	Grace time.Duration `mapstructure:"grace" yaml:"grace"`
	// Batch is this sink's batch policy.
	Batch pipeline.BatchPolicy `mapstructure:"batch" yaml:"batch"`
}

// DefaultArchive returns the defaults (disabled).
func DefaultArchive() ArchiveConfig {
	return ArchiveConfig{
		Grace: time.Hour,
		Batch: pipeline.BatchPolicy{MaxReadings: 20000, MaxBytes: 4 << 20, MaxAge: 2 * time.Second},
	}
}

// Validate checks the section; messages name the key.
func (c ArchiveConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.Grace < 0 || c.Grace > 7*24*time.Hour {
		errs = append(errs, fmt.Errorf("storage.archive.grace must be between 0 and 168h, got %v", c.Grace))
	}
	errs = append(errs, c.Batch.Validate("storage.archive.batch"))
	return errors.Join(errs...)
}

// Archive writes every reading to hourly Parquet files partitioned
// <dir>/kind=<kind>/date=<YYYY-MM-DD>/hour=<HH>.parquet (zstd), readable by
// DuckDB, pandas or Spark as they are. Columns: time (timestamp ns, UTC),
// device, district, metric, value (float64), unit, received (timestamp ns).
//
// A Parquet file cannot be appended to, and a sink must not return before its
// batch is durable, so Write appends the batch to the partition's pending file
// (hour=HH.pending, one tab-separated row per line) and fsyncs it. A partition is
// sealed (pending rows deduplicated by device, metric and time, sorted, written
// to a temporary file, fsynced, renamed to .parquet, the pending file removed)
// once its hour ended more than Grace ago (checked on Write and at Close). A reading for an hour
// that was already sealed goes to hour=HH.part-<n>.parquet at its own sealing:
// sealed files are never rewritten. After a crash the pending files are picked
// up again; replayed batches are removed by the deduplication.
type Archive struct {
	dir string
	cfg ArchiveConfig
	log *slog.Logger
	m   *archiveMetrics
	now func() time.Time

	mu        sync.Mutex
	lastCheck time.Time
	closed    bool
}

type archiveMetrics struct {
	rows   prometheus.Counter
	sealed prometheus.Counter
}

// OpenArchive opens (or creates) the archive in dir.
func OpenArchive(dir string, cfg ArchiveConfig, log *slog.Logger, reg prometheus.Registerer) (*Archive, error) {
	cfg.Enabled = true
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create archive dir: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Archive{dir: dir, cfg: cfg, log: log, now: time.Now, m: &archiveMetrics{
		rows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_archive_rows_written_total", Help: "Readings written to the archive's pending files."}),
		sealed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_archive_files_sealed_total", Help: "Parquet files sealed."}),
	}}
	if reg != nil {
		reg.MustRegister(a.m.rows, a.m.sealed)
	}
	return a, nil
}

// Name is the sink's name.
func (a *Archive) Name() string { return "archive" }

// partition names the (kind, UTC hour) a reading belongs to.
type partition struct {
	kind string
	hour int64 // unix seconds of the hour's start
}

func (p partition) dir(root string) string {
	t := time.Unix(p.hour, 0).UTC()
	return filepath.Join(root, "kind="+p.kind, "date="+t.Format("2006-01-02"))
}

func (p partition) base() string { return fmt.Sprintf("hour=%02d", time.Unix(p.hour, 0).UTC().Hour()) }

// Write appends the batch to the pending files of its partitions and fsyncs them.
func (a *Archive) Write(_ context.Context, b pipeline.Batch) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return errors.New("archive is closed")
	}
	groups := map[partition]*bytes.Buffer{}
	for i := range b.Readings {
		r := &b.Readings[i]
		p := partition{kind: r.Kind, hour: r.Time / 1e9 / 3600 * 3600}
		if r.Time < 0 {
			p.hour = int64(math.Floor(float64(r.Time)/1e9/3600)) * 3600
		}
		buf := groups[p]
		if buf == nil {
			buf = &bytes.Buffer{}
			groups[p] = buf
		}
		appendRow(buf, r)
	}
	for p, buf := range groups {
		if err := appendDurable(filepath.Join(p.dir(a.dir), p.base()+".pending"), buf.Bytes()); err != nil {
			return fmt.Errorf("archive: %w", err)
		}
	}
	a.m.rows.Add(float64(len(b.Readings)))
	if now := a.now(); now.Sub(a.lastCheck) >= 5*time.Second {
		a.lastCheck = now
		if err := a.seal(func(p partition) bool {
			return now.After(time.Unix(p.hour, 0).Add(time.Hour + a.cfg.Grace))
		}); err != nil {
			a.log.Error("archive: sealing failed; the rows stay pending and sealing is retried", "err", err)
		}
	}
	return nil
}

// appendRow renders one pending row: time, device, district, metric, value, received.
func appendRow(buf *bytes.Buffer, r *pipeline.Reading) {
	var tmp [32]byte
	buf.Write(strconv.AppendInt(tmp[:0], r.Time, 10))
	buf.WriteByte('\t')
	buf.WriteString(r.Device)
	buf.WriteByte('\t')
	buf.WriteString(r.District)
	buf.WriteByte('\t')
	buf.WriteString(r.Metric)
	buf.WriteByte('\t')
	buf.Write(strconv.AppendFloat(tmp[:0], r.Value, 'g', -1, 64))
	buf.WriteByte('\t')
	buf.Write(strconv.AppendInt(tmp[:0], r.Received, 10))
	buf.WriteByte('\n')
}

func appendDurable(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// row is one archived reading.
type row struct {
	time, received           int64
	device, district, metric string
	value                    float64
}

// readPending parses a pending file; a torn last line (crash mid-write) is skipped.
func readPending(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rows []row
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		parts := strings.Split(sc.Text(), "\t")
		if len(parts) != 6 {
			continue
		}
		t, err1 := strconv.ParseInt(parts[0], 10, 64)
		v, err2 := strconv.ParseFloat(parts[4], 64)
		rc, err3 := strconv.ParseInt(parts[5], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		rows = append(rows, row{time: t, device: parts[1], district: parts[2], metric: parts[3], value: v, received: rc})
	}
	return rows, sc.Err()
}

// SealAll seals every pending partition (tests and export use it; Close too).
func (a *Archive) SealAll() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seal(func(partition) bool { return true })
}

// seal turns the pending partitions that want says are due into Parquet files.
// The caller holds a.mu.
func (a *Archive) seal(want func(partition) bool) error {
	pending, err := filepath.Glob(filepath.Join(a.dir, "kind=*", "date=*", "hour=*.pending"))
	if err != nil {
		return err
	}
	var errs []error
	for _, path := range pending {
		p, ok := parsePartition(a.dir, path)
		if !ok || !want(p) {
			continue
		}
		if err := a.sealOne(p, path); err != nil {
			errs = append(errs, fmt.Errorf("seal %s: %w", path, err))
		}
	}
	return errors.Join(errs...)
}

func parsePartition(root, pendingPath string) (partition, bool) {
	rel, err := filepath.Rel(root, pendingPath)
	if err != nil {
		return partition{}, false
	}
	parts := strings.Split(rel, string(filepath.Separator))
	if len(parts) != 3 {
		return partition{}, false
	}
	kind, ok1 := strings.CutPrefix(parts[0], "kind=")
	date, ok2 := strings.CutPrefix(parts[1], "date=")
	hh, ok3 := strings.CutPrefix(strings.TrimSuffix(parts[2], ".pending"), "hour=")
	if !ok1 || !ok2 || !ok3 {
		return partition{}, false
	}
	t, err := time.Parse("2006-01-02 15", date+" "+hh)
	if err != nil {
		return partition{}, false
	}
	return partition{kind: kind, hour: t.Unix()}, true
}

func (a *Archive) sealOne(p partition, pendingPath string) error {
	rows, err := readPending(pendingPath)
	if err != nil {
		return err
	}
	rows = dedupe(rows)
	dir := p.dir(a.dir)
	target := filepath.Join(dir, p.base()+".parquet")
	for n := 1; ; n++ {
		if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) {
			break
		}
		target = filepath.Join(dir, fmt.Sprintf("%s.part-%d.parquet", p.base(), n))
	}
	if len(rows) > 0 {
		tmp := target + ".tmp"
		if err := writeParquet(tmp, p.kind, rows); err != nil {
			os.Remove(tmp)
			return err
		}
		if err := os.Rename(tmp, target); err != nil {
			return err
		}
		_ = durable.SyncDir(dir) // best effort: the file itself is complete
		a.m.sealed.Inc()
	}
	return os.Remove(pendingPath)
}

func dedupe(rows []row) []row {
	sort.SliceStable(rows, func(i, j int) bool {
		if rows[i].time != rows[j].time {
			return rows[i].time < rows[j].time
		}
		if rows[i].device != rows[j].device {
			return rows[i].device < rows[j].device
		}
		return rows[i].metric < rows[j].metric
	})
	out := rows[:0]
	for i, r := range rows {
		if i > 0 && r.time == rows[i-1].time && r.device == rows[i-1].device && r.metric == rows[i-1].metric {
			continue
		}
		out = append(out, r)
	}
	return out
}

// archiveSchema is the column layout of every archive file.
var archiveSchema = arrow.NewSchema([]arrow.Field{
	{Name: "time", Type: &arrow.TimestampType{Unit: arrow.Nanosecond, TimeZone: "UTC"}},
	{Name: "device", Type: arrow.BinaryTypes.String},
	{Name: "district", Type: arrow.BinaryTypes.String},
	{Name: "metric", Type: arrow.BinaryTypes.String},
	{Name: "value", Type: arrow.PrimitiveTypes.Float64},
	{Name: "unit", Type: arrow.BinaryTypes.String},
	{Name: "received", Type: &arrow.TimestampType{Unit: arrow.Nanosecond, TimeZone: "UTC"}},
}, nil)

func unitOf(kind, metric string) string {
	if s, ok := devices.SchemaOf(devices.Kind(kind)); ok {
		if m, ok := s.Metric(metric); ok {
			return m.Unit
		}
	}
	return ""
}

func writeParquet(path, kind string, rows []row) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	// pqarrow closes a writer that is an io.Closer: hide Close, to fsync first.
	err = encodeParquet(struct{ io.Writer }{f}, kind, rows)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// encodeParquet writes rows as one Parquet file (zstd, dictionary-encoded strings).
func encodeParquet(w io.Writer, kind string, rows []row) error {
	rec := buildRecord(kind, rows)
	defer rec.Release()
	return writeRecord(w, rec, parquet.NewWriterProperties(parquet.WithCompression(compress.Codecs.Zstd), parquet.WithDictionaryDefault(true)))
}

// writeRecord writes rec as one Parquet file to w: the one Parquet writer of
// the archive and the export.
func writeRecord(w io.Writer, rec arrow.Record, props *parquet.WriterProperties) error {
	fw, err := pqarrow.NewFileWriter(rec.Schema(), w, props, pqarrow.DefaultWriterProps())
	if err != nil {
		return err
	}
	if err := fw.Write(rec); err != nil {
		fw.Close()
		return err
	}
	return fw.Close()
}

func buildRecord(kind string, rows []row) arrow.Record {
	b := array.NewRecordBuilder(memory.DefaultAllocator, archiveSchema)
	defer b.Release()
	ts := b.Field(0).(*array.TimestampBuilder)
	dev := b.Field(1).(*array.StringBuilder)
	dis := b.Field(2).(*array.StringBuilder)
	met := b.Field(3).(*array.StringBuilder)
	val := b.Field(4).(*array.Float64Builder)
	unit := b.Field(5).(*array.StringBuilder)
	rcv := b.Field(6).(*array.TimestampBuilder)
	for _, r := range rows {
		ts.Append(arrow.Timestamp(r.time))
		dev.Append(r.device)
		dis.Append(r.district)
		met.Append(r.metric)
		val.Append(r.value)
		unit.Append(unitOf(kind, r.metric))
		rcv.Append(arrow.Timestamp(r.received))
	}
	return b.NewRecord()
}

// Close seals the partitions that are due; the others stay pending (durable)
// and are sealed after a restart, so a restart does not split an hour into
// part files. It is idempotent.
func (a *Archive) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	now := a.now()
	return a.seal(func(p partition) bool { return now.After(time.Unix(p.hour, 0).Add(time.Hour + a.cfg.Grace)) })
}
