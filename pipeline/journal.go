package pipeline

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/citypulse/citypulse/internal/durable"
)

// A journal position (LSN) is a byte offset in the shard's log, counted from its
// creation; a segment file is named after the LSN of its first byte. Segments are
// contiguous except after recovery cut a damaged segment short: a reader that
// reaches the end of a segment moves on to the start of the next one.

type segment struct {
	start uint64
	size  int64 // valid bytes; for the active segment see journal.written
}

func segmentName(start uint64) string { return fmt.Sprintf("%020d.seg", start) }

// journal is one shard's append-only log. The shard loop is its only writer;
// sink readers read it concurrently through their own file handles, never past
// written.
type journal struct {
	dir      string
	segBytes int64
	log      *slog.Logger

	mu   sync.Mutex // guards segs (appended by the writer, trimmed by truncateBefore)
	segs []segment

	f       *os.File // active segment; writer only
	written atomic.Uint64
	first   atomic.Uint64 // start of the oldest segment
	notify  atomic.Pointer[chan struct{}]
	waiting atomic.Bool // a reader has called changed since the last wake
	dirty   bool        // written since the last fsync; writer only
	closed  bool
}

// recoveryStats says what opening a journal found.
type recoveryStats struct {
	Records      int
	DroppedBytes int64 // bytes cut off at damage
	Damaged      int   // segments with damage
}

// openJournal opens (or creates) the journal in dir, scanning every segment: at
// the first record that fails its checks a segment is cut short there, and the
// bytes dropped are counted. It never refuses to start because of damage.
func openJournal(dir string, segBytes int64, log *slog.Logger) (*journal, recoveryStats, error) {
	var st recoveryStats
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, st, fmt.Errorf("create journal dir: %w", err)
	}
	j := &journal{dir: dir, segBytes: segBytes, log: log}
	ch := make(chan struct{})
	j.notify.Store(&ch)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, st, err
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".seg") {
			continue
		}
		start, err := strconv.ParseUint(strings.TrimSuffix(name, ".seg"), 10, 64)
		if err != nil {
			log.Warn("journal: ignoring a file that is not a segment", "file", filepath.Join(dir, name))
			continue
		}
		j.segs = append(j.segs, segment{start: start})
	}
	sort.Slice(j.segs, func(a, b int) bool { return j.segs[a].start < j.segs[b].start })
	for i := range j.segs {
		if err := j.recoverSegment(&j.segs[i], &st); err != nil {
			return nil, st, err
		}
		// A segment must not overlap the next one.
		if i+1 < len(j.segs) && j.segs[i].start+uint64(j.segs[i].size) > j.segs[i+1].start {
			return nil, st, fmt.Errorf("journal %s: segment %s overlaps the next one", dir, segmentName(j.segs[i].start))
		}
	}
	if len(j.segs) == 0 {
		j.segs = append(j.segs, segment{start: 0})
	}
	last := j.segs[len(j.segs)-1]
	f, err := os.OpenFile(filepath.Join(dir, segmentName(last.start)), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, st, fmt.Errorf("open journal segment: %w", err)
	}
	if _, err := f.Seek(last.size, io.SeekStart); err != nil {
		f.Close()
		return nil, st, err
	}
	j.f = f
	j.written.Store(last.start + uint64(last.size))
	j.first.Store(j.segs[0].start)
	return j, st, nil
}

func (j *journal) recoverSegment(s *segment, st *recoveryStats) error {
	path := filepath.Join(j.dir, segmentName(s.start))
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read journal segment: %w", err)
	}
	off := 0
	for off < len(b) {
		n, err := recordLen(b[off:])
		if err != nil || n == 0 {
			break
		}
		off += n
		st.Records++
	}
	s.size = int64(off)
	if off < len(b) {
		st.Damaged++
		st.DroppedBytes += int64(len(b) - off)
		j.log.Warn("journal: cut a damaged or torn segment short; the records before the damage are kept",
			"segment", path, "kept_bytes", off, "dropped_bytes", len(b)-off)
		if err := os.Truncate(path, int64(off)); err != nil {
			return fmt.Errorf("truncate damaged journal segment: %w", err)
		}
	}
	return nil
}

