package clusterstate

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/citypulse/citypulse/internal/backoff"
)

// attemptTimeout bounds one attempt of a write to a stream (retryWrite).
const attemptTimeout = 2 * time.Second

// retryWrite runs op, a write to a JetStream stream, each attempt bounded by
// attemptTimeout, and runs it again, until ctx ends, while
//   - no server took the message (jetstream.ErrNoStreamResponse: no stream
//     leader, as while one is being elected after a server left, or just
//     after the stream was created; the client's own two retries span half a
//     second): nothing was stored;
//   - no answer came within attemptTimeout (a message that reached a leader
//     that has just gone): it may have been stored and its answer lost.
//
// So op must be safe to repeat: a put or a delete is; a create is told by
// retried that an earlier attempt may have stored its value. An operator's
// change then waits out a leader election instead of failing.
func retryWrite(ctx context.Context, op func(ctx context.Context, retried bool) error) error {
	b := backoff.Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	for retried := false; ; retried = true {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		err := op(actx, retried)
		cancel()
		unanswered := ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout))
		if !(errors.Is(err, jetstream.ErrNoStreamResponse) || unanswered) || !backoff.Sleep(ctx, b.Next()) {
			return err
		}
	}
}
