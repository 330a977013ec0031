package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff paces the retries of one operation. The zero value is not useful:
// set Min and Max (0 < Min <= Max).
type Backoff struct {
	Min, Max time.Duration
	step     time.Duration
}

// Next returns how long to wait before the next attempt: the current step
// with jitter (uniform in [step/2, step], so that many clients failing
// together do not retry together), then doubles the step up to Max.
func (b *Backoff) Next() time.Duration {
	if b.step < b.Min {
		b.step = b.Min
	}
	d := b.step/2 + time.Duration(rand.Int64N(int64(b.step)/2+1))
	b.step = min(b.step*2, b.Max)
	return d
}

// Reset starts again from Min (after a success).
func (b *Backoff) Reset() { b.step = 0 }

// Sleep waits d or until ctx is done; it reports whether the whole d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
