package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest/payload"
	"github.com/citypulse/citypulse/pipeline"
)

// Submitter is what a gateway needs of the pipeline: Submit journals the readings
// of one device and returns once they are durable, or with an error
// (pipeline.ErrBackpressure when the journal is full).
type Submitter interface {
	Submit(ctx context.Context, rs []pipeline.Reading) error
}

// Counted reasons for rejects decided here (payload.Reason* are decided by the decoder).
const (
	ReasonUnauthorized  = "unauthorized"   // bad credentials
	ReasonUnknownDevice = "unknown_device" // no such device
	ReasonForbidden     = "forbidden"      // a device writing to another device's topic/path
	ReasonUnknownMetric = "unknown_metric" // not a metric of the device's kind
	ReasonOutOfRange    = "out_of_range"   // outside the metric's physical range
	ReasonNotFinite     = "not_finite"     // NaN or ±Inf
	ReasonBadState      = "bad_state"      // a string value that is not one of the metric's states
	ReasonTooOld        = "too_old"        // older than ingest.max_past
	ReasonTooNew        = "too_new"        // later than now + ingest.max_future
	ReasonBackpressure  = "backpressure"   // journal full: not acknowledged, the device retries
	ReasonRateLimited   = "rate_limited"   // over the device's rate limit: not acknowledged, the device backs off
)

// HandlerOptions configures a Handler.
type HandlerOptions struct {
	// MaxPast and MaxFuture bound a reading's time relative to now.
	MaxPast   time.Duration
	MaxFuture time.Duration
	Logger    *slog.Logger
	// Registerer receives the handler's metrics; nil means none are registered.
	Registerer prometheus.Registerer
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// RateLimit bounds each device's readings per second (0: no limit), with
	// bursts of up to RateBurst readings.
	RateLimit float64
	RateBurst int
}

// Result counts what became of one message.
type Result struct {
	Accepted int
	Rejected int
}

// Handler turns one message of an authenticated device into validated readings
// and submits them. It is shared by every gateway, so every transport validates
// and counts the same way.
type Handler struct {
	sub     Submitter
	opts    HandlerOptions
	log     *slog.Logger
	m       *handlerMetrics
	now     func() time.Time
	lastLog atomic.Int64 // unix ns of the last reject logged (sampling)
	pool    sync.Pool
	limit   *limiter
}

type handlerMetrics struct {
	rejected *prometheus.CounterVec
	accepted prometheus.Counter
	messages *prometheus.CounterVec
}

func newHandlerMetrics(reg prometheus.Registerer) *handlerMetrics {
	m := &handlerMetrics{
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_readings_rejected_total",
			Help: "Readings (or whole messages, for message-level reasons) rejected, by reason.",
		}, []string{"reason"}),
		accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_readings_accepted_total",
			Help: "Readings validated and journaled.",
		}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_ingest_messages_total",
			Help: "Messages received from devices, by payload format.",
		}, []string{"format"}),
	}
	if reg != nil {
		reg.MustRegister(m.rejected, m.accepted, m.messages)
	}
	return m
}

