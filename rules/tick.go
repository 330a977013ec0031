package rules

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Tick advances every alert with time alone and evaluates deadman rules, and
// fleet rules on one machine (in cluster mode the elected node judges them:
// see fleet.go). It holds every shard's lock while it runs.
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
	e.lockAll()
	defer e.unlockAll()
	if len(deadman)+len(fleet) > 0 {
		e.noteListed(list, now)
	}
	for _, r := range deadman {
		e.tickDeadman(r, list, now)
	}
	if e.owns.Load() == nil { // cluster mode: JudgeFleet, on every node's counts
		for _, r := range fleet {
			e.tickFleet(r, list, now)
		}
	}
	e.advance(rules, now)
}

// noteListed records when the tick first listed each device never heard
// from: the devices of the first tick count from the engine's start, those
// added later from the tick that first sees them. It keeps only the devices
// still listed and still silent, so the record cannot grow past the fleet.
// The caller holds the shard locks.
func (e *Engine) noteListed(list []devices.Device, now time.Time) {
	since := now
	if !e.ticked {
		since, e.ticked = e.started, true
	}
	next := make([]map[string]time.Time, len(e.shards))
	for i, s := range e.shards {
		next[i] = make(map[string]time.Time, len(s.listed))
	}
	for _, d := range list {
		i := e.shardOf(d.ID)
		s := e.shards[i]
		if _, seen := s.lastSeen[d.ID]; seen {
			continue
		}
		t, ok := s.listed[d.ID]
		if !ok {
			t = since
		}
		next[i][d.ID] = t
	}
	for i, s := range e.shards {
		s.listed = next[i]
	}
}

// silentFor returns how long device d has been silent at now and whether it
// has reported at all since it is known (since the start, or in the saved
// state). The caller holds the shard locks.
func (e *Engine) silentFor(d devices.Device, now time.Time) (time.Duration, bool) {
	s := e.shardFor(d.ID)
	last, ok := s.lastSeen[d.ID]
	if !ok {
		// Never heard from: silent since the start, or since the tick
		// that first listed it if it was added later, which gives it the
		// same chance to report as any other device.
		if e.started.IsZero() {
			return 0, false
		}
		since := e.started
		if t := s.listed[d.ID]; t.After(since) {
			since = t
		}
		return now.Sub(since), false
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
		s.ver++
	}
	return a
}
