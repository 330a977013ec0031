package storage

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/golang/snappy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/prompb"

	"github.com/citypulse/citypulse/internal/backoff"
	"github.com/citypulse/citypulse/pipeline"
)

// RemoteWriteConfig configures the Prometheus remote-write sink: any store
// that accepts remote write 1.0 (Prometheus with
// --web.enable-remote-write-receiver, VictoriaMetrics, Mimir, Thanos
// receive, ...).
type RemoteWriteConfig struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// URL is the write endpoint, e.g. http://victoria:8428/api/v1/write.
	URL string `mapstructure:"url" yaml:"url"`
	// BearerToken, if set, is sent as Authorization: Bearer.
	BearerToken string `mapstructure:"bearer_token" yaml:"bearer_token"`
	// Timeout bounds one request.
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
	// MaxSamplesPerRequest and MaxRequestBytes (uncompressed protobuf) bound
	// one request; a batch is split into as many requests as needed.
	MaxSamplesPerRequest int `mapstructure:"max_samples_per_request" yaml:"max_samples_per_request"`
	MaxRequestBytes      int `mapstructure:"max_request_bytes" yaml:"max_request_bytes"`
	// Batch is this sink's batch policy (batch size, bytes, flush interval).
	Batch pipeline.BatchPolicy `mapstructure:"batch" yaml:"batch"`
	// MaxRetryAfter caps how long a Retry-After from the store is honoured.
	MaxRetryAfter time.Duration `mapstructure:"max_retry_after" yaml:"max_retry_after"`
	// QueryURL is the store's Prometheus query API base (URL + /api/v1/query
	// is a query), which the query API forwards to in cluster mode. Empty:
	// the write URL without its /api/v1/write (VictoriaMetrics, Prometheus).
	QueryURL string `mapstructure:"query_url" yaml:"query_url"`
}

// QueryBase is the store's query API base: QueryURL, or the write URL
// without /api/v1/write; empty when neither gives one.
func (c RemoteWriteConfig) QueryBase() string {
	if c.QueryURL != "" {
		return c.QueryURL
	}
	if base, ok := strings.CutSuffix(c.URL, "/api/v1/write"); ok {
		return base
	}
	return ""
}

// DefaultRemoteWrite returns the defaults (disabled).
func DefaultRemoteWrite() RemoteWriteConfig {
	return RemoteWriteConfig{
		Timeout:              30 * time.Second,
		MaxSamplesPerRequest: 2000, // Prometheus's max_samples_per_send
		MaxRequestBytes:      4 << 20,
		Batch:                pipeline.BatchPolicy{MaxReadings: 5000, MaxBytes: 1 << 20, MaxAge: time.Second},
		MaxRetryAfter:        5 * time.Minute,
	}
}

// Validate checks the section; messages name the key.
func (c RemoteWriteConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if u, err := url.Parse(c.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("storage.remote_write.url %q: want http(s)://host:port/path (e.g. /api/v1/write)", c.URL))
	}
	if c.QueryURL != "" {
		if u, err := url.Parse(c.QueryURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("storage.remote_write.query_url %q: want http(s)://host:port[/prefix] (the Prometheus query API's base)", c.QueryURL))
		}
	}
	if c.Timeout < time.Second {
		errs = append(errs, fmt.Errorf("storage.remote_write.timeout must be at least 1s, got %v", c.Timeout))
	}
	if c.MaxSamplesPerRequest < 1 {
		errs = append(errs, fmt.Errorf("storage.remote_write.max_samples_per_request must be >= 1, got %d", c.MaxSamplesPerRequest))
	}
	if c.MaxRequestBytes < 1024 {
		errs = append(errs, fmt.Errorf("storage.remote_write.max_request_bytes must be at least 1024, got %d", c.MaxRequestBytes))
	}
	if c.MaxRetryAfter <= 0 {
		errs = append(errs, fmt.Errorf("storage.remote_write.max_retry_after must be > 0, got %v", c.MaxRetryAfter))
	}
	errs = append(errs, c.Batch.Validate("storage.remote_write.batch"))
	return errors.Join(errs...)
}

