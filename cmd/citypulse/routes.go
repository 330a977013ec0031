package main

import (
	"context"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/citypulse/citypulse/clusterstate"
	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/history"
	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/opendata"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/silence"
	"github.com/citypulse/citypulse/storage"
	"github.com/citypulse/citypulse/stream"
	"github.com/citypulse/citypulse/web"
)

// sinkStatuser reports the state of the pipeline's sinks (GET /api/v1/sinks).
type sinkStatuser interface {
	Status() []pipeline.SinkStatus
}

// exporter serves the archive export (GET /api/v1/export).
type exporter interface {
	ExportHandler() http.Handler
}

// queryAPI is the Prometheus query API: storage.API over the embedded TSDB,
// or storage.QueryProxy to the shared store in cluster mode.
type queryAPI interface {
	Register(mux *http.ServeMux)
	Wait(ctx context.Context) error
}

// api is what the HTTP routes read and change.
type api struct {
	devices *devices.Registry
	query   queryAPI
	sinks   sinkStatuser
	export  exporter // nil when the archive is off
	rules   *rules.API
	history *history.Store    // nil when the rules are off
	events  *stream.Hub       // the operations screen's live stream
	acts    *silence.Store    // silences and acknowledgements
	feed    *opendata.Feed    // nil when the public feed is off
	signals *signals.Analyzer // nil when signals.enabled is false
	reload  func() error
	ready   func() string // "" when ready, else why not (503 body)
	cluster *clusterNode  // nil in one-machine mode
	// sharedDevices changes the devices on every node (cluster mode; nil on one machine)
	sharedDevices *clusterstate.Registry
	metrics       *prometheus.Registry
	log           *slog.Logger
}

// maxReloadBody bounds the body of POST /-/reload, which reads none.
const maxReloadBody = 4 << 10

// Handler is the HTTP API: the dashboard, /metrics, health, the device,
// query, rules and export APIs, with the token checks and body limits.
func (s *server) Handler() http.Handler { return s.handler }

func (s *server) routes() http.Handler {
	s.query = s.newQueryAPI()
	a := api{
		devices:       s.devices,
		query:         s.query,
		sinks:         s.pipe,
		reload:        s.Reload,
		ready:         s.notReady,
		cluster:       s.cluster,
		sharedDevices: s.sharedDevices(),
		metrics:       s.reg,
		log:           s.log,
		events:        s.events,
		acts:          s.silences,
		feed:          s.feed,
		signals:       s.signals,
	}
	if s.archive != nil {
		a.export = s.archive
	}
	if s.engine != nil {
		a.rules = rules.NewAPI(s.engine, s.outbox, s.cfg.Rules.File, s.decorateAlert)
		a.history = s.history
	}
	return routes(s.cfg.HTTP, a)
}

// routes mounts the HTTP API.
func routes(c HTTPConfig, a api) http.Handler {
	read := requireRead(c.ReadToken, c.OperatorToken, c.AdminToken)
	operate := requireOperator(c.OperatorToken, c.AdminToken)
	admin := requireAdmin(c.AdminToken)
	mux := http.NewServeMux()

	// The dashboard page is static and public; the data it shows comes from
	// the token-guarded API below.
	dash := web.Handler()
	mux.Handle("GET /{$}", dash)
	mux.Handle("GET /ui/", dash)
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics, promhttp.HandlerOpts{Registry: a.metrics}))
	// Go profiles for operators (admin token): where a loaded server spends its CPU.
	mux.Handle("GET /debug/pprof/", admin(http.HandlerFunc(pprof.Index)))
	mux.Handle("GET /debug/pprof/profile", admin(http.HandlerFunc(pprof.Profile)))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if reason := a.ready(); reason != "" {
			http.Error(w, reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})

	dapi := a.deviceAPI()
	mux.Handle("GET /api/v1/devices", read(http.HandlerFunc(dapi.List)))
	mux.Handle("GET /api/v1/devices/{id}", read(http.HandlerFunc(dapi.Get)))
	mux.Handle("POST /api/v1/devices", admin(http.HandlerFunc(dapi.Add)))
	mux.Handle("DELETE /api/v1/devices/{id}", admin(http.HandlerFunc(dapi.Remove)))
	if a.cluster != nil {
		mux.Handle("GET /api/v1/cluster", read(http.HandlerFunc(a.cluster.serveStatus)))
		mux.Handle("POST /api/v1/cluster/{action}", admin(http.HandlerFunc(a.cluster.serveDR)))
	}
	mux.Handle("GET /api/v1/sinks", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		httpapi.WriteData(w, http.StatusOK, a.sinks.Status())
	})))
	if a.export != nil {
		mux.Handle("GET /api/v1/export", read(a.export.ExportHandler()))
	} else {
		mux.Handle("GET /api/v1/export", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "the archive is off: set storage.archive.enabled", http.StatusNotFound)
		})))
	}
	if a.rules != nil {
		mux.Handle("GET /api/v1/rules", read(http.HandlerFunc(a.rules.Rules)))
		mux.Handle("GET /api/v1/alerts", read(http.HandlerFunc(a.rules.Alerts)))
		mux.Handle("GET /api/v1/outbox", read(http.HandlerFunc(a.rules.Outbox)))
		mux.Handle("GET /api/v1/alerts/{fingerprint}/history", read(http.HandlerFunc(a.history.Handler)))
	}
	if a.signals != nil {
		mux.Handle("GET /api/v1/corridors", read(http.HandlerFunc(a.signals.Handler)))
	}
	mux.Handle("GET /api/v1/events", read(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.events.Serve(w, r, nil, nil)
	})))
	a.acts.Register(mux, read, operate)
	if a.feed != nil {
		// The public guidance feed: no token, its own rate limit per client.
		mux.Handle("/ngsi-ld/", a.feed.Handler())
	}
	mux.Handle("POST /-/reload", admin(httpapi.LimitBody(maxReloadBody, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if err := a.reload(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintln(w, "reloaded")
	}))))
	qmux := http.NewServeMux()
	a.query.Register(qmux)
	mux.Handle("/api/v1/", read(qmux))
	return httpapi.LimitBody(c.MaxBodyBytes, mux)
}

