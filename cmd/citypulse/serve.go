package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/ingest"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
	"github.com/citypulse/citypulse/storage"
	"github.com/citypulse/citypulse/web"
)

// runner is a component with a lifetime: it works until ctx is done.
type runner interface {
	Run(ctx context.Context) error
}

// runFunc makes a function a runner.
type runFunc func(ctx context.Context) error

func (f runFunc) Run(ctx context.Context) error { return f(ctx) }

func newLogger(c LogConfig, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// serve builds every component from cfg, runs them until ctx is done, then
// shuts down in order: gateways stop accepting, the pipeline journals what was
// queued and drains to the sinks, the store is closed.
func serve(ctx context.Context, cfg Config, logOut io.Writer) error {
	log := newLogger(cfg.Log, logOut)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	list, err := devices.LoadFile(cfg.Devices.File)
	if err != nil {
		return err
	}
	registry, err := devices.NewRegistry(list, filepath.Join(cfg.DataDir, "devices-overlay.json"))
	if err != nil {
		return err
	}
	db, err := storage.OpenTSDB(filepath.Join(cfg.DataDir, "tsdb"), cfg.Storage.TSDB, log.With("component", "tsdb"), reg)
	if err != nil {
		return err
	}
	defer db.Close()
	sinks := []pipeline.SinkSpec{{Sink: db, Batch: cfg.Storage.TSDB.BatchPolicy()}}
	if cfg.Storage.Influx.Enabled {
		ix, err := storage.OpenInflux(cfg.Storage.Influx, filepath.Join(cfg.DataDir, "deadletter", "influx.lp"),
			log.With("component", "influx"), reg)
		if err != nil {
			return err
		}
		defer ix.Close()
		sinks = append(sinks, pipeline.SinkSpec{Sink: ix, Batch: &cfg.Storage.Influx.Batch})
		log.Info("writing to an InfluxDB-compatible store", "url", cfg.Storage.Influx.URL, "bucket", cfg.Storage.Influx.Bucket)
	}
	var archive *storage.Archive
	if cfg.Storage.Archive.Enabled {
		archive, err = storage.OpenArchive(filepath.Join(cfg.DataDir, "archive"), cfg.Storage.Archive, log.With("component", "archive"), reg)
		if err != nil {
			return err
		}
		defer archive.Close()
		sinks = append(sinks, pipeline.SinkSpec{Sink: archive, Batch: &cfg.Storage.Archive.Batch})
	}
	var observers pipeline.Observers
	var vitals *rules.Vitals
	if cfg.Vitals.Enabled {
		defs, err := rules.LoadRollups(cfg.Vitals.File)
		if err != nil {
			return err
		}
		vitals = rules.NewVitals(cfg.Vitals, defs, registry, cfg.Pipeline.Shards, log.With("component", "vitals"), reg)
		observers = append(observers, vitals)
	}
	var engine *rules.Engine
	var outbox *notifier.Outbox
	if cfg.Rules.Enabled {
		rs, err := rules.LoadRules(cfg.Rules.File)
		if err != nil {
			return err
		}
		// alerts are exactly as durable as the readings that raise them
		dur := notifier.Durability{Fsync: cfg.Pipeline.Fsync, Interval: cfg.Pipeline.FsyncInterval}
		outbox, err = notifier.NewOutbox(cfg.Rules.Notify, filepath.Join(cfg.DataDir, "outbox"), dur, log.With("component", "notify"), reg)
		if err != nil {
			return err
		}
		engine = rules.NewEngine(cfg.Rules, rs, rules.EngineOptions{Shards: cfg.Pipeline.Shards, Devices: registry, Notifier: outbox,
			StatePath: filepath.Join(cfg.DataDir, "rules-state.json"), FsyncEach: dur.FsyncEach(),
			Logger: log.With("component", "rules"), Registerer: reg})
		engine.Restore() // the saved alert states, before the first reading is evaluated
		observers = append(observers, engine)
	}
	pipe, err := pipeline.New(pipeline.Options{
		Config:     cfg.Pipeline,
		Dir:        cfg.DataDir,
		Sinks:      sinks,
		Observer:   observers,
		Logger:     log.With("component", "pipeline"),
		Registerer: reg,
	})
	if err != nil {
		return err
	}
	h := ingest.NewHandler(pipe, ingest.HandlerOptions{
		MaxPast: cfg.Ingest.MaxPast, MaxFuture: cfg.Ingest.MaxFuture,
		RateLimit: cfg.Ingest.RateLimit.ReadingsPerSecond, RateBurst: cfg.Ingest.RateLimit.Burst,
		Logger: log.With("component", "ingest"), Registerer: reg,
	})

	// Gateways bind their sockets here, so a port in use fails start-up at once.
	// The vital-sign ticker runs with them: it stops before the pipeline drains.
	var gateways []runner
	if vitals != nil {
		gateways = append(gateways, runFunc(func(ctx context.Context) error { return vitals.Run(ctx, pipe) }))
	}
	closeAll := func() {}
	if cfg.Ingest.MQTT.Enabled {
		b, err := ingest.NewBroker(cfg.Ingest.MQTT, registry, h, log.With("component", "mqtt"), reg)
		if err != nil {
			return fmt.Errorf("embedded MQTT broker: %w", err)
		}
		prev := closeAll
		closeAll = func() { b.Close(); prev() }
		gateways = append(gateways, b)
		if a := b.Addr(); a != nil {
			log.Info("embedded MQTT broker listening", "addr", a.String())
		}
		if a := b.TLSAddr(); a != nil {
			log.Info("embedded MQTT broker listening over TLS", "addr", a.String())
		}
	}
	if cfg.Ingest.External.Enabled {
		x, err := ingest.NewExternal(cfg.Ingest.External, registry, h, log.With("component", "external-mqtt"), reg)
		if err != nil {
			closeAll()
			return fmt.Errorf("external MQTT broker: %w", err)
		}
		gateways = append(gateways, x)
		log.Info("subscribing to external MQTT broker", "url", cfg.Ingest.External.URL, "topic", cfg.Ingest.External.Topic)
	}
	if cfg.Ingest.CoAP.Enabled {
		c, err := ingest.NewCoAP(cfg.Ingest.CoAP, registry, h, log.With("component", "coap"), reg)
		if err != nil {
			closeAll()
			return fmt.Errorf("CoAP gateway: %w", err)
		}
		prev := closeAll
		closeAll = func() { c.Close(); prev() }
		gateways = append(gateways, c)
		attrs := []any{"udp", c.Addr().String()}
		if d := c.DTLSAddr(); d != nil {
			attrs = append(attrs, "dtls", d.String())
		}
		log.Info("CoAP gateway listening", attrs...)
	}
	defer closeAll()

	reload := func() error {
		if engine == nil {
			return errors.New("rules are off (rules.enabled: false)")
		}
		rs, err := rules.LoadRules(cfg.Rules.File)
		if err != nil {
			log.Error("rules reload failed; the previous rules stay in force", "err", err)
			return err
		}
		engine.Reload(rs)
		return nil
	}
	var ready atomic.Bool
	mux := http.NewServeMux()
	routes(mux, cfg.HTTP, registry, db, archive, pipe, reg, &ready, log)
	if engine != nil {
		rapi := rules.NewAPI(engine, outbox, cfg.Rules.File)
		read := requireRead(cfg.HTTP.ReadToken, cfg.HTTP.AdminToken)
		mux.Handle("GET /api/v1/rules", read(http.HandlerFunc(rapi.Rules)))
		mux.Handle("GET /api/v1/alerts", read(http.HandlerFunc(rapi.Alerts)))
		mux.Handle("GET /api/v1/outbox", read(http.HandlerFunc(rapi.Outbox)))
	}
	mux.Handle("POST /-/reload", requireAdmin(cfg.HTTP.AdminToken)(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if err := reload(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintln(w, "reloaded")
	})))
	ln, err := net.Listen("tcp", cfg.HTTP.Addr)
	if err != nil {
		return fmt.Errorf("http.addr %s: %w", cfg.HTTP.Addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	log.Info("HTTP API listening", "addr", ln.Addr().String())

	pipeCtx, stopPipe := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPipe()
	gwCtx, stopGateways := context.WithCancel(ctx)
	defer stopGateways()

	var pg errgroup.Group
	pg.Go(func() error { return pipe.Run(pipeCtx) })
	// The rules engine and the outbox stop after the pipeline: transitions seen
	// while it drains are still saved and delivered. The engine stops first: it
	// hands its last transitions to the outbox, which then writes them to disk.
	lateCtx, stopLate := context.WithCancel(context.WithoutCancel(ctx))
	defer stopLate()
	engineCtx, stopEngine := context.WithCancel(lateCtx)
	defer stopEngine()
	var eg, lg errgroup.Group
	if engine != nil {
		eg.Go(func() error { return engine.Run(engineCtx) })
		lg.Go(func() error { return outbox.Run(lateCtx) })
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				if err := reload(); err == nil {
					log.Info("rules reloaded on SIGHUP")
				}
			case <-lateCtx.Done():
				return
			}
		}
	}()

	gg, gctx := errgroup.WithContext(gwCtx)
	for _, g := range gateways {
		gg.Go(func() error { return g.Run(gctx) })
	}
	httpErr := make(chan error, 1)
	go func() { httpErr <- srv.Serve(ln) }()
	ready.Store(true)
	log.Info("citypulse is ready", "devices", registry.Len(), "data_dir", cfg.DataDir)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down: no longer accepting readings")
	case <-gctx.Done():
		runErr = errors.New("a gateway stopped unexpectedly")
	case err := <-httpErr:
		runErr = fmt.Errorf("HTTP server: %w", err)
	}
	ready.Store(false)
	stopGateways()
	if err := gg.Wait(); err != nil {
		runErr = errors.Join(runErr, err)
	}
	log.Info("gateways stopped; draining the pipeline")
	stopPipe()
	if err := pg.Wait(); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("pipeline: %w", err))
	}
	stopEngine()
	if err := eg.Wait(); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("rules: %w", err))
	}
	stopLate()
	if err := lg.Wait(); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("rules: %w", err))
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutCtx)
	if err := db.Close(); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("close store: %w", err))
	}
	if archive != nil {
		if err := archive.Close(); err != nil {
			runErr = errors.Join(runErr, fmt.Errorf("close archive: %w", err))
		}
	}
	if runErr == nil {
		log.Info("citypulse stopped cleanly")
	}
	return runErr
}

