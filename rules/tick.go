package rules

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Tick advances every alert with time alone and evaluates deadman and fleet
// rules. It holds every shard's lock while it runs.
func (e *Engine) Tick(now time.Time) {
	rules := e.Rules()
	var deadman, fleet []*Rule
	for _, r := range rules {
		switch r.Type {
		case TypeDeadman:
			deadman = append(deadman, r)
		case TypeFleet:
			fleet = append(fleet, r)
		}
	}
	var list []devices.Device
	if len(deadman)+len(fleet) > 0 && e.devs != nil {
		list = e.devs.List()
	}
	for _, s := range e.shards {
		s.mu.Lock()
	}
	defer func() {
		for _, s := range e.shards {
			s.mu.Unlock()
		}
	}()
	for _, r := range deadman {
		e.tickDeadman(r, list, now)
	}
	for _, r := range fleet {
		e.tickFleet(r, list, now)
	}
	e.advance(rules, now)
}

// silentFor returns how long device d has been silent at now and whether it
// has reported at all since it is known (since the start, or in the saved
// state). The caller holds the shard locks.
func (e *Engine) silentFor(d devices.Device, now time.Time) (time.Duration, bool) {
	last, ok := e.shardFor(d.ID).lastSeen[d.ID]
	if !ok {
		// Never heard from: silent since the start, which gives it the
		// same chance to report as any other device.
		if e.started.IsZero() {
			return 0, false
		}
		return now.Sub(e.started), false
	}
	return now.Sub(last), true
}

// isSilent reports whether d has been silent for more than factor × its interval.
func (e *Engine) isSilent(d devices.Device, factor float64, now time.Time) bool {
	silence, _ := e.silentFor(d, now)
	return silence > time.Duration(factor*float64(d.Interval))
}

// tickDeadman raises or resolves rule r's alert of every selected device.
func (e *Engine) tickDeadman(r *Rule, list []devices.Device, now time.Time) {
	for _, d := range list {
		if !r.Select.Matches(string(d.Kind), "", d.District, d.ID) || !e.owned(d.ID) {
			continue
		}
		silent := e.isSilent(d, r.Factor, now)
		s := e.shardFor(d.ID)
		k := alertKey{Rule: r.Name, Device: d.ID, District: d.District, Kind: string(d.Kind)}
		a := s.alertToStep(k, silent)
		if a == nil {
			continue
		}
		silence, _ := e.silentFor(d, now)
		a.state.Value = silence.Seconds()
		e.emit(s, a, r, a.state.Step(r, silent, now, e.flap))
	}
}

// tickFleet raises or resolves fleet rule r's alert of every district.
func (e *Engine) tickFleet(r *Rule, list []devices.Device, now time.Time) {
	type agg struct{ total, silent int }
	groups := map[string]*agg{}
	for _, d := range list {
		// In cluster mode only the owned devices' silence is known here: the
		// ratio is over them (see SetOwns).
		if !r.Select.Matches(string(d.Kind), "", d.District, d.ID) || !e.owned(d.ID) {
			continue
		}
		g := groups[d.District]
		if g == nil {
			g = &agg{}
			groups[d.District] = g
		}
		g.total++
		if e.isSilent(d, r.Factor, now) {
			g.silent++
		}
	}
	for district, g := range groups {
		if !e.owned(district) {
			continue
		}
		s := e.shardFor(district)
		k := alertKey{Rule: r.Name, District: district, Kind: r.Select.Kind}
		ratio := float64(g.silent) / float64(g.total)
		bad := ratio > r.SilentRatio
		a := s.alertToStep(k, bad)
		if a == nil {
			continue
		}
		a.state.Value = ratio
		e.emit(s, a, r, a.state.Step(r, bad, now, e.flap))
	}
}

// advance moves the alerts of reading-driven rules on with time (hold-off
// and clear timers, repeats, the end of flapping).
func (e *Engine) advance(rules []*Rule, now time.Time) {
	byName := make(map[string]*Rule, len(rules))
	for _, r := range rules {
		byName[r.Name] = r
	}
	for _, s := range e.shards {
		for k, a := range s.alerts {
			r := byName[k.Rule]
			if r == nil || r.Type == TypeDeadman || r.Type == TypeFleet {
				continue
			}
			e.emit(s, a, r, a.state.Advance(r, now, e.flap))
		}
	}
}

// alertToStep returns the alert of k, created when the condition is bad; nil
// when there is none and nothing is wrong (nothing to step). The caller holds
// s.mu.
func (s *ruleShard) alertToStep(k alertKey, bad bool) *alert {
	a := s.alerts[k]
	if a == nil && bad {
		a = &alert{key: k}
		s.alerts[k] = a
	}
	return a
}
