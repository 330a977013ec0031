package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	promstorage "github.com/prometheus/prometheus/storage"

	"github.com/citypulse/citypulse/internal/httpapi"
)

// APIOptions configures the query API.
type APIOptions struct {
	Logger *slog.Logger
	// Timeout and MaxSamples bound one query (defaults: 2m, 50M).
	Timeout    time.Duration
	MaxSamples int
	// LookbackDelta is how far back an instant query looks for a sample (default 5m).
	LookbackDelta time.Duration
	// MaxConcurrency is how many queries are evaluated at once (default 4);
	// the others wait in line, within their timeout.
	MaxConcurrency int
	// Registerer receives the API's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// API serves the subset of the Prometheus HTTP API that Grafana's Prometheus
// data source uses, over a storage.Queryable, in the same JSON shapes:
//
//	/api/v1/query, /api/v1/query_range, /api/v1/series, /api/v1/labels,
//	/api/v1/label/{name}/values, /api/v1/status/buildinfo, /api/v1/metadata
type API struct {
	q      promstorage.Queryable
	engine *promql.Engine
	parser parser.Parser
	log    *slog.Logger
	opts   APIOptions
	slots  chan struct{} // one per query being evaluated
	evals  sync.WaitGroup
	m      apiMetrics
}

// Queryable is what the API reads; *TSDB provides it through DB().
type Queryable = promstorage.Queryable

// NewAPI returns the query API over the embedded store.
func NewAPI(t *TSDB, opts APIOptions) *API {
	if opts.Timeout <= 0 {
		opts.Timeout = t.cfg.QueryTimeout
	}
	if opts.MaxSamples <= 0 {
		opts.MaxSamples = t.cfg.QueryMaxSamples
	}
	return NewQueryAPI(t.db, opts)
}

// NewQueryAPI returns the query API over any Queryable.
func NewQueryAPI(q Queryable, opts APIOptions) *API {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Minute
	}
	if opts.MaxSamples <= 0 {
		opts.MaxSamples = 50_000_000
	}
	if opts.LookbackDelta <= 0 {
		opts.LookbackDelta = 5 * time.Minute
	}
	if opts.MaxConcurrency <= 0 {
		opts.MaxConcurrency = 4
	}
	p := parser.NewParser(parser.Options{})
	eng := promql.NewEngine(promql.EngineOpts{
		Logger:               opts.Logger,
		MaxSamples:           opts.MaxSamples,
		Timeout:              opts.Timeout,
		LookbackDelta:        opts.LookbackDelta,
		EnableAtModifier:     true,
		EnableNegativeOffset: true,
		Parser:               p,
	})
	return &API{q: q, engine: eng, parser: p, log: opts.Logger, opts: opts,
		slots: make(chan struct{}, opts.MaxConcurrency), m: newAPIMetrics(opts.Registerer)}
}

// Register mounts the endpoints on mux.
func (a *API) Register(mux *http.ServeMux) {
	for _, m := range []string{"GET", "POST"} {
		mux.HandleFunc(m+" /api/v1/query", a.query)
		mux.HandleFunc(m+" /api/v1/query_range", a.queryRange)
		mux.HandleFunc(m+" /api/v1/series", a.series)
		mux.HandleFunc(m+" /api/v1/labels", a.labelNames)
	}
	mux.HandleFunc("GET /api/v1/label/{name}/values", a.labelValues)
	mux.HandleFunc("GET /api/v1/status/buildinfo", a.buildInfo)
	mux.HandleFunc("GET /api/v1/metadata", func(w http.ResponseWriter, _ *http.Request) {
		writeSuccess(w, map[string]any{})
	})
}

type apiError struct {
	typ  string
	code int
	err  error
}

func badData(err error) *apiError { return &apiError{"bad_data", http.StatusBadRequest, err} }

func writeSuccess(w http.ResponseWriter, data any) { httpapi.WriteData(w, http.StatusOK, data) }

func writeErr(w http.ResponseWriter, e *apiError) {
	httpapi.WriteError(w, e.code, e.typ, e.err.Error())
}

func (a *API) query(w http.ResponseWriter, r *http.Request) {
	ts := time.Now()
	if s := r.FormValue("time"); s != "" {
		t, err := parseTime(s)
		if err != nil {
			writeErr(w, badData(fmt.Errorf("invalid parameter \"time\": %w", err)))
			return
		}
		ts = t
	}
	if aerr := a.checkCost(r.FormValue("query"), 1, 0); aerr != nil {
		writeErr(w, aerr)
		return
	}
	ctx, cancel, aerr := a.queryContext(r)
	if aerr != nil {
		writeErr(w, aerr)
		return
	}
	defer cancel()
	q, err := a.engine.NewInstantQuery(ctx, a.q, nil, r.FormValue("query"), ts)
	if err != nil {
		writeErr(w, badData(fmt.Errorf("invalid parameter \"query\": %w", err)))
		return
	}
	a.exec(ctx, w, q)
}

