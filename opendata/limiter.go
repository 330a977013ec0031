package opendata

import (
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// limiter bounds requests per client address and in total. The table of
// addresses is bounded: idle entries expire, and while it is full of active
// ones a new address is refused rather than let the table grow.
type limiter struct {
	cfg     Config
	now     func() time.Time
	total   *rate.Limiter
	mu      sync.Mutex
	clients map[string]*client
	swept   time.Time      // last expiry sweep: at most one a second
	streams map[string]int // open live streams per client address
	refused *prometheus.CounterVec
}

type client struct {
	lim  *rate.Limiter
	seen time.Time
}

// idleAfter is how long an address stays in the table after its last request.
const idleAfter = time.Minute

func newLimiter(c Config, reg prometheus.Registerer, now func() time.Time) *limiter {
	l := &limiter{
		cfg: c, now: now,
		total:   rate.NewLimiter(rate.Limit(c.TotalRatePerSecond), max(c.Burst, int(c.TotalRatePerSecond))),
		clients: make(map[string]*client),
		streams: make(map[string]int),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_opendata_requests_refused_total",
			Help: "Public feed requests refused, by reason (client_rate, total_rate, clients_full).",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(l.refused)
	}
	return l
}

// clientKey is what the limits count by: the client's IPv4 address, or the
// /64 of an IPv6 one (a host holds a whole /64).
func clientKey(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is6() && !ip.Is4In6() {
		if p, err := ip.Prefix(64); err == nil {
			return p.String()
		}
	}
	return host
}

// openStream counts a live stream of host, or says it has too many.
func (l *limiter) openStream(host string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.streams[host] >= l.cfg.MaxStreamsPerClient {
		l.refused.WithLabelValues("client_streams").Inc()
		return false
	}
	l.streams[host]++
	return true
}

func (l *limiter) closeStream(host string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.streams[host]--; l.streams[host] <= 0 {
		delete(l.streams, host)
	}
}

// allow says whether r may be served now; when not, the reason.
func (l *limiter) allow(r *http.Request) (bool, string) {
	host := clientKey(r)
	now := l.now()
	l.mu.Lock()
	c, ok := l.clients[host]
	if !ok {
		if len(l.clients) >= l.cfg.MaxClients {
			l.expireLocked(now)
		}
		if len(l.clients) >= l.cfg.MaxClients {
			l.mu.Unlock()
			return l.refuse("clients_full")
		}
		c = &client{lim: rate.NewLimiter(rate.Limit(l.cfg.RatePerSecond), l.cfg.Burst)}
		l.clients[host] = c
	}
	c.seen = now
	okClient := c.lim.AllowN(now, 1)
	l.mu.Unlock()
	if !okClient {
		return l.refuse("client_rate")
	}
	if !l.total.AllowN(now, 1) {
		return l.refuse("total_rate")
	}
	return true, ""
}

func (l *limiter) refuse(reason string) (bool, string) {
	l.refused.WithLabelValues(reason).Inc()
	return false, reason
}

func (l *limiter) expireLocked(now time.Time) {
	if now.Sub(l.swept) < time.Second {
		return
	}
	l.swept = now
	for h, c := range l.clients {
		if now.Sub(c.seen) > idleAfter {
			delete(l.clients, h)
		}
	}
}
