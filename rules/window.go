package rules

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
)

// RateBuckets is how many buckets a rate rule's window is cut into. The
// window is kept by the readings' own time (when the device measured them,
// not when they arrived), in buckets of Window/RateBuckets (1 s for a 60 s
// window): a drop is judged against the highest value of the buckets that
// overlap [t-window, t], so the span looked back over is between the window
// and the window plus one bucket. That is the precision given up for a state
// of bounded size: at most RateBuckets+1 extremes per alert, whatever the
// reading rate (it was every point, up to 1,024, before).
const RateBuckets = 60

// RateWindow is a rate rule's window: a monotonic deque of per-bucket
// extremes (the highest value of a bucket for a drop rule, the lowest for a
// rise rule), oldest bucket first, each strictly more extreme than every
// later one. A bucket's extreme is dropped as soon as a later bucket equals
// or passes it (it can never be the window's extreme again), and when it
// leaves the window; the front is the window's extreme. A reading in the
// newest bucket costs O(1) amortised; a late one (an earlier bucket) is
// folded in with a scan of the deque, which holds at most RateBuckets+1
// entries.
//
// It is persisted with the alert state as {"w": bucket width in ns, "hi":
// maxima or minima, "q": [[bucket index, extreme], [distance to the previous
// bucket, extreme], ...]}, a bucket's index being the unix time in ns divided
// by the width, rounded down.
type RateWindow struct {
	width  int64    // bucket width in ns; 0: never used
	maxima bool     // the extremes are maxima (a drop rule), else minima
	buf    []Bucket // ring: len a power of two, or nil
	head   int      // index in buf of the front
	n      int      // entries
}

// Bucket is one entry of a RateWindow: a bucket's index and extreme.
type Bucket struct {
	K int64
	V float64
}

// IsZero reports whether the window holds nothing (omitted from the state).
func (w RateWindow) IsZero() bool { return w.n == 0 }

// Len returns the number of buckets kept.
func (w *RateWindow) Len() int { return w.n }

// Buckets returns the kept buckets, oldest first.
func (w *RateWindow) Buckets() []Bucket {
	out := make([]Bucket, w.n)
	for i := range out {
		out[i] = w.at(i)
	}
	return out
}

func (w *RateWindow) at(i int) Bucket { return w.buf[(w.head+i)&(len(w.buf)-1)] }
func (w *RateWindow) back() *Bucket   { return &w.buf[(w.head+w.n-1)&(len(w.buf)-1)] }
func (w *RateWindow) popFront()       { w.head = (w.head + 1) & (len(w.buf) - 1); w.n-- }
func (w *RateWindow) popBack()        { w.n-- }
func (w *RateWindow) set(q []Bucket)  { w.buf, w.head, w.n = nil, 0, 0; w.pushAll(q) }
func (w *RateWindow) pushAll(q []Bucket) {
	for _, b := range q {
		w.pushBack(b)
	}
}

func (w *RateWindow) pushBack(b Bucket) {
	if w.n == len(w.buf) {
		grown := make([]Bucket, max(4, 2*len(w.buf)))
		for i := 0; i < w.n; i++ {
			grown[i] = w.at(i)
		}
		w.buf, w.head = grown, 0
	}
	w.buf[(w.head+w.n)&(len(w.buf)-1)] = b
	w.n++
}