// routes mounts the HTTP API.
func routes(mux *http.ServeMux, c HTTPConfig, registry *devices.Registry, db *storage.TSDB, archive *storage.Archive, pipe *pipeline.Pipeline,
	reg *prometheus.Registry, ready *atomic.Bool, log *slog.Logger) {
	read := requireRead(c.ReadToken, c.AdminToken)
	admin := requireAdmin(c.AdminToken)

	// The dashboard page is static and public; the data it shows comes from
	// the token-guarded API below.
	dash := web.Handler()
	mux.Handle("GET /{$}", dash)
	mux.Handle("GET /ui/", dash)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	// Go profiles for operators (admin token): where a loaded server spends its CPU.
	mux.Handle("GET /debug/pprof/", admin(http.HandlerFunc(pprof.Index)))
	mux.Handle("GET /debug/pprof/profile", admin(http.HandlerFunc(pprof.Profile)))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})

	dapi := devices.NewAPI(registry, log.With("component", "devices-api"))
	mux.Handle("GET /api/v1/devices", read(http.HandlerFunc(dapi.List)))
	mux.Handle("GET /api/v1/devices/{id}", read(http.HandlerFunc(dapi.Get)))
	mux.Handle("POST /api/v1/devices", admin(http.HandlerFunc(dapi.Add)))
	mux.Handle("DELETE /api/v1/devices/{id}", admin(http.HandlerFunc(dapi.Remove)))
	mux.Handle("GET /api/v1/sinks", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"status": "success", "data": pipe.Status()})
	})))

	if archive != nil {
		mux.Handle("GET /api/v1/export", read(archive.ExportHandler()))
	} else {
		mux.Handle("GET /api/v1/export", read(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "the archive is off: set storage.archive.enabled", http.StatusNotFound)
		})))
	}
	qmux := http.NewServeMux()
	storage.NewAPI(db, storage.APIOptions{Logger: log.With("component", "query-api")}).Register(qmux)
	mux.Handle("/api/v1/", read(qmux))
}

// requireRead guards the read endpoints: open when no read token is set,
// otherwise the read or the admin token ("Authorization: Bearer <token>").
func requireRead(readToken, adminToken string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if readToken == "" {
			return next
		}
		want := []string{readToken}
		if adminToken != "" {
			want = append(want, adminToken)
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

func hasToken(r *http.Request, want []string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	match := 0
	for _, t := range want {
		match |= subtle.ConstantTimeCompare([]byte(got), []byte(t))
	}
	return match == 1
}

// printConfig writes the effective config as YAML with secrets masked.
func printConfig(w io.Writer, c Config) error {
	mask := func(s *string) {
		if *s != "" {
			*s = "********"
		}
	}
	mask(&c.HTTP.AdminToken)
	mask(&c.HTTP.ReadToken)
	mask(&c.Ingest.External.Password)
	mask(&c.Storage.Influx.Token)
	b, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}
