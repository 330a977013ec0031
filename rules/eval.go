package rules

import (
	"math"
	"slices"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// Phase is where an alert is in its lifecycle.
type Phase int

// Phases: inactive → pending (condition true, waiting for `for`) → firing →
// (condition false for `clear_for`) → resolved, which is inactive again.
const (
	Inactive Phase = iota
	Pending
	Firing
)

func (p Phase) String() string {
	switch p {
	case Pending:
		return "pending"
	case Firing:
		return "firing"
	}
	return "inactive"
}

// Transition kinds: what the operations centre is told.
const (
	NotifyFiring   = "firing"
	NotifyResolved = "resolved"
	NotifyRepeat   = "repeat"   // still firing, re-notified after repeat_interval
	NotifyFlapping = "flapping" // too many transitions: one notice instead of a storm
)

// Flapping detection: more than FlapMax firing/resolved transitions within
// FlapWindow turn an alert into one "flapping" notice; it is quiet until it has
// been stable for FlapWindow.
type FlapPolicy struct {
	Window time.Duration
	Max    int
}

// State is one alert's state: per rule and series (device and metric), or per
// district for fleet rules. It is plain data: persisted and restored as is.
type State struct {
	// Zero fields are left out of the snapshot: it is written every 5 s with
	// every alert, and reads back the same.
	Phase        Phase       `json:"phase,omitzero"`
	Bad          bool        `json:"bad,omitzero"`        // the condition holds (after hysteresis)
	ChangedAt    time.Time   `json:"changed_at,omitzero"` // when Bad last changed
	ActiveAt     time.Time   `json:"active_at,omitzero"`  // when it went pending
	FiredAt      time.Time   `json:"fired_at,omitzero"`   // startsAt of the firing alert
	ResolvedAt   time.Time   `json:"resolved_at,omitzero"`
	LastNotified time.Time   `json:"last_notified,omitzero"`
	Value        float64     `json:"value,omitzero"`
	Delta        float64     `json:"delta,omitzero"`
	Flips        []time.Time `json:"flips,omitempty"`
	Flapping     bool        `json:"flapping,omitzero"`
	// Rate is a rate rule's window: bounded (RateBuckets+1 extremes at most).
	Rate RateWindow `json:"rate,omitzero"`
	// LegacyWindow is a rate rule's window as snapshots before RateWindow
	// kept it (every point, up to 1,024); read from such a snapshot, it is
	// folded into Rate at the series' next reading.
	LegacyWindow []Point `json:"window,omitempty"`
}

// clone returns a copy of s that shares no memory with it: the snapshot
// encodes its copies after releasing the shard lock, while the shard loop goes
// on changing the states (a rate window's ring is rewritten in place).
func (s *State) clone() State {
	c := *s
	c.Flips = slices.Clone(s.Flips)
	c.LegacyWindow = slices.Clone(s.LegacyWindow)
	c.Rate.buf = slices.Clone(s.Rate.buf)
	return c
}

// Point is a sample of a LegacyWindow.
type Point struct {
	T time.Time `json:"t"`
	V float64   `json:"v"`
}

// Transition is a notification-worthy change of an alert.
type Transition struct {
	Kind string
	At   time.Time
}

// condition decides, for threshold, rate and state rules, whether a value
// measured at t (the reading's own time) is bad, given whether it was bad
// before (hysteresis). It also returns the delta for rate rules.
func (r *Rule) condition(s *State, v float64, t time.Time) (bad bool, delta float64) {
	switch r.Type {
	case TypeThreshold:
		switch {
		case r.Above != nil:
			clear := *r.Above
			if r.Clear != nil {
				clear = *r.Clear
			}
			if s.Bad {
				return !(v < clear), 0
			}
			return v > *r.Above, 0
		case r.Below != nil:
			clear := *r.Below
			if r.Clear != nil {
				clear = *r.Clear
			}
			if s.Bad {
				return !(v > clear), 0
			}
			return v < *r.Below, 0
		default:
			lo, hi := r.Outside[0], r.Outside[1]
			if s.Bad {
				if r.ClearIn != nil {
					lo, hi = r.ClearIn[0], r.ClearIn[1]
				}
				return v < lo || v > hi, 0
			}
			return v < lo || v > hi, 0
		}
	case TypeRate:
		return r.rate(s, v, t)
	case TypeState:
		if v != r.stateIdx {
			return false, 0
		}
		if r.OutsideHours != nil && inHours(t.Local().Hour(), r.OutsideHours[0], r.OutsideHours[1]) {
			return false, 0 // e.g. flashing is normal at night
		}
		return true, 0
	}
	return false, 0
}

// measuredAt is when a reading was measured (its arrival if it has no time).
func measuredAt(r *pipeline.Reading) time.Time {
	if r.Time == 0 {
		return time.Unix(0, r.Received)
	}
	return time.Unix(0, r.Time)
}

// rate keeps v in the rule's window by its time t and compares it with the
// window's extreme. A late reading (measured before the newest bucket) goes
// into the window for the readings after it but leaves the verdict as it was:
// the alert follows the series' newest reading. A value that is not finite is
// kept out of the window (the gateways refuse those).
func (r *Rule) rate(s *State, v float64, t time.Time) (bad bool, delta float64) {
	width, maxima := bucketWidth(r.Window), r.Drop != nil
	if s.LegacyWindow != nil {
		for _, p := range s.LegacyWindow {
			s.Rate.observe(width, maxima, p.T.UnixNano(), p.V)
		}
		s.LegacyWindow = nil
	}
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return s.Bad, s.Delta
	}
	ext, newest := s.Rate.observe(width, maxima, t.UnixNano(), v)
	if !newest {
		return s.Bad, s.Delta
	}
	if maxima {
		return ext-v > *r.Drop, ext - v
	}
	return v-ext > *r.Rise, v - ext
}

