package cluster

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/citypulse/citypulse/pipeline"
)

// Dedupe is what a new owner of a partition runs its readings through: after a
// hand-over, batches the old owner handled but did not acknowledge come again,
// and may come after newer ones. Filter drops a reading whose (device, metric,
// reading time) it has passed on before, and sorts each device's readings by
// time.
//
// Memory is bounded: per device the last Window (metric, time) keys, for at
// most MaxDevices devices (the least recently seen half is forgotten when
// full). A duplicate older than that window passes (the stores absorb an
// identical sample); order is restored within what one Filter call holds,
// which is why the owner hands the first batches after a gain over together,
// sorted by stream sequence (cluster.settle). A reading older than one already
// passed on for its device is still passed on, and counted as late.
//
// A Dedupe is not safe for concurrent use: one per partition, or one per node
// behind the owner's per-partition handler calls with a lock.
type Dedupe struct {
	window     int
	maxDevices int
	cur, prev  map[string]*deviceKeys
	m          *Metrics
}

type readingKey struct {
	time   int64
	metric string
}

// deviceKeys is a ring of a device's last keys and its newest time.
type deviceKeys struct {
	keys   []readingKey
	next   int
	newest int64
}

// NewDedupe returns a filter remembering window keys per device for at most
// maxDevices devices; drops and late readings are counted in m.
func NewDedupe(window, maxDevices int, m *Metrics) (*Dedupe, error) {
	if window < 1 || maxDevices < 2 {
		return nil, fmt.Errorf("dedupe window must be >= 1 and devices >= 2, got %d and %d", window, maxDevices)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Dedupe{window: window, maxDevices: maxDevices, cur: map[string]*deviceKeys{}, m: m}, nil
}

// Filter returns rs without duplicates, each device's readings in time order
// (readings of one device at one time keep their order). It reorders rs in
// place and returns a prefix of it.
func (d *Dedupe) Filter(rs []pipeline.Reading) []pipeline.Reading {
	slices.SortStableFunc(rs, func(a, b pipeline.Reading) int {
		return cmp.Or(cmp.Compare(a.Device, b.Device), cmp.Compare(a.Time, b.Time))
	})
	out := rs[:0]
	var dk *deviceKeys
	for i := range rs {
		r := rs[i]
		if i == 0 || r.Device != rs[i-1].Device {
			dk = d.device(r.Device)
		}
		k := readingKey{r.Time, r.Metric}
		if dk.has(k) {
			d.m.duplicates.Inc()
			continue
		}
		if r.Time < dk.newest {
			d.m.late.Inc()
		}
		dk.add(k, d.window)
		out = append(out, r)
	}
	return out
}

func (d *Dedupe) device(id string) *deviceKeys {
	if dk, ok := d.cur[id]; ok {
		return dk
	}
	dk, ok := d.prev[id]
	if !ok {
		dk = &deviceKeys{newest: -1 << 63}
	}
	if len(d.cur) >= d.maxDevices/2 {
		d.prev, d.cur = d.cur, make(map[string]*deviceKeys, len(d.cur))
	}
	d.cur[id] = dk
	return dk
}

func (dk *deviceKeys) has(k readingKey) bool {
	return slices.Contains(dk.keys, k)
}

func (dk *deviceKeys) add(k readingKey, window int) {
	if len(dk.keys) < window {
		dk.keys = append(dk.keys, k)
	} else {
		dk.keys[dk.next] = k
		dk.next = (dk.next + 1) % window
	}
	dk.newest = max(dk.newest, k.time)
}
