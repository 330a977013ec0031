package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/history"
	"github.com/citypulse/citypulse/ingest"
	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/opendata"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/silence"
	"github.com/citypulse/citypulse/storage"
	"github.com/citypulse/citypulse/stream"
)

// server is the whole CityPulse server as a value: newServer opens and builds
// every part (binding the gateways' and the HTTP sockets, so a port in use
// fails at once) and starts nothing; Handler is the HTTP API; Run runs the
// parts and stops them in order; Close releases what newServer opened.
type server struct {
	cfg      Config
	log      *slog.Logger
	reg      *prometheus.Registry
	devices  *devices.Registry
	db       *storage.TSDB
	archive  *storage.Archive // nil when storage.archive.enabled is false
	sinks    []pipeline.SinkSpec
	pipe     *pipeline.Pipeline
	vitals   *rules.Vitals // nil when vitals.enabled is false
	engine   *rules.Engine // nil when rules.enabled is false
	outbox   *notifier.Outbox
	history  *history.Store                // each alert's transitions and notifications (with the rules)
	gateways []runner                      // the gateways and the vital-sign ticker: stopped first
	events   *stream.Hub                   // the operations screen's live stream
	silences *silence.Store                // the operators' silences and acknowledgements
	gate     *silence.Gate[notifier.Event] // holds back silenced notifications; nil without rules
	feed     *opendata.Feed                // nil when opendata.enabled is false
	signals  *signals.Analyzer             // nil when signals.enabled is false
	cluster  *clusterNode                  // nil in one-machine mode (cluster.enabled false)
	cstate   *clusterState                 // nil in one-machine mode
	ln       net.Listener
	mqttAddr net.Addr // the embedded broker's; nil when it is off
	query    queryAPI // the embedded TSDB's, or in cluster mode the shared store's
	handler  http.Handler
	ready    atomic.Bool

	closeOnce sync.Once
	closeErr  error
	cleanup   []func() error // run in reverse order by Close
}

// runner is a component with a lifetime: it works until ctx is done.
type runner interface {
	Run(ctx context.Context) error
}

// runFunc makes a function a runner.
type runFunc func(ctx context.Context) error

// Run calls f.
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

// newServer builds the server from cfg, logging to logOut. On error everything
// it opened is closed again.
func newServer(cfg Config, logOut io.Writer) (_ *server, err error) {
	s := &server{cfg: cfg, log: newLogger(cfg.Log, logOut), reg: prometheus.NewRegistry()}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	defer func() {
		if err != nil {
			err = errors.Join(err, s.Close())
		}
	}()
	list, err := devices.LoadFile(cfg.Devices.File)
	if err != nil {
		return nil, err
	}
	overlay := filepath.Join(cfg.DataDir, "devices-overlay.json")
	if cfg.Cluster.Enabled {
		overlay = "" // the runtime changes live in the cluster's device bucket
	}
	if s.devices, err = devices.NewRegistry(list, overlay); err != nil {
		return nil, err
	}
	for _, step := range []func() error{s.openStores, s.buildLive, s.buildRules, s.buildPipeline, s.buildCluster, s.buildGateways, s.buildClusterState, s.listenHTTP} {
		if err := step(); err != nil {
			return nil, err
		}
	}
	s.handler = s.routes()
	return s, nil
}

// onClose adds f to what Close runs (last added, first run).
func (s *server) onClose(f func() error) { s.cleanup = append(s.cleanup, f) }

