package pipeline

import "errors"

// ErrBackpressure is returned by Submit when the readings cannot be journaled now
// (the journal is at pipeline.journal_max_bytes, the disk is full, or the shard's
// queue stays full): they were not acknowledged and the device should retry.
var ErrBackpressure = errors.New("pipeline: backpressure, readings not journaled")

// ErrClosed is returned by Submit once the pipeline is shutting down.
var ErrClosed = errors.New("pipeline: closed")
