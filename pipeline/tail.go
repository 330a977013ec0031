package pipeline

import (
	"sort"
	"sync"
)

// tail holds a shard's newest journal records in memory, as the readings
// they decode to, so that a sink worker that keeps up takes its batch from
// here instead of reading the journal back (a pread and a decode per record,
// per sink). The journal stays the only truth: the shard loop pushes a record
// only after its write succeeded, a worker whose position is outside the
// span held (catching up after an outage, or after a restart: the tail starts
// empty) reads the journal as before, and a sink's cursor still moves only
// after its write succeeded.
//
// It covers one contiguous span of positions [start, end), the newest
// records, within a fixed capacity of readings (evicting the oldest).
type tail struct {
	mu         sync.Mutex
	rs         []Reading // ring of readings; a record's are consecutive (mod len)
	recs       []tailRec // ring of records, oldest at head
	head, n    int       // records ring
	used, next int       // readings held; index of the next reading's slot
	start, end uint64    // positions covered (n > 0)
}

type tailRec struct {
	pos, end uint64 // the record's journal position and the position after it
	at, n    int    // index of its first reading in rs, and its readings
}

// newTail holds up to capacity readings (and as many records).
func newTail(capacity int) *tail {
	return &tail{rs: make([]Reading, capacity), recs: make([]tailRec, capacity)}
}

// push adds the record at [pos, end) holding rs, as decodeRecord would give
// it back (device, kind, district and received time of the first reading;
// Seq = pos). A record that does not follow the span held, or larger than the
// capacity, starts the span over.
func (t *tail) push(rs []Reading, pos, end uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.add(rs, pos, end)
}

// pushAll pushes a group commit's records, written from base to end, under
// one lock.
func (t *tail) pushAll(batch []*request, base, end uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, r := range batch {
		recEnd := end
		if i+1 < len(batch) {
			recEnd = batch[i+1].rs[0].Seq
		}
		t.add(r.rs, r.rs[0].Seq, recEnd)
	}
}

// add is push with t.mu held.
func (t *tail) add(rs []Reading, pos, end uint64) {
	if len(rs) == 0 || len(rs) > len(t.rs) || t.n > 0 && pos != t.end {
		t.head, t.n, t.used = 0, 0, 0
		if len(rs) == 0 || len(rs) > len(t.rs) {
			return
		}
	}
	for t.n > 0 && (t.used+len(rs) > len(t.rs) || t.n == len(t.recs)) {
		t.used -= t.recs[t.head].n
		t.head = (t.head + 1) % len(t.recs)
		t.n--
		t.start = t.recs[t.head].pos
	}
	if t.n == 0 {
		t.start = pos
	}
	first := rs[0]
	at := t.next
	for i := range rs {
		r := &t.rs[(at+i)%len(t.rs)]
		*r = rs[i]
		r.Device, r.Kind, r.District, r.Received, r.Seq = first.Device, first.Kind, first.District, first.Received, pos
	}
	t.next = (at + len(rs)) % len(t.rs)
	t.recs[(t.head+t.n)%len(t.recs)] = tailRec{pos: pos, end: end, at: at, n: len(rs)}
	t.n++
	t.used += len(rs)
	t.end = end
}

// read is journalReader.read from memory: it appends the readings of the
// whole records from pos onwards to dst, up to maxReadings (at least one
// record) and maxBytes of records, and returns the position after the last
// record and the journal bytes they take. ok is false when pos is not a
// record the tail holds: read the journal instead.
func (t *tail) read(pos uint64, dst []Reading, maxReadings, maxBytes int) (_ []Reading, next uint64, consumed int, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n == 0 || pos < t.start || pos >= t.end {
		return dst, pos, 0, false
	}
	rec := func(k int) *tailRec { return &t.recs[(t.head+k)%len(t.recs)] }
	k := sort.Search(t.n, func(k int) bool { return rec(k).pos >= pos })
	if k == t.n || rec(k).pos != pos {
		return dst, pos, 0, false // not a record boundary: let the journal say why
	}
	for ; k < t.n; k++ {
		r := rec(k)
		for i := range r.n {
			dst = append(dst, t.rs[(r.at+i)%len(t.rs)])
		}
		consumed += int(r.end - r.pos)
		pos = r.end
		if len(dst) >= maxReadings || (maxBytes > 0 && consumed >= maxBytes) {
			break
		}
	}
	return dst, pos, consumed, true
}