// append writes b (whole records) with one write(2) and wakes the readers
// waiting. On failure the segment is cut back so no partial record stays
// behind, and nothing is published.
func (j *journal) append(b []byte) error {
	err := j.write(b)
	j.wake()
	return err
}

// write is append without the wake-up: the caller wakes the readers (wake)
// once it has done what they are to find.
func (j *journal) write(b []byte) error {
	if j.closed {
		return ErrClosed
	}
	end := j.written.Load()
	if _, err := j.f.Write(b); err != nil {
		if terr := j.rollback(end); terr != nil {
			return fmt.Errorf("journal write: %v; rollback: %w", err, terr)
		}
		return fmt.Errorf("journal write: %w", err)
	}
	j.dirty = true
	j.written.Store(end + uint64(len(b)))
	if int64(j.written.Load()-j.activeStart()) >= j.segBytes {
		if err := j.roll(); err != nil {
			j.log.Error("journal: cannot start a new segment; appending to the current one", "err", err)
		}
	}
	return nil
}

func (j *journal) rollback(end uint64) error {
	size := int64(end - j.activeStart())
	if err := j.f.Truncate(size); err != nil {
		return err
	}
	_, err := j.f.Seek(size, io.SeekStart)
	return err
}

func (j *journal) activeStart() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.segs[len(j.segs)-1].start
}

// roll closes the active segment (fsynced, so that only the active segment can
// ever lose data on power loss) and starts a new one at the current end.
func (j *journal) roll() error {
	end := j.written.Load()
	if err := j.f.Sync(); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(j.dir, segmentName(end)), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := j.f.Close(); err != nil {
		j.log.Warn("journal: close segment", "err", err)
	}
	_ = durable.SyncDir(j.dir)
	j.f = f
	j.dirty = false
	j.mu.Lock()
	last := &j.segs[len(j.segs)-1]
	last.size = int64(end - last.start)
	j.segs = append(j.segs, segment{start: end})
	j.mu.Unlock()
	return nil
}

// wake tells waiting readers that written moved. With no reader waiting (all
// busy writing) it costs one atomic swap: no channel is made or closed.
func (j *journal) wake() {
	if !j.waiting.Swap(false) {
		return
	}
	ch := make(chan struct{})
	old := j.notify.Swap(&ch)
	close(*old)
}

// changed returns a channel closed at the next append. Call it before reading
// written, so no append can be missed. The channel is loaded before waiting is
// set: a wake that finds waiting false ran before the Store, so the written it
// published is seen by the read of written that follows; a wake that consumes
// the flag closes the channel loaded here, or an earlier wake already has
// (every swap closes the channel it replaces).
func (j *journal) changed() <-chan struct{} {
	ch := *j.notify.Load()
	j.waiting.Store(true)
	return ch
}

func (j *journal) sync() error {
	if !j.dirty || j.closed {
		return nil
	}
	j.dirty = false
	return j.f.Sync()
}

// bytes is the journal's size on disk (all segments).
func (j *journal) bytes() int64 { return int64(j.written.Load() - j.first.Load()) }

// span returns the segment holding pos and whether it is the active one. A
// position before the oldest segment (deleted) maps to that segment's start.
// end is the segment's end (for the active one, written).
func (j *journal) span(pos uint64) (start, end uint64, next uint64, active bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	i := sort.Search(len(j.segs), func(i int) bool { return j.segs[i].start > pos }) - 1
	if i < 0 {
		i = 0
	}
	s := j.segs[i]
	if i == len(j.segs)-1 {
		return s.start, j.written.Load(), 0, true
	}
	return s.start, s.start + uint64(s.size), j.segs[i+1].start, false
}

