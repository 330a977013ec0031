// The helpers of a partition owner that keep batches in stream order and
// hand unhandled ones back (see owner.go).

package cluster

import (
	"github.com/nats-io/nats.go/jetstream"
)

// nakAll gives every batch back for redelivery at once.
func nakAll(batch []jetstream.Msg) {
	for _, m := range batch {
		_ = m.Nak()
	}
}

// distinctSeqs counts the different stream sequences in batch.
func distinctSeqs(batch []jetstream.Msg) int {
	seen := make(map[uint64]struct{}, len(batch))
	for _, m := range batch {
		seen[streamSeq(m)] = struct{}{}
	}
	return len(seen)
}

// chunkEnd is the length of batch's first handler call: up to max, and the
// repeats of its last batch with it (batch is sorted).
func chunkEnd(batch []jetstream.Msg, max int) int {
	n := min(len(batch), max)
	for n < len(batch) && streamSeq(batch[n]) == streamSeq(batch[n-1]) {
		n++
	}
	return n
}

// streamSeq is m's sequence in the stream.
func streamSeq(m jetstream.Msg) uint64 {
	md, err := m.Metadata()
	if err != nil {
		return 0
	}
	return md.Sequence.Stream
}

// drainAll returns the batches already waiting.
func drainAll(ch chan jetstream.Msg) []jetstream.Msg {
	var out []jetstream.Msg
	for {
		select {
		case m := <-ch:
			out = append(out, m)
		default:
			return out
		}
	}
}

// drain appends the batches already waiting, up to max.
func drain(ch chan jetstream.Msg, batch []jetstream.Msg, max int) []jetstream.Msg {
	for len(batch) < max {
		select {
		case m := <-ch:
			batch = append(batch, m)
		default:
			return batch
		}
	}
	return batch
}