func (a *API) queryRange(w http.ResponseWriter, r *http.Request) {
	start, err := parseTime(r.FormValue("start"))
	if err != nil {
		writeErr(w, badData(fmt.Errorf("invalid parameter \"start\": %w", err)))
		return
	}
	end, err := parseTime(r.FormValue("end"))
	if err != nil {
		writeErr(w, badData(fmt.Errorf("invalid parameter \"end\": %w", err)))
		return
	}
	if end.Before(start) {
		writeErr(w, badData(errors.New("invalid parameter \"end\": end timestamp must not be before start time")))
		return
	}
	step, err := parseDuration(r.FormValue("step"))
	if err != nil || step <= 0 {
		writeErr(w, badData(fmt.Errorf("invalid parameter \"step\": zero or negative query resolution step widths are not accepted. Try a positive integer")))
		return
	}
	if end.Sub(start)/step > 11000 {
		writeErr(w, badData(errors.New("exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)")))
		return
	}
	if aerr := a.checkCost(r.FormValue("query"), int64(end.Sub(start)/step)+1, end.Sub(start)); aerr != nil {
		writeErr(w, aerr)
		return
	}
	ctx, cancel, aerr := a.queryContext(r)
	if aerr != nil {
		writeErr(w, aerr)
		return
	}
	defer cancel()
	q, err := a.engine.NewRangeQuery(ctx, a.q, nil, r.FormValue("query"), start, end, step)
	if err != nil {
		writeErr(w, badData(fmt.Errorf("invalid parameter \"query\": %w", err)))
		return
	}
	a.exec(ctx, w, q)
}

func (a *API) queryContext(r *http.Request) (context.Context, context.CancelFunc, *apiError) {
	timeout := a.opts.Timeout
	if s := r.FormValue("timeout"); s != "" {
		d, err := parseDuration(s)
		if err != nil {
			return nil, nil, badData(fmt.Errorf("invalid parameter \"timeout\": %w", err))
		}
		timeout = min(timeout, d)
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	return ctx, cancel, nil
}

type jsonSample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

type jsonSeries struct {
	Metric map[string]string `json:"metric"`
	Values [][2]any          `json:"values"`
}

func point(t int64, v float64) [2]any { return [2]any{float64(t) / 1000, formatFloat(v)} }

func encodeValue(v parser.Value) any {
	switch v := v.(type) {
	case promql.Vector:
		out := make([]jsonSample, 0, len(v))
		for _, s := range v {
			out = append(out, jsonSample{Metric: s.Metric.Map(), Value: point(s.T, s.F)})
		}
		return out
	case promql.Matrix:
		out := make([]jsonSeries, 0, len(v))
		for _, s := range v {
			js := jsonSeries{Metric: s.Metric.Map(), Values: make([][2]any, 0, len(s.Floats))}
			for _, p := range s.Floats {
				js.Values = append(js.Values, point(p.T, p.F))
			}
			out = append(out, js)
		}
		return out
	case promql.Scalar:
		return point(v.T, v.V)
	case promql.String:
		return [2]any{float64(v.T) / 1000, v.V}
	}
	return nil
}

func formatFloat(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

var (
	minTime = time.Unix(math.MinInt64/1000+62135596801, 0).UTC()
	maxTime = time.Unix(math.MaxInt64/1000-62135596801, 999999999).UTC()
)

func parseTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, errors.New("missing")
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		// A float64 epoch time carries microseconds, not nanoseconds: round
		// there, so that 1796194324.271 is .271000 and not .270999990.
		sec, frac := math.Modf(f)
		return time.Unix(int64(sec), int64(math.Round(frac*1e6))*1e3).UTC(), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("cannot parse %q to a valid timestamp", s)
}

func parseDuration(s string) (time.Duration, error) {
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		if f > float64(math.MaxInt64)/1e9 {
			return 0, fmt.Errorf("cannot parse %q to a valid duration: too large", s)
		}
		return time.Duration(f * float64(time.Second)), nil
	}
	d, err := model.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("cannot parse %q to a valid duration", s)
	}
	return time.Duration(d), nil
}

