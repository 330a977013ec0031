package ingest

import (
	"crypto/tls"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// preAuthGate bounds the connections that have not authenticated yet: in
// total and per source address (IPv6: per /64, which one host usually
// holds). A connection past either limit is closed as soon as it is
// accepted; one admitted must send CONNECT (after the TLS handshake on the
// TLS port) before its deadline, or its read fails and mochi closes it. The
// slot is freed when the device authenticates (authenticated) or the
// connection closes, whichever comes first.
//
// Without it a peer that opens sockets and sends nothing holds a descriptor
// each, for ever, uncounted by max_connections, until the process runs out.
type preAuthGate struct {
	timeout time.Duration
	total   int // limits
	perAddr int
	log     *slog.Logger
	closed  *prometheus.CounterVec // by reason
	lastLog atomic.Int64           // unix ns of the last refusal logged

	mu     sync.Mutex
	n      int
	byAddr map[netip.Addr]int
}

// Reasons for citypulse_mqtt_preauth_closed_total.
const (
	preAuthTimeout      = "connect_timeout"
	preAuthTotalLimit   = "pending_limit"
	preAuthAddressLimit = "address_limit"
)

func newPreAuthGate(timeout time.Duration, total, perAddr int, log *slog.Logger) *preAuthGate {
	g := &preAuthGate{timeout: timeout, total: total, perAddr: perAddr, log: log, byAddr: make(map[netip.Addr]int),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_mqtt_preauth_closed_total",
			Help: "MQTT connections closed before authenticating: connect_timeout (no CONNECT within ingest.mqtt.connect_timeout), " +
				"pending_limit or address_limit (refused at accept: ingest.mqtt.max_pending_connections or max_pending_per_address reached).",
		}, []string{"reason"}),
	}
	for _, r := range []string{preAuthTimeout, preAuthTotalLimit, preAuthAddressLimit} {
		g.closed.WithLabelValues(r)
	}
	return g
}

// collectors are the gate's metrics.
func (g *preAuthGate) collectors() []prometheus.Collector {
	return []prometheus.Collector{g.closed, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "citypulse_mqtt_pending_connections",
		Help: "MQTT connections accepted that have not authenticated yet (both ports).",
	}, func() float64 { return float64(g.pending()) })}
}

func (g *preAuthGate) pending() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

// addrKey is the source address a limit applies to.
func addrKey(a net.Addr) netip.Addr {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{} // not TCP/IP: all such share one key
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// admit returns c wrapped with its CONNECT deadline, or closes c and returns
// nil when a limit is reached.
func (g *preAuthGate) admit(c net.Conn) net.Conn {
	key := addrKey(c.RemoteAddr())
	g.mu.Lock()
	reason := ""
	switch {
	case g.n >= g.total:
		reason = preAuthTotalLimit
	case g.byAddr[key] >= g.perAddr:
		reason = preAuthAddressLimit
	default:
		g.n++
		g.byAddr[key]++
	}
	g.mu.Unlock()
	if reason != "" {
		g.refuse(c, key, reason)
		return nil
	}
	_ = c.SetDeadline(time.Now().Add(g.timeout))
	return &pendingConn{Conn: c, g: g, key: key}
}

func (g *preAuthGate) refuse(c net.Conn, key netip.Addr, reason string) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // reset: no TIME_WAIT left behind for a flood
	}
	c.Close()
	g.closed.WithLabelValues(reason).Inc()
	now := time.Now().UnixNano()
	if last := g.lastLog.Load(); now-last >= int64(10*time.Second) && g.lastLog.CompareAndSwap(last, now) {
		g.log.Warn("refusing MQTT connections: too many have not authenticated yet (logged once per 10 s; counted in citypulse_mqtt_preauth_closed_total)",
			"reason", reason, "remote", key.String(), "max_pending_connections", g.total, "max_pending_per_address", g.perAddr)
	}
}

func (g *preAuthGate) release(key netip.Addr) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.n--
	if g.byAddr[key]--; g.byAddr[key] <= 0 {
		delete(g.byAddr, key)
	}
}

// pendingConn holds a gate slot until its device authenticates or it closes.
type pendingConn struct {
	net.Conn
	g        *preAuthGate
	key      netip.Addr
	done     atomic.Bool // slot released
	timedOut atomic.Bool
}

func (c *pendingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !c.done.Load() {
		if ne, ok := err.(net.Error); ok && ne.Timeout() && c.timedOut.CompareAndSwap(false, true) {
			c.g.closed.WithLabelValues(preAuthTimeout).Inc()
		}
	}
	return n, err
}

func (c *pendingConn) Close() error {
	c.release()
	return c.Conn.Close()
}

func (c *pendingConn) release() {
	if c.done.CompareAndSwap(false, true) {
		c.g.release(c.key)
	}
}

// authenticated frees the gate slot of a connection whose device has
// authenticated (c as mochi holds it: a *pendingConn, or a *tls.Conn over one).
// From here max_connections counts it, and mochi's keep-alive deadline applies.
func authenticated(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if pc, ok := c.(*pendingConn); ok {
		pc.release()
	}
}
