package notifier

import (
	"sync"
	"time"
)

// deliveriesPerReceiver bounds the notifications in flight to one receiver.
// Different alerts are delivered concurrently (a burst of incidents is not
// queued behind one slow request); one alert's notifications (firing, then
// resolved) are delivered in order.
const deliveriesPerReceiver = 4

// pending is one notification on disk waiting for delivery.
type pending struct {
	path string
	e    Entry
	// queued is when the receiver's queue got it (zero: loaded from disk)
	queued time.Time
}

// rqueue is one receiver's pending notifications in order, with the alerts
// (fingerprints) that have a delivery in flight.
type rqueue struct {
	mu       sync.Mutex
	items    []*pending
	inflight map[string]bool
	wake     chan struct{}
}

func newRQueue() *rqueue {
	return &rqueue{inflight: map[string]bool{}, wake: make(chan struct{}, 1)}
}

func (q *rqueue) push(p *pending) {
	q.mu.Lock()
	q.items = append(q.items, p)
	q.mu.Unlock()
	q.signal()
}

func (q *rqueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// next takes the oldest notification whose alert has none in flight.
func (q *rqueue) next() *pending {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, p := range q.items {
		fp := p.e.Event.Fingerprint
		if q.inflight[fp] {
			continue
		}
		q.inflight[fp] = true
		q.items = append(q.items[:i], q.items[i+1:]...)
		return p
	}
	return nil
}

func (q *rqueue) done(p *pending) {
	q.mu.Lock()
	delete(q.inflight, p.e.Event.Fingerprint)
	q.mu.Unlock()
	q.signal()
}