// RemoteWrite writes readings to a store with Prometheus remote write 1.0
// (prompb.WriteRequest, protobuf, snappy). Series are named as in the
// embedded store (seriesLabels): <kind>_<metric>{device, district, kind}, or
// city_<name>{district} for a city roll-up. A sample's timestamp is the
// reading's time in ms, rounded to the nearest ms.
//
// Errors: a transport error, a timeout, 5xx or 429 fails the batch (the
// pipeline retries it with backoff; a Retry-After is honoured first, up to
// max_retry_after); 401, 403 and 404 too, since the fix is the config, not
// the data (the backlog stays in the journal). Any other 4xx means the store
// refused the data: remote write receivers store the good samples of a
// request and answer 400 for the rest, so the batch is not resent; the error
// wraps pipeline.ErrPermanent (counted and logged by the pipeline).
type RemoteWrite struct {
	cfg    RemoteWriteConfig
	client *http.Client
	log    *slog.Logger
	m      *remoteWriteMetrics
	sleep  func(ctx context.Context, d time.Duration) bool
}

type remoteWriteMetrics struct {
	samples  prometheus.Counter
	requests *prometheus.CounterVec
}

// OpenRemoteWrite builds the sink. It connects nothing yet.
func OpenRemoteWrite(cfg RemoteWriteConfig, log *slog.Logger, reg prometheus.Registerer) (*RemoteWrite, error) {
	cfg.Enabled = true
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &remoteWriteMetrics{
		samples: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_storage_remote_write_samples_total", Help: "Samples accepted by the remote-write store."}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_storage_remote_write_requests_total",
			Help: "Remote-write requests, by result (ok, throttled, refused: a config error, bad_data: the store refused samples, error)."},
			[]string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.samples, m.requests)
	}
	return &RemoteWrite{cfg: cfg, client: &http.Client{Timeout: cfg.Timeout}, log: log, m: m, sleep: backoff.Sleep}, nil
}

// Name is the sink's name.
func (w *RemoteWrite) Name() string { return "remote_write" }

// Write sends the batch in requests of bounded size, in order. A request
// that failed in a way worth retrying stops the batch at once (the pipeline
// retries the whole batch: a store absorbs a repeated identical sample). A
// request whose samples the store refused does not stop the others: they are
// sent, and the error returned counts only the refused samples.
func (w *RemoteWrite) Write(ctx context.Context, b pipeline.Batch) error {
	var refused *RefusedError
	for _, req := range buildWriteRequests(b.Readings, w.cfg.MaxSamplesPerRequest, w.cfg.MaxRequestBytes) {
		err := w.send(ctx, req)
		switch {
		case err == nil:
		case errors.Is(err, pipeline.ErrPermanent):
			if refused == nil {
				refused = &RefusedError{err: err}
			}
			refused.samples += countSamples(req)
		default:
			return err
		}
	}
	if refused != nil {
		return refused
	}
	return nil
}

// RefusedError is the store's refusal of some of a batch's samples: the
// batch's other requests were accepted. It wraps pipeline.ErrPermanent.
type RefusedError struct {
	samples int
	err     error
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("%d samples refused: %v", e.samples, e.err)
}

// Unwrap returns the first refusal.
func (e *RefusedError) Unwrap() error { return e.err }

// Dropped is the number of readings refused (one sample per reading).
func (e *RefusedError) Dropped() int { return e.samples }

// maxSampleBytes bounds one encoded sample: tag and length (2), the value
// (1+8), the timestamp (1 + a varint of up to 10 bytes).
const maxSampleBytes = 22

