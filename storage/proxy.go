package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// QueryProxy answers the Prometheus query API from another store that speaks
// it (VictoriaMetrics, Prometheus, Mimir...): in cluster mode every node
// writes to one shared store, and each node's embedded TSDB holds only its
// own partitions, so the query API and the dashboard answer from the shared
// store instead. It forwards only the query endpoints, with the store's
// token (never the caller's), one query per slot of MaxConcurrency, each
// bounded by Timeout and its answer by MaxAnswerBytes.
type QueryProxy struct {
	base     *url.URL
	token    string
	client   *http.Client
	timeout  time.Duration
	maxBytes int64
	log      *slog.Logger
	slots    chan struct{}
	running  sync.WaitGroup
	results  *prometheus.CounterVec
}

// QueryProxyOptions are NewQueryProxy's arguments.
type QueryProxyOptions struct {
	// URL is the store's query API base: URL + /api/v1/query is a query.
	URL string
	// BearerToken, if set, is sent to the store.
	BearerToken    string
	Timeout        time.Duration
	MaxConcurrency int
	MaxAnswerBytes int64
	Logger         *slog.Logger
	Registerer     prometheus.Registerer
}

// NewQueryProxy builds the proxy; it connects nothing yet.
func NewQueryProxy(o QueryProxyOptions) (*QueryProxy, error) {
	u, err := url.Parse(o.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("query proxy: %q is not an http(s) URL", o.URL)
	}
	if o.Timeout <= 0 || o.MaxConcurrency <= 0 || o.MaxAnswerBytes <= 0 {
		return nil, errors.New("query proxy: timeout, max concurrency and max answer bytes must be positive")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	p := &QueryProxy{base: u, token: o.BearerToken, client: &http.Client{}, timeout: o.Timeout, maxBytes: o.MaxAnswerBytes,
		log: o.Logger, slots: make(chan struct{}, o.MaxConcurrency),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_query_proxy_requests_total",
			Help: "Queries forwarded to the shared store, by result (ok, store_error: the store answered 4xx/5xx, unreachable, busy, too_large)."},
			[]string{"result"})}
	if o.Registerer != nil {
		o.Registerer.MustRegister(p.results)
	}
	return p, nil
}

// Register mounts the query endpoints on mux, as API.Register does.
func (p *QueryProxy) Register(mux *http.ServeMux) {
	for _, m := range []string{"GET", "POST"} {
		for _, path := range []string{"/api/v1/query", "/api/v1/query_range", "/api/v1/series", "/api/v1/labels"} {
			mux.HandleFunc(m+" "+path, p.forward)
		}
	}
	mux.HandleFunc("GET /api/v1/label/{name}/values", p.forward)
	mux.HandleFunc("GET /api/v1/status/buildinfo", p.forward)
	mux.HandleFunc("GET /api/v1/metadata", p.forward)
}

// Wait waits until every forwarded query has ended, or ctx is done.
func (p *QueryProxy) Wait(ctx context.Context) error {
	stopped := make(chan struct{})
	go func() { p.running.Wait(); close(stopped) }()
	select {
	case <-stopped:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("query proxy: queries still running: %w", ctx.Err())
	}
}

func (p *QueryProxy) forward(w http.ResponseWriter, r *http.Request) {
	select {
	case p.slots <- struct{}{}:
	default:
		p.results.WithLabelValues("busy").Inc()
		w.Header().Set("Retry-After", "1")
		proxyError(w, http.StatusServiceUnavailable, "unavailable", "too many queries running; retry later")
		return
	}
	p.running.Add(1)
	defer func() { <-p.slots; p.running.Done() }()
	ctx, cancel := context.WithTimeout(r.Context(), p.timeout)
	defer cancel()
	resp, err := p.client.Do(p.request(ctx, r))
	if err != nil {
		p.results.WithLabelValues("unreachable").Inc()
		p.log.Warn("query proxy: the shared store did not answer", "err", err)
		proxyError(w, http.StatusBadGateway, "unavailable", "the shared store did not answer: "+err.Error())
		return
	}
	defer resp.Body.Close()
	if resp.ContentLength > p.maxBytes {
		p.results.WithLabelValues("too_large").Inc()
		proxyError(w, http.StatusUnprocessableEntity, "execution", "the answer is larger than the query API allows; narrow the query")
		return
	}
	for _, h := range []string{"Content-Type", "Content-Encoding"} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	n, _ := io.Copy(w, io.LimitReader(resp.Body, p.maxBytes+1))
	switch {
	case n > p.maxBytes:
		p.results.WithLabelValues("too_large").Inc()
		panic(http.ErrAbortHandler) // the answer was cut: the client must see a broken response, not a short one
	case resp.StatusCode/100 != 2:
		p.results.WithLabelValues("store_error").Inc()
	default:
		p.results.WithLabelValues("ok").Inc()
	}
}

// request is r for the store: the same method, path, query and form body,
// the store's token instead of the caller's, and no other header.
func (p *QueryProxy) request(ctx context.Context, r *http.Request) *http.Request {
	u := *p.base
	u.Path = strings.TrimSuffix(u.Path, "/") + r.URL.Path
	u.RawQuery = r.URL.RawQuery
	out, _ := http.NewRequestWithContext(ctx, r.Method, u.String(), r.Body) // method and URL were valid on the way in
	if ct := r.Header.Get("Content-Type"); ct != "" {
		out.Header.Set("Content-Type", ct)
	}
	if ae := r.Header.Get("Accept-Encoding"); ae != "" {
		out.Header.Set("Accept-Encoding", ae) // the answer passes through as encoded
	}
	out.Header.Set("User-Agent", "citypulse")
	if p.token != "" {
		out.Header.Set("Authorization", "Bearer "+p.token)
	}
	return out
}

func proxyError(w http.ResponseWriter, code int, typ, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	fmt.Fprintf(w, `{"status":"error","errorType":%q,"error":%q}`+"\n", typ, msg)
}