// deviceAPI is the device API over this node's registry, or in cluster mode
// over the shared one, so that a change reaches every node.
func (a api) deviceAPI() *devices.API {
	log := a.log.With("component", "devices-api")
	if a.sharedDevices != nil {
		return devices.NewAPI(a.sharedDevices, log)
	}
	return devices.NewAPI(a.devices, log)
}

// newQueryAPI answers PromQL from the embedded TSDB on one machine; in
// cluster mode, where each node's TSDB holds only its own partitions, from
// the shared store every node writes to.
func (s *server) newQueryAPI() queryAPI {
	tsdb := s.cfg.Storage.TSDB
	if s.cluster != nil {
		p, err := storage.NewQueryProxy(storage.QueryProxyOptions{
			URL: s.cfg.Storage.RemoteWrite.QueryBase(), BearerToken: s.cfg.Storage.RemoteWrite.BearerToken,
			Timeout: tsdb.QueryTimeout, MaxConcurrency: tsdb.QueryMaxConcurrency, MaxAnswerBytes: maxProxiedAnswer,
			Logger: s.log.With("component", "query-proxy"), Registerer: s.reg,
		})
		if err == nil {
			return p
		}
		s.log.Error("cluster mode: the query API answers from this node's partitions only", "err", err) // Validate refuses this
	}
	return storage.NewQueryAPI(s.db.DB(), storage.APIOptions{
		Logger:         s.log.With("component", "query-api"),
		Timeout:        tsdb.QueryTimeout,
		MaxSamples:     tsdb.QueryMaxSamples,
		MaxConcurrency: tsdb.QueryMaxConcurrency,
		Registerer:     s.reg,
	})
}

// maxProxiedAnswer bounds one answer of the shared store passed on.
const maxProxiedAnswer = 64 << 20

// requireRead guards the read endpoints: open when no read token is set,
// otherwise the read, the operator or the admin token ("Authorization: Bearer <token>").
func requireRead(readToken, operatorToken, adminToken string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if readToken == "" {
			return next
		}
		want := []string{readToken}
		for _, t := range []string{operatorToken, adminToken} {
			if t != "" {
				want = append(want, t)
			}
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !hasToken(r, want) {
				w.Header().Set("WWW-Authenticate", `Bearer realm="citypulse"`)
				http.Error(w, "missing or wrong bearer token", http.StatusUnauthorized)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// requireAdmin guards changes; with no admin token configured they are disabled.
func requireAdmin(token string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if token == "" {
				http.Error(w, "changes are disabled: set http.admin_token (CITYPULSE_HTTP_ADMIN_TOKEN) to enable them", http.StatusForbidden)
				return
			}
			if !hasToken(r, []string{token}) {
				w.Header().Set("WWW-Authenticate", `Bearer realm="citypulse"`)
				http.Error(w, "missing or wrong admin bearer token", http.StatusUnauthorized)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// requireOperator guards acting on alerts (acknowledge, silence): the
// operator or the admin token; with neither configured it is disabled.
func requireOperator(operatorToken, adminToken string) func(http.Handler) http.Handler {
	var want []string
	for _, t := range []string{operatorToken, adminToken} {
		if t != "" {
			want = append(want, t)
		}
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if len(want) == 0 {
				http.Error(w, "acting on alerts is disabled: set http.operator_token (CITYPULSE_HTTP_OPERATOR_TOKEN) to enable it", http.StatusForbidden)
				return
			}
			if !hasToken(r, want) {
				w.Header().Set("WWW-Authenticate", `Bearer realm="citypulse"`)
				http.Error(w, "missing or wrong operator bearer token", http.StatusUnauthorized)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// hasToken says whether the request carries one of want as its bearer token.
// The scheme name is case-insensitive (RFC 7235 section 2.1).
func hasToken(r *http.Request, want []string) bool {
	scheme, got, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	got = strings.TrimLeft(got, " ")
	match := 0
	for _, t := range want {
		match |= subtle.ConstantTimeCompare([]byte(got), []byte(t))
	}
	return match == 1
}
