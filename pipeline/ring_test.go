package pipeline

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRingKeepsEachProducersOrderAndLosesNothing(t *testing.T) {
	r := newRing[int](64)
	const producers, per = 4, 20000
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i += 2 {
				for !r.push(p*per+i, p*per+i+1) { // batch claim of two
					runtime.Gosched()
				}
			}
		}()
	}
	next := make([]int, producers)
	got := 0
	var buf []int
	for got < producers*per {
		buf = r.pop(buf[:0], 16)
		if len(buf) == 0 {
			ch := r.waitCh()
			if r.empty() {
				<-ch
			}
			r.sleep.Store(false)
			continue
		}
		for _, v := range buf {
			p, i := v/per, v%per
			require.Equal(t, next[p], i, "producer %d out of order", p)
			next[p]++
			got++
		}
	}
	wg.Wait()
	require.True(t, r.empty())
}

func TestRingReportsFullAndRecovers(t *testing.T) {
	r := newRing[int](4)
	require.True(t, r.push(1, 2, 3))
	require.False(t, r.push(4, 5), "no room for both: nothing is appended")
	require.True(t, r.push(4))
	require.False(t, r.push(5))
	require.Equal(t, []int{1, 2, 3, 4}, r.pop(nil, 10))
	require.True(t, r.push(5, 6, 7, 8))
	require.False(t, r.push(1, 2, 3, 4, 5), "larger than the ring")
	require.Equal(t, []int{5, 6}, r.pop(nil, 2))
}

// The three queues compared: the ring, a buffered channel, and the queue the
// pipeline uses (queue.go).
type queueImpl interface {
	put(v *request) bool
	take(dst []*request) []*request
}

type ringQ struct{ r *ring[*request] }

func (q ringQ) put(v *request) bool            { return q.r.push(v) }
func (q ringQ) take(dst []*request) []*request { return q.r.pop(dst, 256) }

type chanQ chan *request

func (q chanQ) put(v *request) bool {
	select {
	case q <- v:
		return true
	default:
		return false
	}
}

func (q chanQ) take(dst []*request) []*request {
	for len(dst) < 256 {
		select {
		case v := <-q:
			dst = append(dst, v)
		default:
			return dst
		}
	}
	return dst
}

// realQ is pipeline.queue itself: take hands dst over as the queue's next
// buffer and returns the filled one, as the shard loop does
// (s.batch = s.q.take(s.batch)).
type realQ struct{ q *queue }

func (q realQ) put(v *request) bool            { return q.q.put(v) }
func (q realQ) take(dst []*request) []*request { return q.q.take(dst) }

// BenchmarkRing: P producers each put b.N/P submissions; one consumer takes
// them in bulk (as the shard loop does). A full queue makes the producer yield
// and retry. One op = one submission through the queue. "queue" is the
// pipeline's queue (queue.go); .ci/benchtable.awk prints each one's speed
// relative to "chan" at the same producer count.
func BenchmarkRing(b *testing.B) {
	impls := []struct {
		name string
		make func() queueImpl
	}{
		{"ring", func() queueImpl { return ringQ{newRing[*request](4096)} }},
		{"chan", func() queueImpl { return chanQ(make(chan *request, 4096)) }},
		{"queue", func() queueImpl { return realQ{newQueue(4096)} }},
	}
	for _, producers := range []int{1, 2, 8} {
		for _, impl := range impls {
			b.Run(fmt.Sprintf("%s/producers=%d", impl.name, producers), func(b *testing.B) {
				q := impl.make()
				item := &request{}
				b.ReportAllocs()
				b.ResetTimer()
				var wg sync.WaitGroup
				per := b.N / producers
				for p := 0; p < producers; p++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := 0; i < per; i++ {
							for !q.put(item) {
								runtime.Gosched()
							}
						}
					}()
				}
				var buf []*request
				for got := 0; got < per*producers; {
					buf = q.take(buf[:0])
					if len(buf) == 0 {
						runtime.Gosched()
					}
					got += len(buf)
				}
				wg.Wait()
			})
		}
	}
}

// ring is the lock-free alternative that BenchmarkQueue measures against the
// queue the pipeline uses (see queue.go for why it is not used). It is a bounded lock-free multi-producer single-consumer queue (after
// Dmitry Vyukov's bounded MPMC queue, with one consumer). Each slot carries a
// sequence number: slot i is free for the producer of position p when
// seq == p, and holds a value for the consumer when seq == p+1.
//
// A producer claims n consecutive positions with one CAS on tail (batch
// claim), fills them, and publishes each; the consumer takes published values
// in order. When full, push reports false at once: the caller decides how to
// push back. The consumer sleeps on a channel when the ring is empty; a
// producer wakes it only if it said it was going to sleep.
type ring[T any] struct {
	_     [64]byte
	tail  atomic.Uint64 // next position to claim (producers)
	_     [56]byte
	head  uint64 // next position to take (consumer only)
	_     [56]byte
	sleep atomic.Bool // the consumer is (about to be) parked on wake
	wake  chan struct{}
	mask  uint64
	slots []ringSlot[T]
}

type ringSlot[T any] struct {
	seq atomic.Uint64
	v   T
}

// newRing returns a ring with room for size values, rounded up to a power of two.
func newRing[T any](size int) *ring[T] {
	n := 1
	for n < size {
		n <<= 1
	}
	r := &ring[T]{mask: uint64(n - 1), slots: make([]ringSlot[T], n), wake: make(chan struct{}, 1)}
	for i := range r.slots {
		r.slots[i].seq.Store(uint64(i))
	}
	return r
}

// push appends vs as one claim; it reports false (and appends nothing) if
// there is no room for all of them.
func (r *ring[T]) push(vs ...T) bool {
	n := uint64(len(vs))
	if n == 0 {
		return true
	}
	if n > r.mask+1 {
		return false
	}
	var pos uint64
	for {
		pos = r.tail.Load()
		// Slots are freed in order, so the last slot of the claim being free
		// means all of them are.
		last := &r.slots[(pos+n-1)&r.mask]
		seq := last.seq.Load()
		switch {
		case seq == pos+n-1:
			if r.tail.CompareAndSwap(pos, pos+n) {
				goto claimed
			}
		case seq < pos+n-1:
			return false // full
		}
		// Another producer moved tail: try again.
	}
claimed:
	for i := uint64(0); i < n; i++ {
		s := &r.slots[(pos+i)&r.mask]
		s.v = vs[i]
		s.seq.Store(pos + i + 1)
	}
	if r.sleep.Load() && r.sleep.CompareAndSwap(true, false) {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	return true
}

// pop appends up to max published values to dst without blocking.
func (r *ring[T]) pop(dst []T, max int) []T {
	var zero T
	for i := 0; i < max; i++ {
		s := &r.slots[r.head&r.mask]
		if s.seq.Load() != r.head+1 {
			break
		}
		dst = append(dst, s.v)
		s.v = zero
		s.seq.Store(r.head + r.mask + 1)
		r.head++
	}
	return dst
}

// empty reports whether nothing is published at head (consumer only).
func (r *ring[T]) empty() bool {
	return r.slots[r.head&r.mask].seq.Load() != r.head+1
}

// waitCh returns a channel that is signalled when a value may have been
// published; call it only after empty() was true, and check empty() again
// before blocking on it (consumer only).
func (r *ring[T]) waitCh() <-chan struct{} {
	r.sleep.Store(true)
	return r.wake
}
