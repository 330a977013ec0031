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

// Submitter is what a gateway needs of the pipeline (in cluster mode, of the
// JetStream publisher): Begin queues the readings of one device behind its
// earlier ones and returns at once, or with an error decided before queueing
// (pipeline.ErrBackpressure when the journal is full); the Waiter says when
// they are durable. A nil Waiter with a nil error: nothing was queued.
type Submitter interface {
	Begin(ctx context.Context, rs []pipeline.Reading) (Waiter, error)
}

// Waiter is one queued submission. Wait returns nil once its readings are
// durable, or why not (pipeline.ErrBackpressure when they could not be
// journaled); it is called exactly once, and the readings stay unchanged
// until it returned (after ctx's error, for good).
type Waiter interface {
	Wait(ctx context.Context) error
}

// Local is the machine's own pipeline as a Submitter.
func Local(p *pipeline.Pipeline) Submitter { return localSubmitter{p} }

type localSubmitter struct{ p *pipeline.Pipeline }

func (l localSubmitter) Begin(ctx context.Context, rs []pipeline.Reading) (Waiter, error) {
	w, err := l.p.Begin(ctx, rs)
	if w == nil { // no nil *Pending in a non-nil Waiter
		return nil, err
	}
	return w, nil
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
	pool    sync.Pool    // *Pending, each with its readings buffer
	limit   *limiter
}

type handlerMetrics struct {
	rejected *prometheus.CounterVec
	accepted prometheus.Counter
	messages *prometheus.CounterVec
	byFormat [payload.JSON + 1]prometheus.Counter // messages' children, resolved once
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
	for f := range m.byFormat {
		m.byFormat[f] = m.messages.WithLabelValues(payload.Format(f).String())
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
	h.pool.New = func() any { return &Pending{h: h, rs: make([]pipeline.Reading, 0, 64)} }
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

// Handle decodes, validates and submits one message from dev, and returns
// once its readings are durable. Invalid records are rejected and counted
// while the rest are accepted. The error is non-nil when nothing was
// journaled: a *payload.Error for an unusable message (answer "bad
// request"), a *RateLimitError (ErrRateLimited) when the device is over its
// rate limit (do not acknowledge; the device backs off),
// pipeline.ErrBackpressure when the journal is full (do not acknowledge; the
// device retries), or the context's error.
func (h *Handler) Handle(ctx context.Context, dev devices.Device, f payload.Format, body []byte) (Result, error) {
	p, res, err := h.Begin(ctx, dev, f, body)
	if p == nil {
		return res, err
	}
	return p.Wait(ctx)
}

// Pending is one message whose readings are being journaled (Begin).
type Pending struct {
	h   *Handler
	w   Waiter
	rs  []pipeline.Reading
	res Result
}

// Begin decodes and validates one message from dev and queues its readings
// behind the device's earlier messages, without waiting for the journal: a
// gateway reads the device's next message meanwhile and acknowledges this
// one when Wait returns nil. The errors are Handle's, decided before
// queueing; a nil *Pending with a nil error means nothing was left to
// journal (res counts the rejects). body is not kept.
func (h *Handler) Begin(ctx context.Context, dev devices.Device, f payload.Format, body []byte) (*Pending, Result, error) {
	var res Result
	if f == payload.Unknown {
		f = payload.Sniff(body)
	}
	if f >= 0 && int(f) < len(h.m.byFormat) {
		h.m.byFormat[f].Inc()
	} else {
		h.m.messages.WithLabelValues(f.String()).Inc()
	}
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
		return nil, res, fmt.Errorf("decode %s from %s: %w", f, dev.ID, err)
	}
	for _, r := range rejects {
		h.Reject(r.Reason, 1, "device", dev.ID, "err", r.Err)
	}
	res.Rejected = len(rejects)

	schema, ok := devices.SchemaOf(dev.Kind)
	if !ok {
		h.Reject(ReasonUnknownMetric, len(recs), "device", dev.ID, "err", "device has no schema")
		res.Rejected += len(recs)
		return nil, res, nil
	}
	p := h.pool.Get().(*Pending)
	rs := p.rs[:0]
	minT, maxT := now.Add(-h.opts.MaxPast).UnixNano(), now.Add(h.opts.MaxFuture).UnixNano()
	for i := range recs {
		rec := &recs[i]
		reason, err := h.validate(schema, rec, minT, maxT)
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
	p.rs, p.res = rs, res
	if len(rs) == 0 {
		p.release()
		return nil, res, nil
	}
	if ok, wait := h.limit.allow(dev.ID, len(rs), now); !ok {
		h.Reject(ReasonRateLimited, len(rs), "device", dev.ID)
		res.Rejected += len(rs)
		p.release()
		return nil, res, &RateLimitError{RetryAfter: wait}
	}
	w, err := h.sub.Begin(ctx, rs)
	if err != nil || w == nil {
		h.rejectUnqueued(err, rs)
		p.release()
		return nil, res, err
	}
	p.w = w
	return p, res, nil
}

// Wait returns once the message's readings are durable (acknowledge the
// device) or could not be journaled (do not: pipeline.ErrBackpressure, the
// context's error, pipeline.ErrClosed). p must not be used after Wait; a
// Pending never waited on is not reused (no harm beyond that).
func (p *Pending) Wait(ctx context.Context) (Result, error) {
	h, res := p.h, p.res
	err := p.w.Wait(ctx)
	if ctx.Err() != nil && err == ctx.Err() {
		return res, err // the pipeline may still read p.rs: p is not reused
	}
	if err != nil {
		h.rejectUnqueued(err, p.rs)
	} else {
		res.Accepted = len(p.rs)
		h.m.accepted.Add(float64(len(p.rs)))
	}
	p.release()
	return res, err
}

// rejectUnqueued counts readings refused by the pipeline under backpressure.
func (h *Handler) rejectUnqueued(err error, rs []pipeline.Reading) {
	if errors.Is(err, pipeline.ErrBackpressure) {
		h.Reject(ReasonBackpressure, len(rs), "device", rs[0].Device, "err", err)
	}
}

// Ready reports whether Wait would return at once (a Waiter that cannot
// tell reports false).
func (p *Pending) Ready() bool {
	r, ok := p.w.(interface{ Ready() bool })
	return ok && r.Ready()
}

func (p *Pending) release() {
	p.rs, p.w, p.res = p.rs[:0], nil, Result{}
	p.h.pool.Put(p)
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
