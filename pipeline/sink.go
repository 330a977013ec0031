package pipeline

import (
	"context"
	"errors"
)

// Batch is a group of journaled readings handed to a sink. The sink must not keep
// Readings after Write returns: the slice is reused.
type Batch struct {
	// Shard is the pipeline shard the batch comes from (0 … shards−1). One
	// shard's batches reach a sink one at a time, in journal order, so a sink
	// may keep per-shard state without locking it (the embedded TSDB keeps a
	// series cache per shard). Batches written from outside a pipeline (the
	// cluster's store follower, one writer) use Shard −1, which follows the
	// same rule: never two −1 batches at once.
	Shard    int
	Readings []Reading
}

// Sink writes batches to a store. Write returns only when the batch is durable in
// the store, or with an error saying why not. The pipeline retries a batch (with
// backoff) until Write succeeds, unless the error wraps ErrPermanent, in which case
// the batch is counted as dropped by that sink and logged; an error that also has
// a Dropped() int method counts only that many (the sink stored the rest).
//
// Readings are delivered at least once: after a crash, a batch whose cursor was not
// yet committed is written again, so Write must be idempotent for identical
// readings (the Prometheus TSDB is: a repeated identical sample is a no-op).
type Sink interface {
	Name() string
	Write(ctx context.Context, b Batch) error
}

// ErrPermanent marks a sink error that retrying cannot fix (e.g. the store rejects
// the data itself). Wrap it: fmt.Errorf("...: %w", pipeline.ErrPermanent).
var ErrPermanent = errors.New("permanent sink error")

// RefusalReporter is implemented by a sink whose store refuses some readings
// for their own sake (counted and skipped, not retried), e.g. the embedded
// TSDB's "duplicate": a second, different value of a series at the same ms.
// Status reports the counts, by reason, with the sink's progress.
type RefusalReporter interface {
	Refused() map[string]uint64
}