// buildWriteRequests groups readings into series (samples in time order, as
// receivers require) and cuts them into requests of at most maxSamples
// samples and about maxBytes of protobuf; a series may span requests.
func buildWriteRequests(rs []pipeline.Reading, maxSamples, maxBytes int) []*prompb.WriteRequest {
	type series struct {
		lset    labels.Labels
		samples []prompb.Sample
	}
	index := map[string]int{}
	var all []*series
	for i := range rs {
		r := &rs[i]
		lset := seriesLabels(r)
		key := lset.String()
		j, ok := index[key]
		if !ok {
			j = len(all)
			index[key] = j
			all = append(all, &series{lset: lset})
		}
		all[j].samples = append(all[j].samples, prompb.Sample{Value: r.Value, Timestamp: pipeline.Millis(r.Time)})
	}
	var reqs []*prompb.WriteRequest
	cur, n, size := &prompb.WriteRequest{}, 0, 0
	for _, s := range all {
		slices.SortStableFunc(s.samples, func(a, b prompb.Sample) int { return cmp.Compare(a.Timestamp, b.Timestamp) })
		pl := make([]prompb.Label, 0, s.lset.Len())
		s.lset.Range(func(l labels.Label) {
			pl = append(pl, prompb.Label{Name: l.Name, Value: l.Value})
		})
		// A series costs its labels and a field header (tag and a length
		// of up to 4 bytes) once per request it is in.
		lsize := (&prompb.TimeSeries{Labels: pl}).Size() + 5
		for rest := s.samples; len(rest) > 0; {
			if n == maxSamples || (n > 0 && size+lsize+maxSampleBytes > maxBytes) {
				reqs = append(reqs, cur)
				cur, n, size = &prompb.WriteRequest{}, 0, 0
			}
			k := min(len(rest), maxSamples-n, max(1, (maxBytes-size-lsize)/maxSampleBytes))
			cur.Timeseries = append(cur.Timeseries, prompb.TimeSeries{Labels: pl, Samples: rest[:k]})
			n += k
			size += lsize + maxSampleBytes*k
			rest = rest[k:]
		}
	}
	if n > 0 {
		reqs = append(reqs, cur)
	}
	return reqs
}

// send posts one request and classifies the answer.
func (w *RemoteWrite) send(ctx context.Context, wr *prompb.WriteRequest) error {
	raw, err := wr.Marshal()
	if err != nil {
		return fmt.Errorf("remote write: marshal request: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.cfg.URL, bytes.NewReader(snappy.Encode(nil, raw)))
	if err != nil {
		return fmt.Errorf("remote write to %s: %w", w.cfg.URL, err)
	}
	req.Header.Set("Content-Encoding", "snappy")
	req.Header.Set("Content-Type", "application/x-protobuf")
	req.Header.Set("X-Prometheus-Remote-Write-Version", "0.1.0")
	req.Header.Set("User-Agent", "citypulse")
	if w.cfg.BearerToken != "" {
		req.Header.Set("Authorization", "Bearer "+w.cfg.BearerToken)
	}
	resp, err := w.client.Do(req)
	if err != nil {
		w.m.requests.WithLabelValues("error").Inc()
		return fmt.Errorf("remote write to %s: %w", w.cfg.URL, err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	_ = resp.Body.Close()
	msg := strings.TrimSpace(string(body))
	code := resp.StatusCode
	switch {
	case code/100 == 2:
		w.m.requests.WithLabelValues("ok").Inc()
		w.m.samples.Add(float64(countSamples(wr)))
		return nil
	case code == http.StatusTooManyRequests || code/100 == 5:
		w.m.requests.WithLabelValues("throttled").Inc()
		if d := retryAfter(resp.Header.Get("Retry-After")); d > 0 {
			d = min(d, w.cfg.MaxRetryAfter)
			w.log.Warn("remote-write store asked to retry later", "status", code, "retry_after", d)
			w.sleep(ctx, d)
		}
		return fmt.Errorf("remote write to %s: %d %s (retried)", w.cfg.URL, code, msg)
	case code == http.StatusUnauthorized || code == http.StatusForbidden || code == http.StatusNotFound:
		w.m.requests.WithLabelValues("refused").Inc()
		return fmt.Errorf("remote write to %s refused (%d %s): check storage.remote_write.url and bearer_token; the backlog stays in the journal", w.cfg.URL, code, msg)
	default:
		w.m.requests.WithLabelValues("bad_data").Inc()
		return fmt.Errorf("remote write to %s: the store refused samples (%d %s): %w", w.cfg.URL, code, msg, pipeline.ErrPermanent)
	}
}

func countSamples(wr *prompb.WriteRequest) int {
	n := 0
	for i := range wr.Timeseries {
		n += len(wr.Timeseries[i].Samples)
	}
	return n
}

// retryAfter parses a Retry-After in seconds or as an HTTP date (0: none).
func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}