// timeRange reads start/end (defaults: all time).
func timeRange(r *http.Request) (int64, int64, *apiError) {
	start, end := minTime, maxTime
	var err error
	if s := r.FormValue("start"); s != "" {
		if start, err = parseTime(s); err != nil {
			return 0, 0, badData(fmt.Errorf("invalid parameter \"start\": %w", err))
		}
	}
	if s := r.FormValue("end"); s != "" {
		if end, err = parseTime(s); err != nil {
			return 0, 0, badData(fmt.Errorf("invalid parameter \"end\": %w", err))
		}
	}
	return start.UnixMilli(), end.UnixMilli(), nil
}

func (a *API) matchers(r *http.Request) ([][]*labels.Matcher, *apiError) {
	if err := r.ParseForm(); err != nil {
		return nil, badData(err)
	}
	var out [][]*labels.Matcher
	for _, s := range r.Form["match[]"] {
		m, err := a.parser.ParseMetricSelector(s)
		if err != nil {
			return nil, badData(fmt.Errorf("invalid parameter \"match[]\": %w", err))
		}
		out = append(out, m)
	}
	return out, nil
}

func (a *API) series(w http.ResponseWriter, r *http.Request) {
	q, ok := a.querier(w, r, true)
	if !ok {
		return
	}
	defer q.Close()
	seen := map[uint64]bool{}
	out := []map[string]string{}
	for _, ms := range q.sets {
		ss := q.Select(r.Context(), false, &promstorage.SelectHints{Start: q.mint, End: q.maxt, Func: "series"}, ms...)
		for ss.Next() {
			l := ss.At().Labels()
			if h := l.Hash(); !seen[h] {
				seen[h] = true
				out = append(out, l.Map())
			}
		}
		if err := ss.Err(); err != nil {
			writeErr(w, &apiError{"execution", http.StatusUnprocessableEntity, err})
			return
		}
	}
	writeSuccess(w, out)
}

// querier parses match[], start and end and opens a querier over that range;
// on bad input it has answered and returns false.
func (a *API) querier(w http.ResponseWriter, r *http.Request, needMatch bool) (*selection, bool) {
	sets, aerr := a.matchers(r)
	if aerr == nil && needMatch && len(sets) == 0 {
		aerr = badData(errors.New("no match[] parameter provided"))
	}
	if aerr == nil {
		var mint, maxt int64
		if mint, maxt, aerr = timeRange(r); aerr == nil {
			q, err := a.q.Querier(mint, maxt)
			if err == nil {
				return &selection{Querier: q, sets: sets, mint: mint, maxt: maxt}, true
			}
			aerr = &apiError{"internal", http.StatusInternalServerError, err}
		}
	}
	writeErr(w, aerr)
	return nil, false
}

// selection is a querier over a time range with the request's matcher sets.
type selection struct {
	promstorage.Querier
	sets       [][]*labels.Matcher
	mint, maxt int64
}

func (a *API) labelNames(w http.ResponseWriter, r *http.Request) {
	a.labels(w, r, "")
}

func (a *API) labelValues(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if !model.UTF8Validation.IsValidLabelName(name) {
		writeErr(w, badData(fmt.Errorf("invalid label name: %q", name)))
		return
	}
	a.labels(w, r, name)
}

// labels answers label names (name == "") or the values of one label.
func (a *API) labels(w http.ResponseWriter, r *http.Request, name string) {
	q, ok := a.querier(w, r, false)
	if !ok {
		return
	}
	defer q.Close()
	sets := q.sets
	if len(sets) == 0 {
		sets = [][]*labels.Matcher{nil}
	}
	set := map[string]bool{}
	for _, ms := range sets {
		var vals []string
		var err error
		if name == "" {
			vals, _, err = q.LabelNames(r.Context(), nil, ms...)
		} else {
			vals, _, err = q.LabelValues(r.Context(), name, nil, ms...)
		}
		if err != nil {
			writeErr(w, &apiError{"execution", http.StatusUnprocessableEntity, err})
			return
		}
		for _, v := range vals {
			set[v] = true
		}
	}
	out := make([]string, 0, len(set))
	for v := range set {
		out = append(out, v)
	}
	slices.Sort(out)
	writeSuccess(w, out)
}

// buildInfo makes Grafana treat the API as a Prometheus server.
func (a *API) buildInfo(w http.ResponseWriter, _ *http.Request) {
	writeSuccess(w, map[string]string{
		"version": "2.53.0", "revision": "citypulse", "branch": "citypulse",
		"buildUser": "citypulse", "buildDate": "", "goVersion": "",
	})
}