// NewHandler returns a Handler that submits to sub.
func NewHandler(sub Submitter, opts HandlerOptions) *Handler {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxPast <= 0 {
		opts.MaxPast = 7 * 24 * time.Hour
	}
	if opts.MaxFuture <= 0 {
		opts.MaxFuture = 10 * time.Minute
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	h := &Handler{sub: sub, opts: opts, log: opts.Logger, m: newHandlerMetrics(opts.Registerer), now: now,
		limit: newLimiter(opts.RateLimit, opts.RateBurst)}
	h.pool.New = func() any { s := make([]pipeline.Reading, 0, 64); return &s }
	return h
}

// Reject counts n rejects for a reason decided by a gateway (e.g. unauthorized),
// and logs a sample.
func (h *Handler) Reject(reason string, n int, attrs ...any) {
	h.m.rejected.WithLabelValues(reason).Add(float64(n))
	h.logSample("rejected", append([]any{"reason", reason, "count", n}, attrs...)...)
}

// logSample logs at most one reject per second, so bad input at rate cannot
// flood the log.
func (h *Handler) logSample(msg string, attrs ...any) {
	now := time.Now().UnixNano()
	last := h.lastLog.Load()
	if now-last < int64(time.Second) || !h.lastLog.CompareAndSwap(last, now) {
		return
	}
	h.log.Warn(msg, attrs...)
}

// Handle decodes, validates and submits one message from dev. Invalid records are
// rejected and counted while the rest are accepted. The error is non-nil when
// nothing was journaled: a *payload.Error for an unusable message (answer "bad
// request"), a *RateLimitError (ErrRateLimited) when the device is over its
// rate limit (do not acknowledge; the device backs off), pipeline.ErrBackpressure
// when the journal is full (do not acknowledge; the device retries), or the
// context's error.
func (h *Handler) Handle(ctx context.Context, dev devices.Device, f payload.Format, body []byte) (Result, error) {
	var res Result
	if f == payload.Unknown {
		f = payload.Sniff(body)
	}
	h.m.messages.WithLabelValues(f.String()).Inc()
	now := h.now()
	recs, rejects, err := payload.Decode(f, body, dev.ID, now)
	if err != nil {
		reason := payload.ReasonMalformed
		var pe *payload.Error
		if errors.As(err, &pe) {
			reason = pe.Reason
		} else {
			err = &payload.Error{Reason: reason, Err: err}
		}
		h.Reject(reason, 1, "device", dev.ID, "err", err)
		return res, fmt.Errorf("decode %s from %s: %w", f, dev.ID, err)
	}
	for _, r := range rejects {
		h.Reject(r.Reason, 1, "device", dev.ID, "err", r.Err)
	}
	res.Rejected = len(rejects)

	schema, ok := devices.SchemaOf(dev.Kind)
	if !ok {
		h.Reject(ReasonUnknownMetric, len(recs), "device", dev.ID, "err", "device has no schema")
		res.Rejected += len(recs)
		return res, nil
	}
	bufp := h.pool.Get().(*[]pipeline.Reading)
	rs := (*bufp)[:0]
	defer func() { *bufp = rs[:0]; h.pool.Put(bufp) }()
	minT, maxT := now.Add(-h.opts.MaxPast).UnixNano(), now.Add(h.opts.MaxFuture).UnixNano()
	for _, rec := range recs {
		reason, err := h.validate(schema, &rec, minT, maxT)
		if err != nil {
			h.Reject(reason, 1, "device", dev.ID, "err", err)
			res.Rejected++
			continue
		}
		m, _ := schema.Metric(rec.Metric)
		rs = append(rs, pipeline.Reading{
			Device:   dev.ID,
			Kind:     string(dev.Kind),
			District: dev.District,
			Metric:   m.Name, // the schema's string: interned for free
			Value:    rec.Value,
			Time:     rec.Time,
			Received: now.UnixNano(),
		})
	}
	if len(rs) == 0 {
		return res, nil
	}
	if ok, wait := h.limit.allow(dev.ID, len(rs), now); !ok {
		h.Reject(ReasonRateLimited, len(rs), "device", dev.ID)
		res.Rejected += len(rs)
		return res, &RateLimitError{RetryAfter: wait}
	}
	if err := h.sub.Submit(ctx, rs); err != nil {
		if errors.Is(err, pipeline.ErrBackpressure) {
			h.Reject(ReasonBackpressure, len(rs), "device", dev.ID, "err", err)
		}
		return res, err
	}
	res.Accepted = len(rs)
	h.m.accepted.Add(float64(len(rs)))
	return res, nil
}

func (h *Handler) validate(schema *devices.Schema, rec *payload.Record, minT, maxT int64) (string, error) {
	m, ok := schema.Metric(rec.Metric)
	if !ok {
		return ReasonUnknownMetric, fmt.Errorf("%s has no metric %q", schema.Kind, rec.Metric)
	}
	if rec.HasStr {
		v, ok := m.StateIndex(rec.Str)
		if !ok {
			return ReasonBadState, fmt.Errorf("%s %s: %q is not one of %v", schema.Kind, m.Name, rec.Str, m.States)
		}
		rec.Value = v
	}
	if err := m.Check(schema.Kind, rec.Value); err != nil {
		var re *devices.RangeError
		if errors.As(err, &re) {
			return ReasonOutOfRange, err
		}
		return ReasonNotFinite, err
	}
	switch {
	case rec.Time < minT:
		return ReasonTooOld, fmt.Errorf("%s: time %s is older than the accepted window (ingest.max_past %v)",
			m.Name, time.Unix(0, rec.Time).UTC().Format(time.RFC3339), h.opts.MaxPast)
	case rec.Time > maxT:
		return ReasonTooNew, fmt.Errorf("%s: time %s is in the future beyond ingest.max_future %v",
			m.Name, time.Unix(0, rec.Time).UTC().Format(time.RFC3339), h.opts.MaxFuture)
	}
	return "", nil
}
