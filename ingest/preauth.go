package ingest

import (
	"container/list"
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
// holds). When a new connection finds a limit reached, the oldest pending
// connection under that limit is closed to make room: a flood of idle
// sockets then only ever holds a bounded number of descriptors, and cannot
// lock devices out for longer than it takes them to send CONNECT (a device
// sends it at once; a flood socket waits). An admitted connection must send
// CONNECT (after the TLS handshake on the TLS port) before its deadline, or
// its read fails and mochi closes it. The slot is freed when the device
// authenticates (authenticated) or the connection closes.
//
// Without it a peer that opens sockets and sends nothing holds a descriptor
// each, for ever, uncounted by max_connections, until the process runs out.
type preAuthGate struct {
	timeout time.Duration
	total   int // limits
	perAddr int
	log     *slog.Logger
	closed  *prometheus.CounterVec // by reason
	lastLog atomic.Int64           // unix ns of the last eviction logged

	mu     sync.Mutex
	all    list.List // *pendingConn, oldest first
	byAddr map[netip.Addr]*list.List
}

// Reasons for citypulse_mqtt_preauth_closed_total.
const (
	preAuthTimeout      = "connect_timeout"
	preAuthTotalLimit   = "pending_limit"
	preAuthAddressLimit = "address_limit"
)

func newPreAuthGate(timeout time.Duration, total, perAddr int, log *slog.Logger) *preAuthGate {
	g := &preAuthGate{timeout: timeout, total: total, perAddr: perAddr, log: log, byAddr: make(map[netip.Addr]*list.List),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_mqtt_preauth_closed_total",
			Help: "MQTT connections closed before authenticating: connect_timeout (no CONNECT within ingest.mqtt.connect_timeout), " +
				"pending_limit or address_limit (the oldest pending connection closed to make room for a new one: ingest.mqtt.max_pending_connections or max_pending_per_address reached).",
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
	return g.all.Len()
}

// addrKey is the source address a limit applies to.
func addrKey(a net.Addr) netip.Addr {
	var ip netip.Addr
	if ta, ok := a.(*net.TCPAddr); ok {
		ip = ta.AddrPort().Addr()
	} else if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		ip = ap.Addr()
	} else {
		return netip.Addr{} // not TCP/IP: all such share one key
	}
	ip = ip.Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// admit returns c wrapped with its CONNECT deadline, first closing the
// oldest pending connection of a limit that is reached.
func (g *preAuthGate) admit(c net.Conn) net.Conn {
	pc := &pendingConn{Conn: c, g: g, key: addrKey(c.RemoteAddr())}
	type eviction struct {
		pc     *pendingConn
		reason string
	}
	var evicted []eviction
	g.mu.Lock()
	if l := g.byAddr[pc.key]; l != nil && l.Len() >= g.perAddr {
		evicted = append(evicted, eviction{g.evictLocked(l.Front().Value.(*pendingConn)), preAuthAddressLimit})
	}
	if g.all.Len() >= g.total {
		evicted = append(evicted, eviction{g.evictLocked(g.all.Front().Value.(*pendingConn)), preAuthTotalLimit})
	}
	l := g.byAddr[pc.key]
	if l == nil {
		l = list.New()
		g.byAddr[pc.key] = l
	}
	pc.inAll, pc.inAddr = g.all.PushBack(pc), l.PushBack(pc)
	g.mu.Unlock()
	for _, e := range evicted {
		g.closed.WithLabelValues(e.reason).Inc()
		if e.pc != nil {
			e.pc.abort()
		}
		g.logEviction(e.reason, pc.key)
	}
	_ = c.SetDeadline(time.Now().Add(g.timeout))
	return pc
}

// evictLocked takes pc out of the gate and returns it, or nil when it was
// being released (closed or authenticated) at the same moment.
func (g *preAuthGate) evictLocked(pc *pendingConn) *pendingConn {
	g.removeLocked(pc)
	if pc.done.CompareAndSwap(false, true) {
		return pc
	}
	return nil
}

func (g *preAuthGate) removeLocked(pc *pendingConn) {
	if pc.inAll == nil {
		return
	}
	g.all.Remove(pc.inAll)
	if l := g.byAddr[pc.key]; l != nil {
		l.Remove(pc.inAddr)
		if l.Len() == 0 {
			delete(g.byAddr, pc.key)
		}
	}
	pc.inAll, pc.inAddr = nil, nil
}

func (g *preAuthGate) logEviction(reason string, key netip.Addr) {
	now := time.Now().UnixNano()
	if last := g.lastLog.Load(); now-last >= int64(10*time.Second) && g.lastLog.CompareAndSwap(last, now) {
		g.log.Warn("closing the oldest MQTT connections that have not authenticated yet to make room (logged once per 10 s; counted in citypulse_mqtt_preauth_closed_total)",
			"reason", reason, "newest_remote", key.String(), "max_pending_connections", g.total, "max_pending_per_address", g.perAddr)
	}
}

// pendingConn holds a gate slot until its device authenticates or it closes.
type pendingConn struct {
	net.Conn
	g             *preAuthGate
	key           netip.Addr
	inAll, inAddr *list.Element // guarded by g.mu; nil once out of the gate
	done          atomic.Bool   // slot released
	timedOut      atomic.Bool
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

// abort closes an evicted connection with a reset: no TIME_WAIT left behind.
func (c *pendingConn) abort() {
	raw := c.Conn
	if cc, ok := raw.(*coalescingConn); ok {
		raw = cc.Conn
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Conn.Close()
}

func (c *pendingConn) release() {
	if c.done.CompareAndSwap(false, true) {
		c.g.mu.Lock()
		c.g.removeLocked(c)
		c.g.mu.Unlock()
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
