package rules

import (
	"math"
	"time"
)

// baselineState and baselineRate are the rate rule's window as it was before
// RateWindow (commit ec58f97, rules/eval.go): every point of the window kept,
// up to 1,024, by arrival time, and the whole window scanned for its extreme
// on every reading. Kept here only as the baseline that BenchmarkRate and
// BenchmarkStateSnapshot measure the new window against in the same run.
type baselineState struct {
	State
	Window []Point `json:"window,omitempty"`
}

func baselineRate(r *Rule, s *baselineState, v float64, t time.Time) (bad bool, delta float64) {
	cut := t.Add(-r.Window)
	i := 0
	for i < len(s.Window) && s.Window[i].T.Before(cut) {
		i++
	}
	s.Window = append(s.Window[i:], Point{T: t, V: v})
	if len(s.Window) > 1024 {
		s.Window = s.Window[len(s.Window)-1024:]
	}
	hi, lo := math.Inf(-1), math.Inf(1)
	for _, p := range s.Window {
		hi = math.Max(hi, p.V)
		lo = math.Min(lo, p.V)
	}
	if r.Drop != nil {
		return hi-v > *r.Drop, hi - v
	}
	return v-lo > *r.Rise, v - lo
}
