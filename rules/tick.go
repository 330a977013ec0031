package rules

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Tick advances every alert with time alone and evaluates deadman rules, and
// fleet rules on one machine (in cluster mode the elected node judges them:
// see fleet.go). It takes the shards' locks one at a time, so a shard loop
// waits for its own shard's part of the tick only. Run calls it; it is not
// safe to call from two goroutines at once.
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
	if len(deadman)+len(fleet) > 0 {
		var list []devices.Device
		if e.devs != nil {
			list = e.devs.List()
		}
		if e.owns.Load() != nil {
			fleet = nil // cluster mode: JudgeFleet, on every node's counts
		}
		e.tickDevices(list, deadman, fleet, now)
	}
	e.advance(rules, now)
}

// tickDevices walks the fleet shard by shard, under that shard's lock: it
// finds each device's silence (one lookup, whatever the number of rules),
// steps the deadman rules that select it and counts it for the fleet rules,
// which it then judges per district. On the way it records when it first
// listed each device never heard from: the devices of the first tick count
// from the engine's start, those added later from the tick that first sees
// them; it keeps only the devices still listed and never heard from, so the
// record cannot grow past the fleet.
func (e *Engine) tickDevices(list []devices.Device, deadman, fleet []*Rule, now time.Time) {
	firstListed := now
	if !e.ticked {
		firstListed, e.ticked = e.started, true
	}
	shardOf := e.tickShards[:0]
	for _, d := range list {
		shardOf = append(shardOf, uint32(e.shardOf(d.ID)))
	}
	e.tickShards = shardOf
	counts := FleetCounts{}
	for i, s := range e.shards {
		held := time.Now()
		s.mu.Lock()
		listed := make(map[string]time.Time, len(s.listed))
		for j, d := range list {
			if shardOf[j] == uint32(i) {
				e.tickDevice(s, d, listed, firstListed, deadman, fleet, counts, now)
			}
		}
		s.listed = listed
		s.mu.Unlock()
		e.m.tickHold.Observe(time.Since(held).Seconds())
	}
	if len(fleet) > 0 {
		e.lockAll()
		defer e.unlockAll()
		for _, r := range fleet {
			e.judgeFleet(r, counts[r.Name], now)
		}
	}
}

// tickDevice is tickDevices' work for device d of shard s, whose lock the
// caller holds.
func (e *Engine) tickDevice(s *ruleShard, d devices.Device, listed map[string]time.Time, firstListed time.Time,
	deadman, fleet []*Rule, counts FleetCounts, now time.Time) {
	last, seen := s.lastSeen[d.ID]
	var first time.Time
	if !seen {
		var ok bool
		if first, ok = s.listed[d.ID]; !ok {
			first = firstListed
		}
		listed[d.ID] = first
	}
	silence := e.silence(last, seen, first, now)
	for _, r := range deadman {
		if r.Select.Matches(string(d.Kind), "", d.District, d.ID) && e.owned(d.ID) {
			e.stepDeadman(s, r, d, silence, now)
		}
	}
	for _, r := range fleet {
		if r.Select.Matches(string(d.Kind), "", d.District, d.ID) {
			counts.add(r.Name, d.District, fleetCount(silence, r, d))
		}
	}
}

// silentPast reports whether a silence is past factor × d's interval.
func silentPast(silence time.Duration, factor float64, d devices.Device) bool {
	return silence > time.Duration(factor*float64(d.Interval))
}

// silentFor returns how long device d has been silent at now and whether it
// has reported at all since it is known (since the start, or in the saved
// state). The caller holds the shard locks.
func (e *Engine) silentFor(d devices.Device, now time.Time) (time.Duration, bool) {
	s := e.shardFor(d.ID)
	last, seen := s.lastSeen[d.ID]
	return e.silence(last, seen, s.listed[d.ID], now), seen
}

// silence is how long a device has been silent at now: since its last
// reading if seen; if never heard from, since the engine's start or, if it
// was added later, since first, the tick that first listed it, which gives it
// the same chance to report as any other device (0 before the start).
func (e *Engine) silence(last time.Time, seen bool, first, now time.Time) time.Duration {
	switch {
	case seen:
		return now.Sub(last)
	case e.started.IsZero():
		return 0
	case first.After(e.started):
		return now.Sub(first)
	default:
		return now.Sub(e.started)
	}
}

// stepDeadman raises or resolves deadman rule r's alert of device d, in
// shard s, silent for silence.
func (e *Engine) stepDeadman(s *ruleShard, r *Rule, d devices.Device, silence time.Duration, now time.Time) {
	silent := silentPast(silence, r.Factor, d)
	k := alertKey{Rule: r.Name, Device: d.ID, District: d.District, Kind: string(d.Kind)}
	a := s.alertToStep(k, silent)
	if a == nil {
		return
	}
	a.state.Value = silence.Seconds()
	e.emit(s, a, r, a.state.Step(r, silent, now, e.flap))
}

// advance moves the alerts of reading-driven rules on with time (hold-off
// and clear timers, repeats, the end of flapping), one shard at a time.
func (e *Engine) advance(rules []*Rule, now time.Time) {
	byName := make(map[string]*Rule, len(rules))
	for _, r := range rules {
		byName[r.Name] = r
	}
	for _, s := range e.shards {
		s.mu.Lock()
		for k, a := range s.alerts {
			r := byName[k.Rule]
			if r == nil || r.Type == TypeDeadman || r.Type == TypeFleet {
				continue
			}
			e.emit(s, a, r, a.state.Advance(r, now, e.flap))
		}
		s.mu.Unlock()
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
