package httpapi

import (
	"net"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// ConnLimits bounds the HTTP connections open at once.
type ConnLimits struct {
	// Total is the most connections open at once (0: no limit).
	Total int
	// PerHost is the most connections open at once from one source IP
	// address (0: no limit).
	PerHost int
}

// LimitListener returns ln with limits: a connection over a limit is accepted
// and closed at once (it costs a descriptor for a moment, not for as long as a
// client likes) and counted in citypulse_http_connections_refused_total{reason}.
// citypulse_http_connections is the number open. reg may be nil.
func LimitListener(ln net.Listener, l ConnLimits, reg prometheus.Registerer) net.Listener {
	m := &listenerMetrics{
		open: prometheus.NewGauge(prometheus.GaugeOpts{Name: "citypulse_http_connections",
			Help: "HTTP connections open now."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "citypulse_http_connections_refused_total",
			Help: "HTTP connections closed at accept because a limit was reached (reason: total or per_host)."}, []string{"reason"}),
	}
	m.refused.WithLabelValues("total")
	m.refused.WithLabelValues("per_host")
	if reg != nil {
		reg.MustRegister(m.open, m.refused)
	}
	return &limitListener{Listener: ln, limits: l, m: m, perHost: map[string]int{}}
}

type listenerMetrics struct {
	open    prometheus.Gauge
	refused *prometheus.CounterVec
}

type limitListener struct {
	net.Listener
	limits ConnLimits
	m      *listenerMetrics

	mu      sync.Mutex
	total   int
	perHost map[string]int
}

// Accept returns the next connection within the limits.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		host := hostOf(c.RemoteAddr())
		if reason := l.admit(host); reason != "" {
			l.m.refused.WithLabelValues(reason).Inc()
			c.Close()
			continue
		}
		l.m.open.Inc()
		return &limitedConn{Conn: c, release: func() { l.release(host) }}, nil
	}
}

// admit counts a new connection from host, or says which limit refuses it.
func (l *limitListener) admit(host string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.limits.Total > 0 && l.total >= l.limits.Total {
		return "total"
	}
	if l.limits.PerHost > 0 && l.perHost[host] >= l.limits.PerHost {
		return "per_host"
	}
	l.total++
	l.perHost[host]++
	return ""
}

func (l *limitListener) release(host string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.perHost[host]--; l.perHost[host] <= 0 {
		delete(l.perHost, host)
	}
	l.m.open.Dec()
}

func hostOf(a net.Addr) string {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// limitedConn gives its place back when closed (once, however often Close is called).
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
