package storage

import (
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"github.com/apache/arrow/go/v15/arrow"
	"github.com/apache/arrow/go/v15/arrow/array"
	"github.com/apache/arrow/go/v15/arrow/memory"
	"github.com/apache/arrow/go/v15/parquet"
	"github.com/apache/arrow/go/v15/parquet/compress"
	"github.com/apache/arrow/go/v15/parquet/file"
	"github.com/apache/arrow/go/v15/parquet/pqarrow"

	"github.com/citypulse/citypulse/devices"
)

// ExportQuery selects archived readings for open-data release.
type ExportQuery struct {
	Kind     string
	District string // empty: all districts
	From, To time.Time
	Format   string // "csv" or "parquet"
	// Coarsen replaces per-device rows by one aggregate per (hour, district,
	// metric): mean, min, max, count, with no device column.
	Coarsen bool
}

// Export bounds.
const (
	maxExportRows  = 10_000_000
	maxExportRange = 31 * 24 * time.Hour
)

// ErrExportTooLarge is returned when a selection exceeds the export bounds.
var ErrExportTooLarge = errors.New("export too large")

// Rows returns the archived readings matching q (sealed files and pending
// rows), sorted by time, device and metric.
func (a *Archive) Rows(ctx context.Context, q ExportQuery) ([]row, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []row
	from, to := q.From.UnixNano(), q.To.UnixNano()
	for h := q.From.Truncate(time.Hour); h.Before(q.To); h = h.Add(time.Hour) {
		p := partition{kind: q.Kind, hour: h.Unix()}
		dir := p.dir(a.dir)
		files, _ := filepath.Glob(filepath.Join(dir, p.base()+"*.parquet"))
		var rows []row
		for _, f := range files {
			rs, err := readParquet(ctx, f)
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", f, err)
			}
			rows = append(rows, rs...)
		}
		if rs, err := readPending(filepath.Join(dir, p.base()+".pending")); err == nil {
			rows = append(rows, rs...)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		for _, r := range rows {
			if r.time < from || r.time >= to || (q.District != "" && r.district != q.District) {
				continue
			}
			out = append(out, r)
			if len(out) > maxExportRows {
				return nil, fmt.Errorf("%w: more than %d rows; narrow kind, district or the time range", ErrExportTooLarge, maxExportRows)
			}
		}
	}
	return dedupe(out), nil
}

// readParquet reads an archive file back with the Arrow reader.
func readParquet(ctx context.Context, path string) ([]row, error) {
	pf, err := file.OpenParquetFile(path, false)
	if err != nil {
		return nil, err
	}
	defer pf.Close()
	fr, err := pqarrow.NewFileReader(pf, pqarrow.ArrowReadProperties{BatchSize: 64 << 10}, memory.DefaultAllocator)
	if err != nil {
		return nil, err
	}
	tbl, err := fr.ReadTable(ctx)
	if err != nil {
		return nil, err
	}
	defer tbl.Release()
	tr := array.NewTableReader(tbl, 64<<10)
	defer tr.Release()
	var out []row
	for tr.Next() {
		rec := tr.Record()
		ts := rec.Column(0).(*array.Timestamp)
		dev := rec.Column(1).(*array.String)
		dis := rec.Column(2).(*array.String)
		met := rec.Column(3).(*array.String)
		val := rec.Column(4).(*array.Float64)
		rcv := rec.Column(6).(*array.Timestamp)
		for i := 0; i < int(rec.NumRows()); i++ {
			out = append(out, row{time: int64(ts.Value(i)), device: dev.Value(i), district: dis.Value(i),
				metric: met.Value(i), value: val.Value(i), received: int64(rcv.Value(i))})
		}
	}
	return out, tr.Err()
}

// aggregate is one coarsened row.
type aggregate struct {
	hour             int64
	district, metric string
	sum, min, max    float64
	count            int64
}

func coarsen(rows []row) []aggregate {
	type key struct {
		hour             int64
		district, metric string
	}
	m := map[key]*aggregate{}
	for _, r := range rows {
		k := key{r.time / int64(time.Hour) * int64(time.Hour), r.district, r.metric}
		a := m[k]
		if a == nil {
			a = &aggregate{hour: k.hour, district: k.district, metric: k.metric, min: math.Inf(1), max: math.Inf(-1)}
			m[k] = a
		}
		a.sum += r.value
		a.min = math.Min(a.min, r.value)
		a.max = math.Max(a.max, r.value)
		a.count++
	}
	out := make([]aggregate, 0, len(m))
	for _, a := range m {
		out = append(out, *a)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].hour != out[j].hour {
			return out[i].hour < out[j].hour
		}
		if out[i].district != out[j].district {
			return out[i].district < out[j].district
		}
		return out[i].metric < out[j].metric
	})
	return out
}

// Export writes the selection to w in q.Format.
func (a *Archive) Export(ctx context.Context, w io.Writer, q ExportQuery) error {
	rows, err := a.Rows(ctx, q)
	if err != nil {
		return err
	}
	return writeExport(w, q, rows)
}

