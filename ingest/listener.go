package ingest

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
)

// enduringListener keeps accepting after errors that pass, such as running out
// of file descriptors (EMFILE) under a connection flood. mochi's listener
// returns from its accept loop on the first Accept error, which would leave the
// broker up but deaf for good; this wrapper waits (5 ms doubling to 1 s, as
// net/http does), counts the error and tries again. Only closing the listener
// ends it.
//
// Every accepted connection passes the pre-authentication gate (nil: none),
// which bounds the connections not authenticated yet and gives each a
// deadline for its CONNECT.
type enduringListener struct {
	net.Listener
	log    *slog.Logger
	errors prometheus.Counter
	gate   *preAuthGate
	closed chan struct{}
	once   sync.Once
}

func newEnduringListener(ln net.Listener, log *slog.Logger, errs prometheus.Counter, gate *preAuthGate) *enduringListener {
	return &enduringListener{Listener: ln, log: log, errors: errs, gate: gate, closed: make(chan struct{})}
}

func (l *enduringListener) Accept() (net.Conn, error) {
	var wait time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			cc := newCoalescingConn(c)
			if l.gate == nil {
				return cc, nil
			}
			return l.gate.admit(cc), nil
		}
		select {
		case <-l.closed:
			return nil, err
		default:
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err
		}
		if wait == 0 {
			wait = 5 * time.Millisecond
		} else {
			wait = min(2*wait, time.Second)
		}
		l.errors.Inc()
		if wait == time.Second || wait == 5*time.Millisecond {
			// once when the trouble starts, then once a second at most
			l.log.Error("cannot accept MQTT connections; retrying", "addr", l.Addr().String(),
				"err", err, "hint", hintFor(err))
		}
		t := time.NewTimer(wait)
		select {
		case <-l.closed:
			t.Stop()
			return nil, net.ErrClosed
		case <-t.C:
		}
	}
}

func (l *enduringListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

func hintFor(err error) string {
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		return "out of file descriptors: raise the process's open-files limit (ulimit -n) or lower ingest.mqtt.max_connections"
	}
	return ""
}

// connLogHandler gives mochi's listener messages a meaning. mochi logs every
// connection that ends with an error as Warn with an empty message; a device
// closing its connection (EOF, reset) is routine and goes to Debug, anything
// else stays a Warn, and both read "mqtt connection ended".
type connLogHandler struct{ slog.Handler }

func (h connLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message != "" {
		return h.Handler.Handle(ctx, r)
	}
	routine := false
	r.Attrs(func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && a.Key == "error" {
			// a deadline passed: the connect timeout (counted as
			// citypulse_mqtt_preauth_closed_total) or the keep-alive
			// or a CONNECT refused, which is counted (citypulse_mqtt_connects_total)
			// and sampled by the hook: a flood of them must not flood the log
			routine = errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
				errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
				errors.Is(err, os.ErrDeadlineExceeded) ||
				errors.Is(err, packets.ErrBadUsernameOrPassword) || errors.Is(err, packets.ErrNotAuthorized) ||
				errors.Is(err, packets.ErrServerBusy)
		}
		return true
	})
	level := r.Level
	if routine {
		level = slog.LevelDebug
	}
	if !h.Handler.Enabled(ctx, level) {
		return nil
	}
	nr := slog.NewRecord(r.Time, level, "mqtt connection ended", r.PC)
	r.Attrs(func(a slog.Attr) bool { nr.AddAttrs(a); return true })
	return h.Handler.Handle(ctx, nr)
}

func (h connLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return connLogHandler{h.Handler.WithAttrs(as)}
}

func (h connLogHandler) WithGroup(name string) slog.Handler {
	return connLogHandler{h.Handler.WithGroup(name)}
}