// bucketWidth returns the bucket width for a window: RateBuckets of them
// cover at least the whole window.
func bucketWidth(window time.Duration) int64 {
	n := int64(RateBuckets)
	return max(1, (int64(window)+n-1)/n)
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// more reports whether a is more extreme than b: higher for a drop rule
// (the window keeps maxima), lower for a rise rule (minima).
func more(maxima bool, a, b float64) bool {
	if maxima {
		return a > b
	}
	return a < b
}

// observe adds value v measured at t (unix ns) and returns the window's
// extreme and whether the reading is in the newest bucket (or later). A late
// reading (an earlier bucket, still inside the window) is folded in for the
// readings after it; one older than the window is dropped. width is the
// rule's bucket width; a window kept with another width (the rule was
// reloaded with a new window) is rescaled first.
func (w *RateWindow) observe(width int64, maxima bool, t int64, v float64) (extreme float64, newest bool) {
	if w.maxima != maxima {
		w.width, w.maxima = 0, maxima // the rule turned from drop to rise or back
	}
	if w.width != width {
		w.rescale(width)
	}
	k := floorDiv(t, width)
	if w.n > 0 && k < w.back().K {
		w.late(maxima, k, v)
		return w.at(0).V, false
	}
	// Expire the buckets that left the window [k-RateBuckets, k].
	for w.n > 0 && w.at(0).K < k-RateBuckets {
		w.popFront()
	}
	// Drop the buckets this value equals or passes (its own bucket's too,
	// if less extreme), then append it.
	for w.n > 0 && !more(maxima, w.back().V, v) {
		w.popBack()
	}
	if w.n == 0 || w.back().K != k {
		w.pushBack(Bucket{K: k, V: v})
	}
	return w.at(0).V, true
}

// late folds a value of an earlier bucket k into the deque (O(deque)).
func (w *RateWindow) late(maxima bool, k int64, v float64) {
	q := w.Buckets()
	if k < q[len(q)-1].K-RateBuckets {
		return // older than the window: it can never be its extreme
	}
	j := 0 // where bucket k goes (the deque is ordered by bucket)
	for j < len(q) && q[j].K < k {
		j++
	}
	// The first bucket at or after k is the most extreme of them: if it is
	// at least as extreme as v, v can never be the window's extreme.
	if j < len(q) && !more(maxima, v, q[j].V) {
		return
	}
	// v stays; the earlier buckets it equals or passes go (they are the
	// tail of q[:j]: the deque is ordered by extremeness too).
	keep := 0
	for keep < j && more(maxima, q[keep].V, v) {
		keep++
	}
	rest := q[j:]
	if len(rest) > 0 && rest[0].K == k {
		rest = rest[1:]
	}
	w.set(append(append(q[:keep:keep], Bucket{K: k, V: v}), rest...))
}

// rescale converts the window to another bucket width (a rule reloaded with
// a new window): each bucket goes into the bucket of the new width that holds
// its start; where several land in one, the first (the most extreme) stays.
func (w *RateWindow) rescale(width int64) {
	old, q := w.width, w.Buckets()
	w.width = width
	if old == 0 {
		w.set(nil)
		return
	}
	out := q[:0]
	for _, b := range q {
		nk := floorDiv(b.K*old, width) // the bucket's start in unix ns: no overflow
		if n := len(out); n > 0 && out[n-1].K == nk {
			continue
		}
		out = append(out, Bucket{K: nk, V: b.V})
	}
	w.set(out)
}

type rateWindowJSON struct {
	W  int64        `json:"w"`
	Hi bool         `json:"hi"`
	Q  [][2]float64 `json:"q"`
}

// MarshalJSON writes {"w": width, "hi": maxima, "q": [[k, v], [dk, v], ...]}:
// the first bucket's index, then each next one's distance from the one
// before (1 to 61: a digit or two rather than ten).
func (w RateWindow) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 32+16*w.n)
	b = append(b, `{"w":`...)
	b = strconv.AppendInt(b, w.width, 10)
	b = append(b, `,"hi":`...)
	b = strconv.AppendBool(b, w.maxima)
	b = append(b, `,"q":[`...)
	var prev int64
	for i := 0; i < w.n; i++ {
		bk := w.at(i)
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '[')
		b = strconv.AppendInt(b, bk.K-prev, 10)
		b = append(b, ',')
		b = strconv.AppendFloat(b, bk.V, 'g', -1, 64) // finite: observe keeps NaN and ±Inf out
		b = append(b, ']')
		prev = bk.K
	}
	return append(b, "]}"...), nil
}

// UnmarshalJSON reads what MarshalJSON wrote. A deque that breaks its order
// is refused: the state is then reported damaged rather than misjudged.
func (w *RateWindow) UnmarshalJSON(b []byte) error {
	var j rateWindowJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	if j.W < 0 {
		return fmt.Errorf("rate window: negative bucket width %d", j.W)
	}
	if len(j.Q) > RateBuckets+1 {
		return fmt.Errorf("rate window: %d buckets, at most %d", len(j.Q), RateBuckets+1)
	}
	q := make([]Bucket, 0, len(j.Q))
	var k int64
	for i, p := range j.Q {
		d := p[0]
		if d != math.Trunc(d) || math.Abs(d) > 1<<53 {
			return fmt.Errorf("rate window: bucket index %v is not an integer", d)
		}
		if i > 0 && (d < 1 || !more(j.Hi, q[i-1].V, p[1])) {
			return errors.New("rate window: buckets out of order")
		}
		k += int64(d)
		q = append(q, Bucket{K: k, V: p[1]})
	}
	w.width, w.maxima = j.W, j.Hi
	w.set(q)
	return nil
}