func writeExport(w io.Writer, q ExportQuery, rows []row) error {
	ts := func(ns int64) string { return time.Unix(0, ns).UTC().Format(time.RFC3339Nano) }
	num := func(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
	switch {
	case q.Coarsen && q.Format == "csv":
		cw := csv.NewWriter(w)
		_ = cw.Write([]string{"time", "district", "metric", "mean", "min", "max", "count"})
		for _, g := range coarsen(rows) {
			_ = cw.Write([]string{ts(g.hour), g.district, g.metric, num(g.sum / float64(g.count)), num(g.min), num(g.max), strconv.FormatInt(g.count, 10)})
		}
		cw.Flush()
		return cw.Error()
	case q.Coarsen:
		return encodeAggregates(w, coarsen(rows))
	case q.Format == "csv":
		cw := csv.NewWriter(w)
		_ = cw.Write([]string{"time", "device", "district", "metric", "value", "unit", "received"})
		for _, r := range rows {
			_ = cw.Write([]string{ts(r.time), r.device, r.district, r.metric, num(r.value), unitOf(q.Kind, r.metric), ts(r.received)})
		}
		cw.Flush()
		return cw.Error()
	default:
		return encodeParquet(w, q.Kind, rows)
	}
}

var aggregateSchema = arrow.NewSchema([]arrow.Field{
	{Name: "time", Type: &arrow.TimestampType{Unit: arrow.Nanosecond, TimeZone: "UTC"}},
	{Name: "district", Type: arrow.BinaryTypes.String},
	{Name: "metric", Type: arrow.BinaryTypes.String},
	{Name: "mean", Type: arrow.PrimitiveTypes.Float64},
	{Name: "min", Type: arrow.PrimitiveTypes.Float64},
	{Name: "max", Type: arrow.PrimitiveTypes.Float64},
	{Name: "count", Type: arrow.PrimitiveTypes.Int64},
}, nil)

func encodeAggregates(w io.Writer, gs []aggregate) error {
	b := array.NewRecordBuilder(memory.DefaultAllocator, aggregateSchema)
	defer b.Release()
	for _, g := range gs {
		b.Field(0).(*array.TimestampBuilder).Append(arrow.Timestamp(g.hour))
		b.Field(1).(*array.StringBuilder).Append(g.district)
		b.Field(2).(*array.StringBuilder).Append(g.metric)
		b.Field(3).(*array.Float64Builder).Append(g.sum / float64(g.count))
		b.Field(4).(*array.Float64Builder).Append(g.min)
		b.Field(5).(*array.Float64Builder).Append(g.max)
		b.Field(6).(*array.Int64Builder).Append(g.count)
	}
	rec := b.NewRecord()
	defer rec.Release()
	return writeRecord(w, rec, parquet.NewWriterProperties(parquet.WithCompression(compress.Codecs.Zstd)))
}

// ExportHandler serves GET /api/v1/export?kind=&district=&from=&to=&format=parquet|csv&coarsen=district.
// from and to are RFC 3339 or unix seconds (default: the last 24 hours).
func (a *Archive) ExportHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := parseExport(r, time.Now())
		if err != nil {
			writeErr(w, badData(err))
			return
		}
		if q.Format == "csv" {
			w.Header().Set("Content-Type", "text/csv; charset=utf-8")
		} else {
			w.Header().Set("Content-Type", "application/vnd.apache.parquet")
		}
		name := fmt.Sprintf("citypulse-%s-%s.%s", q.Kind, q.From.UTC().Format("20060102T15"), q.Format)
		w.Header().Set("Content-Disposition", `attachment; filename="`+name+`"`)
		// Select first, so that a refusal still gets a proper status.
		rows, err := a.Rows(r.Context(), q)
		if errors.Is(err, ErrExportTooLarge) {
			writeErr(w, badData(err))
			return
		}
		if err != nil {
			writeErr(w, &apiError{"internal", http.StatusInternalServerError, err})
			return
		}
		if err := writeExport(w, q, rows); err != nil {
			a.log.Error("export failed mid-stream", "err", err)
		}
	})
}

func parseExport(r *http.Request, now time.Time) (ExportQuery, error) {
	q := ExportQuery{Kind: r.FormValue("kind"), District: r.FormValue("district"), Format: r.FormValue("format"),
		From: now.Add(-24 * time.Hour), To: now}
	if q.Kind == "" {
		return q, errors.New("kind is required (pipe, power, water, traffic_light, parking)")
	}
	if !knownKind(q.Kind) {
		return q, fmt.Errorf("unknown kind %q", q.Kind)
	}
	if q.Format == "" {
		q.Format = "parquet"
	}
	if q.Format != "csv" && q.Format != "parquet" {
		return q, fmt.Errorf("format %q: want parquet or csv", q.Format)
	}
	var err error
	if s := r.FormValue("from"); s != "" {
		if q.From, err = parseTime(s); err != nil {
			return q, fmt.Errorf("from: %w", err)
		}
	}
	if s := r.FormValue("to"); s != "" {
		if q.To, err = parseTime(s); err != nil {
			return q, fmt.Errorf("to: %w", err)
		}
	}
	if !q.To.After(q.From) {
		return q, errors.New("to must be after from")
	}
	if q.To.Sub(q.From) > maxExportRange {
		return q, fmt.Errorf("the range may span at most %v", maxExportRange)
	}
	switch r.FormValue("coarsen") {
	case "":
	case "district":
		q.Coarsen = true
	default:
		return q, fmt.Errorf("coarsen %q: want district", r.FormValue("coarsen"))
	}
	return q, nil
}

// knownKind says k is a device kind (the archive partitions by kind).
func knownKind(k string) bool {
	_, ok := devices.SchemaOf(devices.Kind(k))
	return ok
}
