package rules

import (
	"math"
	"time"
)

// baselineState and baselineRate are the alert state and the rate rule's window as it was before
// RateWindow (commit ec58f97, rules/eval.go): every point of the window kept,
// up to 1,024, by arrival time, and the whole window scanned for its extreme
// on every reading. Kept here only as the baseline that BenchmarkRate and
// BenchmarkStateSnapshot measure the new window against in the same run.
type baselineState struct {
	Phase        Phase       `json:"phase"`
	Bad          bool        `json:"bad"`
	ChangedAt    time.Time   `json:"changed_at"`
	ActiveAt     time.Time   `json:"active_at"`
	FiredAt      time.Time   `json:"fired_at"`
	ResolvedAt   time.Time   `json:"resolved_at"`
	LastNotified time.Time   `json:"last_notified"`
	Value        float64     `json:"value"`
	Delta        float64     `json:"delta"`
	Flips        []time.Time `json:"flips,omitempty"`
	Flapping     bool        `json:"flapping"`
	Window       []Point     `json:"window,omitempty"`
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
