package pipeline

import (
	"context"
	"fmt"
	"runtime"
	"time"
)

// shard owns one journal and the devices that hash to it. Its loop is the
// journal's only writer: it takes every submission waiting in its queue, writes
// them with one write(2) (group commit), fsyncs by the policy, lets the observer
// see them, and only then answers the submitters.
type shard struct {
	id   int
	p    *Pipeline
	j    *journal
	tail *tail // newest records in memory for the sink workers (nil: no sinks)
	q    *queue
	done chan struct{} // closed when the loop has exited

	batch []*request
	buf   []byte
	// busy: the last take found submissions waiting right after a commit,
	// so more are on their way (see gather).
	busy bool
}

func (s *shard) run(ctx context.Context) {
	defer close(s.done)
	var tick <-chan time.Time
	if s.p.cfg.Fsync == FsyncInterval {
		t := time.NewTicker(s.p.cfg.FsyncInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		if s.takeAndCommit() {
			continue
		}
		select {
		case <-s.q.wake:
		case <-tick:
			s.sync()
		case <-ctx.Done():
			// Journal what was already queued: its submitters are waiting.
			for s.takeAndCommit() {
			}
			s.sync()
			return
		}
	}
}

// takeAndCommit journals every waiting submission as one group commit; it
// reports whether there were any.
func (s *shard) takeAndCommit() bool {
	s.gather()
	s.batch = s.q.take(s.batch)
	if len(s.batch) == 0 {
		s.busy = false
		return false
	}
	s.commit()
	s.busy = true
	return true
}

// gather lets a busy loop's write carry more: when the previous commit found
// work waiting, the submitters are many and some are still decoding on other
// goroutines, so the loop yields its processor to them before taking (up to
// gatherYields times, stopping once the queue holds as many submissions as
// the last write). An idle loop takes at once: a lone submission waits for
// nothing. The cost is a few scheduler round trips on a loop that is busy
// anyway; the gain is fewer write(2) calls, wake-ups and PUBACK rounds
// (citypulse_pipeline_journal_records_per_write).
func (s *shard) gather() {
	if !s.busy {
		return
	}
	last := len(s.batch)
	for range gatherYields {
		if s.q.len() >= max(last, 2) {
			return
		}
		runtime.Gosched()
	}
}

// gatherYields bounds how often a busy shard loop yields before a write.
const gatherYields = 2

func (s *shard) commit() {
	base := s.j.written.Load()
	s.buf = s.buf[:0]
	n := 0
	for _, r := range s.batch {
		seq := base + uint64(len(s.buf))
		for i := range r.rs {
			r.rs[i].Seq = seq
		}
		s.buf = appendRecord(s.buf, r.rs)
		n += len(r.rs)
	}
	err := s.j.write(s.buf)
	if err == nil && s.tail != nil {
		s.tail.pushAll(s.batch, base, base+uint64(len(s.buf)))
	}
	s.j.wake() // after the tail holds the records, so that woken sinks find them there
	if err == nil && s.p.cfg.Fsync == FsyncAlways {
		err = s.syncErr()
	}
	if err != nil {
		s.p.m.backpressure.WithLabelValues("journal_write_error").Inc()
		s.p.log.Error("journal write failed: the readings were not acknowledged and the devices will retry; check the disk under the data directory (full? read-only?)",
			"shard", s.id, "dir", s.j.dir, "err", err)
		err = fmt.Errorf("%w: %v", ErrBackpressure, err)
	} else {
		s.p.m.groupCommits.Inc()
		s.p.m.perWrite.Observe(float64(len(s.batch)))
		s.p.m.records.Add(float64(len(s.batch)))
		s.p.m.submitted.Add(float64(n))
		if s.p.obs != nil {
			for _, r := range s.batch {
				s.p.obs.Observe(s.id, r.rs)
			}
		}
	}
	for _, r := range s.batch {
		r.done <- err
	}
}

func (s *shard) sync() {
	if err := s.syncErr(); err != nil {
		s.p.log.Error("journal fsync failed; acknowledged readings are safe from a process crash but not yet from power loss",
			"shard", s.id, "err", err)
	}
}

func (s *shard) syncErr() error {
	if !s.j.dirty {
		return nil
	}
	start := time.Now()
	err := s.j.sync()
	s.p.m.fsyncs.Observe(time.Since(start).Seconds())
	return err
}

// ShardOf returns which of n shards owns device (FNV-1a of the ID, modulo n).
// Whatever keeps per-device state beside the shard loops (the rules engine)
// shards it with this function, so that a device's state lives with the loop
// that evaluates it.
func ShardOf(device string, n int) int {
	// FNV-1a, inline: no allocation.
	h := uint32(2166136261)
	for i := 0; i < len(device); i++ {
		h ^= uint32(device[i])
		h *= 16777619
	}
	return int(h % uint32(n))
}