// truncateBefore deletes the segments that lie wholly before pos (every sink has
// read past them). The active segment is never deleted.
func (j *journal) truncateBefore(pos uint64) (int, error) {
	j.mu.Lock()
	var drop []segment
	for len(j.segs) > 1 && j.segs[1].start <= pos {
		drop = append(drop, j.segs[0])
		j.segs = j.segs[1:]
	}
	j.first.Store(j.segs[0].start)
	j.mu.Unlock()
	var errs []error
	for _, s := range drop {
		if err := os.Remove(filepath.Join(j.dir, segmentName(s.start))); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return len(drop), errors.Join(errs...)
}

func (j *journal) close() error {
	if j.closed {
		return nil
	}
	j.closed = true
	err := j.f.Sync()
	return errors.Join(err, j.f.Close())
}

// journalReader reads whole records from a journal through its own file handle.
type journalReader struct {
	j      *journal
	f      *os.File
	fstart uint64
	buf    []byte
	in     interner
}

func newJournalReader(j *journal) *journalReader {
	return &journalReader{j: j, buf: make([]byte, 0, 256<<10), in: make(interner)}
}

func (r *journalReader) close() {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// read appends the readings of the whole records from pos onwards to dst, up
// to maxReadings (but at least one record) and maxBytes of records, never past
// what has been written. It returns the position after the last record read
// and the journal bytes consumed.
func (r *journalReader) read(pos uint64, dst []Reading, maxReadings, maxBytes int) ([]Reading, uint64, int, error) {
	consumed := 0
	for {
		start, end, next, active := r.j.span(pos)
		if pos < start {
			pos = start
		}
		if pos >= end {
			if active || next == 0 {
				return dst, pos, consumed, nil
			}
			pos = next
			continue
		}
		if r.f == nil || r.fstart != start {
			r.close()
			f, err := os.Open(filepath.Join(r.j.dir, segmentName(start)))
			if err != nil {
				return dst, pos, consumed, fmt.Errorf("open journal segment: %w", err)
			}
			r.f, r.fstart = f, start
		}
		want := int(min(end-pos, uint64(cap(r.buf))))
		b := r.buf[:want]
		if _, err := r.f.ReadAt(b, int64(pos-start)); err != nil {
			return dst, pos, consumed, fmt.Errorf("read journal segment %s: %w", segmentName(start), err)
		}
		off := 0
		for off < len(b) {
			n, err := recordLen(b[off:])
			if err != nil {
				// Damage appeared after recovery (a failing disk): skip the rest of
				// this segment rather than stall the sink forever.
				r.j.log.Error("journal: damaged record while reading; skipping the rest of the segment",
					"segment", segmentName(start), "offset", pos-start+uint64(off), "err", err)
				if active {
					return dst, pos, consumed, err
				}
				return dst, next, consumed + int(end-pos), nil
			}
			if n == 0 {
				break
			}
			dst, err = decodeRecord(dst, b[off+headerSize:off+n], pos+uint64(off), r.in)
			if err != nil {
				return dst, pos, consumed, err
			}
			off += n
			if len(dst) >= maxReadings || (maxBytes > 0 && consumed+off >= maxBytes) {
				break
			}
		}
		if off == 0 {
			// A record larger than the buffer: grow it and read again.
			need, _ := peekLen(b)
			if need <= cap(r.buf) {
				return dst, pos, consumed, fmt.Errorf("%w: record at %d does not fit its segment", errCorrupt, pos)
			}
			r.buf = make([]byte, 0, need)
			continue
		}
		pos += uint64(off)
		consumed += off
		if len(dst) >= maxReadings || (maxBytes > 0 && consumed >= maxBytes) {
			return dst, pos, consumed, nil
		}
	}
}

func peekLen(b []byte) (int, bool) {
	if len(b) < headerSize {
		return headerSize, false
	}
	return headerSize + int(uint32(b[4])|uint32(b[5])<<8|uint32(b[6])<<16|uint32(b[7])<<24), true
}
