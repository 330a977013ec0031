package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	influxdb2 "github.com/influxdata/influxdb-client-go/v2"
	"github.com/influxdata/influxdb-client-go/v2/api"
	influxhttp "github.com/influxdata/influxdb-client-go/v2/api/http"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/internal/backoff"
	"github.com/citypulse/citypulse/pipeline"
)

// InfluxConfig configures the InfluxDB sink: any store that accepts the
// InfluxDB v2 write API (InfluxDB 2.x/3.x, InfluxDB 1.8 with /api/v2/write,
// VictoriaMetrics, ...).
type InfluxConfig struct {
	Enabled bool   `mapstructure:"enabled" yaml:"enabled"`
	URL     string `mapstructure:"url" yaml:"url"`
	Org     string `mapstructure:"org" yaml:"org"`
	// Bucket is the v2 bucket (InfluxDB 1.8: "<database>/<retention policy>" or "<database>").
	Bucket string `mapstructure:"bucket" yaml:"bucket"`
	Token  string `mapstructure:"token" yaml:"token"`
	// Timeout bounds one write request.
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
	// Batch is this sink's batch policy (batch size, bytes, flush interval).
	Batch pipeline.BatchPolicy `mapstructure:"batch" yaml:"batch"`
	// MaxRetryAfter caps how long a Retry-After from the store is honoured.
	MaxRetryAfter time.Duration `mapstructure:"max_retry_after" yaml:"max_retry_after"`
}

// DefaultInflux returns the defaults (disabled).
func DefaultInflux() InfluxConfig {
	return InfluxConfig{
		Org:           "citypulse",
		Bucket:        "citypulse",
		Timeout:       10 * time.Second,
		Batch:         pipeline.BatchPolicy{MaxReadings: 5000, MaxBytes: 1 << 20, MaxAge: time.Second},
		MaxRetryAfter: 5 * time.Minute,
	}
}

// Validate checks the section; messages name the key.
func (c InfluxConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if u, err := url.Parse(c.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("storage.influx.url %q: want http(s)://host:port", c.URL))
	}
	if c.Bucket == "" {
		errs = append(errs, errors.New("storage.influx.bucket must not be empty"))
	}
	if c.Timeout < time.Second {
		errs = append(errs, fmt.Errorf("storage.influx.timeout must be at least 1s, got %v", c.Timeout))
	}
	if c.MaxRetryAfter <= 0 {
		errs = append(errs, fmt.Errorf("storage.influx.max_retry_after must be > 0, got %v", c.MaxRetryAfter))
	}
	errs = append(errs, c.Batch.Validate("storage.influx.batch"))
	return errors.Join(errs...)
}

// Influx writes readings to a store through the InfluxDB v2 write API:
// measurement = kind, tags device and district, one field per metric,
// nanosecond timestamps. Readings of one device at one time share a line.
//
// Errors: a timeout, 5xx or 429 fails the batch (the pipeline retries it with
// backoff; a Retry-After is honoured first). A 400 (or 413/422) means the data
// itself is refused: the batch is bisected until the refused lines are found;
// each goes to the dead-letter file (counted) and the rest is written.
type Influx struct {
	cfg      InfluxConfig
	client   influxdb2.Client
	write    api.WriteAPIBlocking
	log      *slog.Logger
	m        *influxMetrics
	deadPath string
	deadMu   sync.Mutex
	pool     sync.Pool
	sleep    func(ctx context.Context, d time.Duration) bool
}

type influxMetrics struct {
	points   prometheus.Counter
	requests *prometheus.CounterVec
	dead     prometheus.Counter
}

// OpenInflux builds the sink; deadLetterPath is the file that refused lines are
// appended to. It connects nothing yet.
func OpenInflux(cfg InfluxConfig, deadLetterPath string, log *slog.Logger, reg prometheus.Registerer) (*Influx, error) {
	cfg.Enabled = true
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opts := influxdb2.DefaultOptions().
		SetPrecision(time.Nanosecond).
		SetHTTPRequestTimeout(uint(cfg.Timeout / time.Second)).
		SetMaxRetries(0)
	client := influxdb2.NewClientWithOptions(cfg.URL, cfg.Token, opts)
	x := &Influx{cfg: cfg, client: client, write: client.WriteAPIBlocking(cfg.Org, cfg.Bucket), log: log, deadPath: deadLetterPath, sleep: backoff.Sleep}
	x.pool.New = func() any { return new(lineBatch) }
	x.m = &influxMetrics{
		points: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_storage_influx_lines_written_total", Help: "Line-protocol lines accepted by the InfluxDB-compatible store."}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_storage_influx_requests_total", Help: "Write requests to the InfluxDB-compatible store, by result."}, []string{"result"}),
		dead: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_storage_influx_dead_letter_lines_total", Help: "Lines the store refused as bad data, written to the dead-letter file."}),
	}
	if reg != nil {
		reg.MustRegister(x.m.points, x.m.requests, x.m.dead)
	}
	return x, nil
}

// Name is the sink's name.
func (x *Influx) Name() string { return "influx" }

// Close releases the client.
func (x *Influx) Close() { x.client.Close() }

