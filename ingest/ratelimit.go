package ingest

import (
	"errors"
	"math"
	"sync"
	"time"
)

// ErrRateLimited says that a device sent more readings than its rate limit
// allows: nothing of the message was journaled or acknowledged. Gateways
// answer with a back-off signal (MQTT v5 negative PUBACK 0x97, MQTT 3.1.1 a
// disconnect without PUBACK, CoAP 4.29 with Max-Age).
var ErrRateLimited = errors.New("device over its rate limit")

// RateLimitError is ErrRateLimited with the time after which the message
// would be accepted.
type RateLimitError struct{ RetryAfter time.Duration }

func (e *RateLimitError) Error() string {
	return "device over its rate limit; retry after " + e.RetryAfter.Round(time.Millisecond).String()
}

// Never reports that the message is larger than the burst: waiting will not
// help, so gateways treat it like a bad payload rather than ask for a retry.
func (e *RateLimitError) Never() bool { return e.RetryAfter > time.Hour }

// Is makes errors.Is(err, ErrRateLimited) true.
func (e *RateLimitError) Is(target error) bool { return target == ErrRateLimited }

// limiter is a token bucket per device: Rate readings per second, up to Burst
// at once. A message is admitted whole or not at all.
type limiter struct {
	rate, burst float64
	buckets     sync.Map // device id -> *bucket
}

type bucket struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newLimiter(rate float64, burst int) *limiter {
	if rate <= 0 {
		return nil
	}
	b := float64(burst)
	if b < rate {
		b = rate
	}
	return &limiter{rate: rate, burst: b}
}

// allow takes n tokens of device id at now, or says how long until it could.
func (l *limiter) allow(id string, n int, now time.Time) (bool, time.Duration) {
	if l == nil {
		return true, 0
	}
	v, ok := l.buckets.Load(id)
	if !ok {
		v, _ = l.buckets.LoadOrStore(id, &bucket{tokens: l.burst, last: now})
	}
	b := v.(*bucket)
	b.mu.Lock()
	defer b.mu.Unlock()
	if el := now.Sub(b.last).Seconds(); el > 0 {
		b.tokens = math.Min(l.burst, b.tokens+el*l.rate)
		b.last = now
	}
	need := float64(n)
	if need > l.burst {
		// a message larger than the burst can never pass: refuse it for good
		// rather than ask the device to wait forever
		return false, time.Duration(math.MaxInt64)
	}
	if b.tokens >= need {
		b.tokens -= need
		return true, 0
	}
	wait := time.Duration((need - b.tokens) / l.rate * float64(time.Second))
	return false, wait
}
