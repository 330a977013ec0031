package storage

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/prometheus/promql"
)

// The evaluation of a query: a bounded number at once, each bounded in time
// by its context, counted when it fails.

type apiMetrics struct {
	running, queued prometheus.Gauge
	refused         *prometheus.CounterVec
}

func newAPIMetrics(reg prometheus.Registerer) apiMetrics {
	m := apiMetrics{
		running: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_query_running",
			Help: "PromQL queries being evaluated now (at most storage.tsdb.query_max_concurrency)."}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_query_queued",
			Help: "PromQL queries waiting for an evaluation slot."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_query_failed_total",
			Help: "PromQL queries that ended without an answer, by reason (timeout, canceled, too_many_samples)."}, []string{"reason"}),
	}
	for _, r := range []string{"timeout", "canceled", "too_many_samples"} {
		m.refused.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.running, m.queued, m.refused)
	}
	return m
}

// exec evaluates q when a slot is free (waiting in line within ctx) and writes
// the answer. ctx ends at the query's timeout or when the client goes away;
// the answer is then the error at once, even when the engine notices the end
// of ctx only later (it checks between series): the evaluation keeps its slot
// until it has stopped, so abandoned evaluations still count against
// MaxConcurrency. Wait waits for them.
func (a *API) exec(ctx context.Context, w http.ResponseWriter, q promql.Query) {
	if aerr := a.acquire(ctx); aerr != nil {
		q.Close()
		writeErr(w, aerr)
		return
	}
	done := make(chan *promql.Result, 1)
	a.evals.Add(1)
	go func() {
		defer a.evals.Done()
		defer a.release()
		done <- q.Exec(ctx)
	}()
	select {
	case res := <-done:
		defer q.Close()
		if res.Err != nil {
			writeErr(w, a.execError(ctx, res.Err))
			return
		}
		writeSuccess(w, map[string]any{"resultType": res.Value.Type(), "result": encodeValue(res.Value)})
	case <-ctx.Done():
		q.Cancel()
		writeErr(w, a.execError(ctx, context.Cause(ctx)))
		go func() { <-done; q.Close() }()
	}
}

// Wait waits until every evaluation has stopped, or ctx is done.
func (a *API) Wait(ctx context.Context) error {
	stopped := make(chan struct{})
	go func() { a.evals.Wait(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("query evaluations still running: %w", ctx.Err())
	}
}

// acquire waits for an evaluation slot until ctx ends.
func (a *API) acquire(ctx context.Context) *apiError {
	select {
	case a.slots <- struct{}{}:
	default:
		a.m.queued.Inc()
		defer a.m.queued.Dec()
		select {
		case a.slots <- struct{}{}:
		case <-ctx.Done():
			return a.execError(ctx, fmt.Errorf("query waited in line for an evaluation slot (storage.tsdb.query_max_concurrency: %d) until: %w",
				a.opts.MaxConcurrency, context.Cause(ctx)))
		}
	}
	a.m.running.Inc()
	return nil
}

func (a *API) release() {
	a.m.running.Dec()
	<-a.slots
}

// execError maps an evaluation error to the Prometheus API's error types and
// counts why the query failed.
func (a *API) execError(ctx context.Context, err error) *apiError {
	var eTimeout promql.ErrQueryTimeout
	var eCanceled promql.ErrQueryCanceled
	var eStorage promql.ErrStorage
	var eSamples promql.ErrTooManySamples
	switch {
	case errors.As(err, &eTimeout), errors.Is(err, context.DeadlineExceeded), errors.As(err, &eCanceled) && errors.Is(ctx.Err(), context.DeadlineExceeded):
		a.m.refused.WithLabelValues("timeout").Inc()
		return &apiError{"timeout", http.StatusServiceUnavailable,
			fmt.Errorf("query timed out (storage.tsdb.query_timeout is %v; a request's timeout parameter can only shorten it): %w", a.opts.Timeout, err)}
	case errors.As(err, &eCanceled), errors.Is(err, context.Canceled):
		a.m.refused.WithLabelValues("canceled").Inc()
		return &apiError{"canceled", http.StatusServiceUnavailable, err}
	case errors.As(err, &eSamples):
		a.m.refused.WithLabelValues("too_many_samples").Inc()
		return &apiError{"execution", http.StatusUnprocessableEntity, fmt.Errorf("%w (storage.tsdb.query_max_samples: %d)", err, a.opts.MaxSamples)}
	case errors.As(err, &eStorage):
		return &apiError{"internal", http.StatusInternalServerError, err}
	}
	return &apiError{"execution", http.StatusUnprocessableEntity, err}
}
