// Package bymetric finds one device's per-metric entries by metric name on
// the per-reading paths (the rules' series cache, the vital signs' latest
// values, the TSDB's series cache). A device sends its metrics in one order,
// so the entry after the last one found is tried first, then a short list
// is scanned, or, past ShortList metrics, a map is used: a reading hashes no
// (device, metric) key. It does no locking: its user does.
package bymetric

// ShortList is how many metrics are scanned; a device with more (a
// district's roll-ups) has them in a map too.
const ShortList = 16

// List is one device's entries, by metric, in the order they were added.
type List[T any] struct {
	names []string
	vals  []T
	next  int            // where the next metric is looked for first
	index map[string]int // beyond ShortList metrics
}

// Find returns metric's entry.
func (l *List[T]) Find(metric string) (T, bool) {
	j := l.indexOf(metric)
	if j < 0 {
		var zero T
		return zero, false
	}
	l.next = j + 1
	return l.vals[j], true
}

func (l *List[T]) indexOf(metric string) int {
	if j := l.next; j < len(l.names) && l.names[j] == metric {
		return j
	}
	if l.next == len(l.names) && len(l.names) > 0 && l.names[0] == metric {
		return 0
	}
	if l.index != nil {
		if j, ok := l.index[metric]; ok {
			return j
		}
		return -1
	}
	for j, m := range l.names {
		if m == metric {
			return j
		}
	}
	return -1
}

// Add appends metric's entry; metric must not have one.
func (l *List[T]) Add(metric string, v T) {
	j := len(l.names)
	l.names, l.vals = append(l.names, metric), append(l.vals, v)
	l.next = j + 1
	if len(l.names) <= ShortList {
		return
	}
	if l.index == nil {
		l.index = make(map[string]int, 2*len(l.names))
		for i, m := range l.names {
			l.index[m] = i
		}
	}
	l.index[metric] = j
}

// Set sets metric's entry, added if new.
func (l *List[T]) Set(metric string, v T) {
	if j := l.indexOf(metric); j >= 0 {
		l.vals[j], l.next = v, j+1
		return
	}
	l.Add(metric, v)
}

// Len returns how many metrics have entries.
func (l *List[T]) Len() int { return len(l.names) }

// All calls f with each metric and its entry, in the order they were added.
func (l *List[T]) All(f func(metric string, v T)) {
	for j, m := range l.names {
		f(m, l.vals[j])
	}
}
