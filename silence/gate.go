package silence

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Enqueuer takes notifications (the notifier's outbox); it must not block.
type Enqueuer[E any] interface {
	Enqueue(ev E)
}

// Gate passes on to Next the events no active silence matches, and counts the
// rest. A resolution always passes: a receiver that heard an alert fire
// before it was silenced must hear it end (one that never heard it fire
// ignores it, as Alertmanager's receivers do). A firing held back is kept (the
// latest per alert) until its alert resolves or a newer firing passes; when
// no silence matches it any more (the silence expired or was ended), Release
// sends it, as Alertmanager notifies an alert still firing when its silence
// ends. The held events are bounded by the alerts firing, since each one's
// resolution removes it. It checks the store's snapshot only, so it may sit
// in the shard loop.
type Gate[E any] struct {
	store      *Store
	labels     func(E) map[string]string
	key        func(E) string
	resolved   func(E) bool
	next       Enqueuer[E]
	suppressed prometheus.Counter
	released   prometheus.Counter

	mu   sync.Mutex
	held map[string]E // alert key → its latest firing held back
}

// GateFuncs tell the gate about an event: its alert's labels, the alert's
// identity (e.g. its fingerprint) and whether it is a resolution.
type GateFuncs[E any] struct {
	Labels   func(E) map[string]string
	Key      func(E) string
	Resolved func(E) bool
}

// NewGate builds a gate in front of next.
func NewGate[E any](s *Store, f GateFuncs[E], next Enqueuer[E], reg prometheus.Registerer) *Gate[E] {
	g := &Gate[E]{store: s, labels: f.Labels, key: f.Key, resolved: f.Resolved, next: next, held: make(map[string]E),
		suppressed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_notifications_silenced_total", Help: "Notifications not sent because an active silence matched the alert.",
		}),
		released: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_notifications_released_total", Help: "Firing notifications held back by a silence and sent when it ended while the alert still fired.",
		}),
	}
	if reg != nil {
		reg.MustRegister(g.suppressed, g.released)
	}
	return g
}

// Enqueue forwards ev unless it is silenced.
func (g *Gate[E]) Enqueue(ev E) {
	k := g.key(ev)
	if g.resolved(ev) {
		g.forget(k)
		g.next.Enqueue(ev)
		return
	}
	if _, ok := g.store.Silenced(g.labels(ev)); ok {
		g.suppressed.Inc()
		g.mu.Lock()
		g.held[k] = ev
		g.mu.Unlock()
		return
	}
	g.forget(k)
	g.next.Enqueue(ev)
}

func (g *Gate[E]) forget(k string) {
	g.mu.Lock()
	delete(g.held, k)
	g.mu.Unlock()
}

// Release sends the held firings that no active silence matches any more, and
// returns how many it sent.
func (g *Gate[E]) Release() int {
	var out []E
	g.mu.Lock()
	for k, ev := range g.held {
		if _, ok := g.store.Silenced(g.labels(ev)); !ok {
			out = append(out, ev)
			delete(g.held, k)
		}
	}
	g.mu.Unlock()
	for _, ev := range out {
		g.next.Enqueue(ev)
	}
	g.released.Add(float64(len(out)))
	return len(out)
}

// Run calls Release every interval until ctx is done.
func (g *Gate[E]) Run(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			g.Release()
		}
	}
}
