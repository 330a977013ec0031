package silence

import "github.com/prometheus/client_golang/prometheus"

// Enqueuer takes notifications (the notifier's outbox); it must not block.
type Enqueuer[E any] interface {
	Enqueue(ev E)
}

// Gate passes on to Next the events no active silence matches, and counts the
// rest. A resolution always passes: a receiver that heard an alert fire
// before it was silenced must hear it end (one that never heard it fire
// ignores it, as Alertmanager's receivers do). It checks the store's snapshot
// only, so it may sit in the shard loop.
type Gate[E any] struct {
	store      *Store
	labels     func(E) map[string]string
	resolved   func(E) bool
	next       Enqueuer[E]
	suppressed prometheus.Counter
}

// NewGate builds a gate; labels gives an event's alert labels, resolved says
// whether it is a resolution.
func NewGate[E any](s *Store, labels func(E) map[string]string, resolved func(E) bool, next Enqueuer[E], reg prometheus.Registerer) *Gate[E] {
	g := &Gate[E]{store: s, labels: labels, resolved: resolved, next: next, suppressed: prometheus.NewCounter(prometheus.CounterOpts{
		Name: "citypulse_notifications_silenced_total", Help: "Notifications not sent because an active silence matched the alert.",
	})}
	if reg != nil {
		reg.MustRegister(g.suppressed)
	}
	return g
}

// Enqueue forwards ev unless it is silenced.
func (g *Gate[E]) Enqueue(ev E) {
	if _, ok := g.store.Silenced(g.labels(ev)); ok && !g.resolved(ev) {
		g.suppressed.Inc()
		return
	}
	g.next.Enqueue(ev)
}
