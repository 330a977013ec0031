package pipeline

import "sync"

// queue feeds one shard loop: many producers (gateway goroutines) put
// submissions, the shard loop takes all waiting ones at once by swapping
// buffers. It is bounded: put reports false when full.
//
// Why a mutex and not a lock-free ring: BenchmarkRing (ring_test.go) compares a
// bounded Vyukov-style MPSC ring with batch claim, a buffered channel and this
// mutex-guarded slice in one run. On the 2-core machines this project runs on,
// the ring was 1.6-1.9x the channel (short of the 3x that would justify it),
// and the mutex slice, whose consumer takes everything in one critical section,
// was faster than the ring with 1 and 2 producers and equal with 8. So the
// simpler structure is used; the figures are in the README.
type queue struct {
	mu       sync.Mutex
	buf      []*request
	limit    int
	sleeping bool // the consumer found the queue empty and may be waiting on wake
	wake     chan struct{}
}

func newQueue(limit int) *queue {
	return &queue{buf: make([]*request, 0, min(limit, 1024)), limit: limit, wake: make(chan struct{}, 1)}
}

// put appends r, or reports false if the queue is full.
func (q *queue) put(r *request) bool {
	q.mu.Lock()
	if len(q.buf) >= q.limit {
		q.mu.Unlock()
		return false
	}
	q.buf = append(q.buf, r)
	wake := q.sleeping
	q.sleeping = false
	q.mu.Unlock()
	if wake {
		select {
		case q.wake <- struct{}{}:
		default:
		}
	}
	return true
}

// take returns every waiting submission, handing spare (emptied) to the queue
// as its next buffer, so the steady state allocates nothing. When it returns
// none, the next put signals wake.
func (q *queue) take(spare []*request) []*request {
	clear(spare)
	q.mu.Lock()
	got := q.buf
	q.buf = spare[:0]
	q.sleeping = len(got) == 0
	q.mu.Unlock()
	return got
}

// len returns how many submissions are waiting.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.buf)
}