// Write sends the batch as line protocol.
func (x *Influx) Write(ctx context.Context, b pipeline.Batch) error {
	lb := x.pool.Get().(*lineBatch)
	defer x.pool.Put(lb)
	lb.buf, lb.ends = appendLines(lb.buf[:0], lb.ends[:0], b.Readings)
	body := string(lb.buf) // the client sends one string: one copy of the batch
	return x.send(ctx, body, lb.ends, 0, len(lb.ends))
}

// lineBatch is a batch in line protocol: the lines, each followed by a
// newline, and the offset after each newline (to bisect a batch the store
// refused as bad data).
type lineBatch struct {
	buf  []byte
	ends []int
}

// send writes lines [i, j) of body; on a data error it bisects.
func (x *Influx) send(ctx context.Context, body string, ends []int, i, j int) error {
	if i >= j {
		return nil
	}
	from := 0
	if i > 0 {
		from = ends[i-1]
	}
	text := body[from : ends[j-1]-1] // without the last newline, as the client adds none
	err := x.write.WriteRecord(ctx, text)
	if err == nil {
		x.m.requests.WithLabelValues("ok").Inc()
		x.m.points.Add(float64(j - i))
		return nil
	}
	var he *influxhttp.Error
	if !errors.As(err, &he) {
		x.m.requests.WithLabelValues("error").Inc()
		return fmt.Errorf("influx write to %s: %w", x.cfg.URL, err)
	}
	switch he.StatusCode {
	case 400, 413, 422:
		x.m.requests.WithLabelValues("bad_data").Inc()
		if j-i == 1 {
			return x.deadLetter(text, he)
		}
		mid := (i + j) / 2
		if err := x.send(ctx, body, ends, i, mid); err != nil {
			return err
		}
		return x.send(ctx, body, ends, mid, j)
	case 429, 503:
		x.m.requests.WithLabelValues("throttled").Inc()
		if he.RetryAfter > 0 {
			wait := min(time.Duration(he.RetryAfter)*time.Second, x.cfg.MaxRetryAfter)
			x.log.Warn("influx store asked to retry later", "status", he.StatusCode, "retry_after", wait)
			x.sleep(ctx, wait)
		}
		return fmt.Errorf("influx write to %s: %d %w", x.cfg.URL, he.StatusCode, he)
	case 401, 403, 404:
		x.m.requests.WithLabelValues("refused").Inc()
		return fmt.Errorf("influx write to %s refused (%d: %v): check storage.influx.token, org and bucket; the backlog stays in the journal", x.cfg.URL, he.StatusCode, he)
	default:
		x.m.requests.WithLabelValues("error").Inc()
		return fmt.Errorf("influx write to %s: %d %w", x.cfg.URL, he.StatusCode, he)
	}
}

// deadLetter appends a refused line, with the reason, to the dead-letter file.
func (x *Influx) deadLetter(line string, reason error) error {
	x.deadMu.Lock()
	defer x.deadMu.Unlock()
	if err := os.MkdirAll(filepath.Dir(x.deadPath), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(x.deadPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("open influx dead-letter file: %w", err)
	}
	_, err = fmt.Fprintf(f, "# %s %s\n%s\n", time.Now().UTC().Format(time.RFC3339), strings.ReplaceAll(reason.Error(), "\n", " "), line)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write influx dead-letter file: %w", err)
	}
	x.m.dead.Inc()
	x.log.Error("influx store refused a line as bad data; it was written to the dead-letter file", "file", x.deadPath, "err", reason)
	return nil
}

// appendLines renders readings as line protocol, one line per (device, time),
// each followed by a newline, onto buf, and the offset after each line onto
// ends: kind,device=<id>,district=<d> m1=v1,m2=v2 <ns>.
func appendLines(buf []byte, ends []int, rs []pipeline.Reading) ([]byte, []int) {
	for i := 0; i < len(rs); {
		r := &rs[i]
		buf = appendEscaped(buf, r.Kind, false)
		buf = append(buf, ",device="...)
		buf = appendEscaped(buf, r.Device, true)
		buf = append(buf, ",district="...)
		buf = appendEscaped(buf, r.District, true)
		sep := byte(' ')
		j := i
		for ; j < len(rs) && rs[j].Device == r.Device && rs[j].Time == r.Time && !hasMetric(rs[i:j], rs[j].Metric); j++ {
			buf = append(buf, sep)
			sep = ','
			buf = appendEscaped(buf, rs[j].Metric, true)
			buf = append(buf, '=')
			buf = strconv.AppendFloat(buf, rs[j].Value, 'g', -1, 64)
		}
		buf = append(buf, ' ')
		buf = strconv.AppendInt(buf, r.Time, 10)
		buf = append(buf, '\n')
		ends = append(ends, len(buf))
		i = j
	}
	return buf, ends
}

// hasMetric reports whether m already has a field in the line being built.
func hasMetric(line []pipeline.Reading, m string) bool {
	for i := range line {
		if line[i].Metric == m {
			return true
		}
	}
	return false
}

// appendEscaped appends s as a measurement (commas and spaces escaped) or,
// with tag, as a tag key, tag value or field key (equal signs too).
func appendEscaped(buf []byte, s string, tag bool) []byte {
	from := 0
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == ',' || c == ' ' || tag && c == '=' {
			buf = append(append(buf, s[from:i]...), '\\', c)
			from = i + 1
		}
	}
	return append(buf, s[from:]...)
}