// Close releases everything newServer opened, in the reverse order: the HTTP
// socket, the gateways, the pipeline's journal, the stores. It is idempotent;
// Run calls it when it returns.
func (s *server) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		for _, f := range slices.Backward(s.cleanup) {
			errs = append(errs, f())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// openStores opens the embedded TSDB and, when enabled, the InfluxDB sink and
// the Parquet archive.
func (s *server) openStores() error {
	cfg, log := s.cfg, s.log
	db, err := storage.OpenTSDB(filepath.Join(cfg.DataDir, "tsdb"), cfg.Storage.TSDB, log.With("component", "tsdb"), s.reg)
	if err != nil {
		return err
	}
	s.db = db
	s.onClose(wrapErr("close store", db.Close))
	s.sinks = []pipeline.SinkSpec{{Sink: db, Batch: cfg.Storage.TSDB.BatchPolicy()}}
	if cfg.Storage.Influx.Enabled {
		ix, err := storage.OpenInflux(cfg.Storage.Influx, filepath.Join(cfg.DataDir, "deadletter", "influx.lp"),
			log.With("component", "influx"), s.reg)
		if err != nil {
			return err
		}
		s.onClose(func() error { ix.Close(); return nil })
		s.sinks = append(s.sinks, pipeline.SinkSpec{Sink: ix, Batch: &cfg.Storage.Influx.Batch})
		log.Info("writing to an InfluxDB-compatible store", "url", cfg.Storage.Influx.URL, "bucket", cfg.Storage.Influx.Bucket)
	}
	if cfg.Storage.RemoteWrite.Enabled {
		rw, err := storage.OpenRemoteWrite(cfg.Storage.RemoteWrite, log.With("component", "remote-write"), s.reg)
		if err != nil {
			return err
		}
		s.sinks = append(s.sinks, pipeline.SinkSpec{Sink: rw, Batch: &cfg.Storage.RemoteWrite.Batch})
		log.Info("writing to a Prometheus remote-write receiver", "url", cfg.Storage.RemoteWrite.URL)
	}
	if cfg.Storage.Archive.Enabled {
		a, err := storage.OpenArchive(filepath.Join(cfg.DataDir, "archive"), cfg.Storage.Archive, log.With("component", "archive"), s.reg)
		if err != nil {
			return err
		}
		s.archive = a
		s.onClose(wrapErr("close archive", a.Close))
		s.sinks = append(s.sinks, pipeline.SinkSpec{Sink: a, Batch: &cfg.Storage.Archive.Batch})
	}
	return nil
}

// buildRules builds the vital-sign roll-ups and the alert rules with their
// outbox, when enabled.
func (s *server) buildRules() error {
	cfg, log := s.cfg, s.log
	if cfg.Vitals.Enabled {
		defs, err := rules.LoadRollups(cfg.Vitals.File)
		if err != nil {
			return err
		}
		s.vitals = rules.NewVitals(cfg.Vitals, defs, s.devices, cfg.Pipeline.Shards, log.With("component", "vitals"), s.reg)
	}
	if !cfg.Rules.Enabled {
		return nil
	}
	rs, err := rules.LoadRules(cfg.Rules.File)
	if err != nil {
		return err
	}
	// alerts are exactly as durable as the readings that raise them
	dur := notifier.Durability{Fsync: cfg.Pipeline.Fsync, Interval: cfg.Pipeline.FsyncInterval}
	if s.history, err = history.Open(history.Options{Path: filepath.Join(cfg.DataDir, "alert-history.json"),
		Logger: log.With("component", "history")}); err != nil {
		return err
	}
	s.outbox, err = notifier.NewOutbox(cfg.Rules.Notify, filepath.Join(cfg.DataDir, "outbox"), notifier.OutboxOptions{
		Durability: dur, Observer: s.history, Logger: log.With("component", "notify"), Registerer: s.reg})
	if err != nil {
		return err
	}
	statePath := filepath.Join(cfg.DataDir, "rules-state.json")
	journal := s.clusterJournal()
	if journal != nil {
		statePath = "" // cluster mode: the alert state moves with its partition, in JetStream
	}
	s.engine = rules.NewEngine(cfg.Rules, rs, rules.EngineOptions{Shards: cfg.Pipeline.Shards, Devices: s.devices, Notifier: s.notifierFor(s.outbox),
		StatePath: statePath, FsyncEach: dur.FsyncEach(), Journal: journal,
		Logger: log.With("component", "rules"), Registerer: s.reg})
	s.engine.Restore() // the saved alert states, before the first reading is evaluated
	return nil
}

// buildPipeline opens the journal with the stores as sinks and the roll-ups
// and rules as observers.
func (s *server) buildPipeline() error {
	var observers pipeline.Observers
	if s.vitals != nil {
		observers = append(observers, s.vitals)
	}
	if s.engine != nil {
		observers = append(observers, s.engine)
	}
	if s.feed != nil {
		observers = append(observers, s.feed)
	}
	if s.signals != nil {
		observers = append(observers, s.signals)
	}
	pipe, err := pipeline.New(pipeline.Options{
		Config:     s.cfg.Pipeline,
		Dir:        s.cfg.DataDir,
		Sinks:      s.sinks,
		Observer:   observers,
		Logger:     s.log.With("component", "pipeline"),
		Registerer: s.reg,
	})
	if err != nil {
		return err
	}
	s.pipe = pipe
	s.onClose(wrapErr("close pipeline", pipe.Close))
	return nil
}

// buildGateways builds the MQTT broker, the external-broker client and the
// CoAP gateway; they bind their sockets here. The vital-sign ticker runs with
// them: it stops before the pipeline drains.
func (s *server) buildGateways() error {
	cfg, log := s.cfg, s.log
	// One machine: the gateways journal locally. Cluster mode: they publish
	// to JetStream and acknowledge a device after its acknowledgement.
	sub := ingest.Local(s.pipe)
	if s.cluster != nil {
		sub = publisherSubmitter{s.cluster.pub}
	}
	h := ingest.NewHandler(sub, ingest.HandlerOptions{
		MaxPast: cfg.Ingest.MaxPast, MaxFuture: cfg.Ingest.MaxFuture,
		RateLimit: cfg.Ingest.RateLimit.ReadingsPerSecond, RateBurst: cfg.Ingest.RateLimit.Burst,
		Logger: log.With("component", "ingest"), Registerer: s.reg,
	})
	if s.vitals != nil && s.cluster == nil { // cluster mode: the lease holder's (buildClusterState)
		live := liveSubmitter{pipe: s.pipe, events: s.events}
		s.gateways = append(s.gateways, runFunc(func(ctx context.Context) error { return s.vitals.Run(ctx, live) }))
	}
	s.gateways = append(s.gateways, s.liveRunners()...)
	if cfg.Ingest.MQTT.Enabled {
		b, err := ingest.NewBroker(cfg.Ingest.MQTT, s.devices, h, log.With("component", "mqtt"), s.reg)
		if err != nil {
			return fmt.Errorf("embedded MQTT broker: %w", err)
		}
		s.onClose(b.Close)
		s.gateways = append(s.gateways, b)
		if a := b.Addr(); a != nil {
			s.mqttAddr = a
			log.Info("embedded MQTT broker listening", "addr", a.String())
		}
		if a := b.TLSAddr(); a != nil {
			log.Info("embedded MQTT broker listening over TLS", "addr", a.String())
		}
	}
	if cfg.Ingest.External.Enabled {
		x, err := ingest.NewExternal(cfg.Ingest.External, s.devices, h, log.With("component", "external-mqtt"), s.reg)
		if err != nil {
			return fmt.Errorf("external MQTT broker: %w", err)
		}
		s.gateways = append(s.gateways, x)
		log.Info("subscribing to external MQTT broker", "url", cfg.Ingest.External.URL, "topic", cfg.Ingest.External.Topic)
	}
	if cfg.Ingest.CoAP.Enabled {
		c, err := ingest.NewCoAP(cfg.Ingest.CoAP, s.devices, h, log.With("component", "coap"), s.reg)
		if err != nil {
			return fmt.Errorf("CoAP gateway: %w", err)
		}
		s.onClose(c.Close)
		s.gateways = append(s.gateways, c)
		attrs := []any{"udp", c.Addr().String()}
		if d := c.DTLSAddr(); d != nil {
			attrs = append(attrs, "dtls", d.String())
		}
		log.Info("CoAP gateway listening", attrs...)
	}
	return nil
}

// listenHTTP binds the HTTP API's socket, with the connection limits.
func (s *server) listenHTTP() error {
	ln, err := net.Listen("tcp", s.cfg.HTTP.Addr)
	if err != nil {
		return fmt.Errorf("http.addr %s: %w", s.cfg.HTTP.Addr, err)
	}
	s.ln = httpapi.LimitListener(ln, httpapi.ConnLimits{Total: s.cfg.HTTP.MaxConnections, PerHost: s.cfg.HTTP.MaxConnectionsPerHost}, s.reg)
	s.onClose(func() error {
		if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	})
	return nil
}

// HTTPAddr is the address the HTTP API listens on.
func (s *server) HTTPAddr() net.Addr { return s.ln.Addr() }

// Reload reads the rules file again; on error the previous rules stay in force.
func (s *server) Reload() error {
	if s.engine == nil {
		return errors.New("rules are off (rules.enabled: false)")
	}
	rs, err := rules.LoadRules(s.cfg.Rules.File)
	if err != nil {
		s.log.Error("rules reload failed; the previous rules stay in force", "err", err)
		return err
	}
	s.engine.Reload(rs)
	return nil
}

func wrapErr(what string, f func() error) func() error {
	return func() error {
		if err := f(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
}
