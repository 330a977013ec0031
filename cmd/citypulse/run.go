package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"
)

// stage is a group of runners started together and stopped together; when
// one fails, the others are stopped too and done is closed.
type stage struct {
	name   string
	cancel context.CancelFunc
	done   <-chan struct{}
	g      *errgroup.Group
}

// startStage runs rs under a context of their own derived from parent.
func startStage(parent context.Context, name string, rs ...runner) *stage {
	ctx, cancel := context.WithCancel(parent)
	g, gctx := errgroup.WithContext(ctx)
	for _, r := range rs {
		g.Go(func() error { return r.Run(gctx) })
	}
	return &stage{name: name, cancel: cancel, done: gctx.Done(), g: g}
}

// stop cancels the stage and waits for its runners.
func (st *stage) stop() error {
	st.cancel()
	if err := st.g.Wait(); err != nil {
		return fmt.Errorf("%s: %w", st.name, err)
	}
	return nil
}

// Run runs the server until ctx is done or a part fails, then stops the parts
// in order: the gateways stop accepting readings; the pipeline journals what
// was queued and drains to the sinks; the rules engine hands its last
// transitions to the outbox, which writes them to disk; the HTTP API stops;
// the stores are closed (Close). Every part but the gateways runs under a
// context of its own so that it outlives ctx for the drain.
func (s *server) Run(ctx context.Context) error {
	defer s.Close()
	late := context.WithoutCancel(ctx)
	order := []*stage{startStage(ctx, "gateways", s.gateways...)}
	if s.cluster != nil {
		// After the gateways stop, their last submissions are published;
		// the partitions are released before the pipeline drains.
		order = append(order, startStage(late, "cluster publisher", s.cluster.publisher()),
			startStage(late, "cluster consumers", s.cluster.consumers()...))
	}
	order = append(order, startStage(late, "pipeline", s.pipe))
	if s.engine != nil {
		release := runFunc(func(ctx context.Context) error { return s.gate.Run(ctx, time.Second) })
		order = append(order, startStage(late, "rules", s.engine, release), startStage(late, "rules outbox", s.outbox),
			startStage(late, "alert history", s.history))
	}
	web := startStage(late, "HTTP server", &httpRunner{srv: s.newHTTPServer(), ln: s.ln})
	order = append(order, web)
	s.ready.Store(true)
	s.log.Info("HTTP API listening", "addr", s.ln.Addr().String())
	s.log.Info("citypulse is ready", "devices", s.devices.Len(), "data_dir", s.cfg.DataDir)

	var runErr error
	select {
	case <-ctx.Done():
		s.log.Info("shutting down: no longer accepting readings")
	case <-order[0].done:
		runErr = errors.New("a gateway stopped unexpectedly")
	case <-web.done:
		runErr = errors.New("the HTTP server stopped unexpectedly")
	}
	if ctx.Err() != nil { // the gateways' context ends with ctx: that is no failure
		runErr = nil
	}
	s.ready.Store(false)
	for i, st := range order {
		runErr = errors.Join(runErr, st.stop())
		if i == 0 {
			s.log.Info("gateways stopped; draining the pipeline")
		}
	}
	// Queries whose requests ended stop at the engine's next check; the
	// stores must outlive them.
	wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	runErr = errors.Join(runErr, s.query.Wait(wctx))
	if err := errors.Join(runErr, s.Close()); err != nil {
		return err
	}
	s.log.Info("citypulse stopped cleanly")
	return nil
}

// httpRunner serves HTTP on ln until ctx is done, then lets the requests in
// flight finish for a few seconds and cancels the rest (their contexts end).
type httpRunner struct {
	srv *http.Server
	ln  net.Listener
}

func (h *httpRunner) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- h.srv.Serve(h.ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.srv.Shutdown(sctx); err != nil {
		_ = h.srv.Close()
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// newHTTPServer builds the HTTP server with the configured timeouts; the
// requests' contexts end when the server is closed.
func (s *server) newHTTPServer() *http.Server {
	c := s.cfg.HTTP
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: c.ReadHeaderTimeout,
		ReadTimeout:       c.ReadTimeout,
		WriteTimeout:      c.WriteTimeout,
		IdleTimeout:       c.IdleTimeout,
		MaxHeaderBytes:    c.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	// Live streams never go idle: end them when the server shuts down, or
	// they would hold its graceful shutdown until the timeout.
	srv.RegisterOnShutdown(s.events.Close)
	if s.feed != nil {
		srv.RegisterOnShutdown(s.feed.CloseStreams)
	}
	return srv
}