// inHours reports whether hour h lies in [from, to), wrapping at midnight.
func inHours(h, from, to int) bool {
	if from <= to {
		return h >= from && h < to
	}
	return h >= from || h < to
}

// Step applies a new truth of the condition at time t and advances the
// lifecycle; it returns the transitions to notify.
func (s *State) Step(r *Rule, bad bool, t time.Time, flap FlapPolicy) []Transition {
	if bad != s.Bad {
		s.Bad = bad
		s.ChangedAt = t
	}
	return s.Advance(r, t, flap)
}

// Advance moves the lifecycle on with time alone (hold-off and clear timers,
// repeats, the end of flapping); the tick calls it.
func (s *State) Advance(r *Rule, now time.Time, flap FlapPolicy) []Transition {
	var out []Transition
	switch s.Phase {
	case Inactive:
		if !s.Bad {
			break
		}
		s.Phase = Pending
		s.ActiveAt = s.ChangedAt
		fallthrough
	case Pending:
		switch {
		case !s.Bad:
			s.Phase = Inactive // a blip shorter than `for`: never notified
		case now.Sub(s.ChangedAt) >= r.For:
			s.Phase = Firing
			s.FiredAt = now
			s.ResolvedAt = time.Time{}
			out = s.flip(out, NotifyFiring, now, flap)
		}
	case Firing:
		switch {
		case !s.Bad && now.Sub(s.ChangedAt) >= r.ClearFor:
			s.Phase = Inactive
			s.ResolvedAt = now
			out = s.flip(out, NotifyResolved, now, flap)
		case s.Bad && !s.Flapping && r.RepeatInterval > 0 && now.Sub(s.LastNotified) >= r.RepeatInterval:
			s.LastNotified = now
			out = append(out, Transition{Kind: NotifyRepeat, At: now})
		}
	}
	// The end of flapping: stable for a whole window.
	if s.Flapping && (len(s.Flips) == 0 || now.Sub(s.Flips[len(s.Flips)-1]) >= flap.Window) {
		s.Flapping = false
		s.Flips = nil
		s.LastNotified = now
		if s.Phase == Firing {
			out = append(out, Transition{Kind: NotifyFiring, At: now})
		} else {
			out = append(out, Transition{Kind: NotifyResolved, At: now})
		}
	}
	return out
}

// flip records a firing/resolved transition and turns a storm of them into
// one flapping notice.
func (s *State) flip(out []Transition, kind string, now time.Time, flap FlapPolicy) []Transition {
	if flap.Max > 0 {
		cut := now.Add(-flap.Window)
		i := 0
		for i < len(s.Flips) && s.Flips[i].Before(cut) {
			i++
		}
		s.Flips = append(s.Flips[i:], now)
		// More than Max+1 recent flips say no more than Max+1 do (flapping),
		// and the end of flapping looks at the last one only: the state
		// stays bounded however fast the alert flaps.
		if len(s.Flips) > flap.Max+1 {
			s.Flips = s.Flips[len(s.Flips)-flap.Max-1:] // never rewritten in place: see clone
		}
	}
	if s.Flapping {
		return out // quiet until stable
	}
	s.LastNotified = now
	if flap.Max > 0 && len(s.Flips) > flap.Max {
		s.Flapping = true
		return append(out, Transition{Kind: NotifyFlapping, At: now})
	}
	return append(out, Transition{Kind: kind, At: now})
}
