package rules

import (
	"time"

	"github.com/citypulse/citypulse/devices"
)

// A fleet rule judges a share of a district's devices. On one machine the
// tick counts every device and judges at once (tickDevices). In cluster mode a
// node knows the silence of the devices it owns only: each node counts them
// per partition (FleetCounts), one elected node combines the counts of every
// partition (CombineFleet) and judges the rules on them (JudgeFleet). The
// fleet alerts are then that node's: their owner is FleetOwner, not a
// district, and their state moves with the election, not with a partition.

// FleetOwner owns every fleet alert (ownerOf, SetOwns, JournalRecord.Owner):
// a name no device id or district can take.
const FleetOwner = "#fleet"

// FleetCount is how many devices of a district a fleet rule selects, and how
// many of them are silent past its window.
type FleetCount struct {
	Devices int `json:"n"`
	Silent  int `json:"s"`
}

// FleetCounts are counts per fleet rule name and district.
type FleetCounts map[string]map[string]FleetCount

// add adds x to the counts of rule in district.
func (c FleetCounts) add(rule, district string, x FleetCount) {
	m := c[rule]
	if m == nil {
		m = map[string]FleetCount{}
		c[rule] = m
	}
	y := m[district]
	m[district] = FleetCount{Devices: y.Devices + x.Devices, Silent: y.Silent + x.Silent}
}

// FleetPartial is one node's counts, per partition of the devices it owns.
// Every partition the node owns is in Parts, with no counts when none of its
// devices is selected: so the combining node knows it is counted.
type FleetPartial struct {
	At    time.Time           `json:"at"`
	Parts map[int]FleetCounts `json:"parts"`
}

// CombineFleet sums the counts of every partition in parts, each taken from
// the partial with the latest At that has it: a partition in hand-over is
// reported by its old and its new owner and counts once. It returns the sums
// and the partitions they cover. At must be comparable across the partials
// (the caller sets it to when each partial arrived).
func CombineFleet(parts []FleetPartial) (FleetCounts, map[int]bool) {
	latest := map[int]int{} // partition → index in parts
	for i, p := range parts {
		for q := range p.Parts {
			if j, ok := latest[q]; !ok || p.At.After(parts[j].At) {
				latest[q] = i
			}
		}
	}
	out, counted := FleetCounts{}, make(map[int]bool, len(latest))
	for q, i := range latest {
		counted[q] = true
		out.Merge(parts[i].Parts[q])
	}
	return out, counted
}

// Merge adds the counts of x to c.
func (c FleetCounts) Merge(x FleetCounts) {
	for rule, byDistrict := range x {
		for district, n := range byDistrict {
			c.add(rule, district, n)
		}
	}
}

// FleetCounts counts, per partition (part of the device), the owned devices
// each fleet rule selects and those of them silent past the rule's window at
// now: this node's share of the fleet in cluster mode.
func (e *Engine) FleetCounts(now time.Time, part func(device string) int) map[int]FleetCounts {
	var fleet []*Rule
	for _, r := range e.Rules() {
		if r.Type == TypeFleet {
			fleet = append(fleet, r)
		}
	}
	out := map[int]FleetCounts{}
	if len(fleet) == 0 || e.devs == nil {
		return out
	}
	list := e.devs.List()
	e.lockAll()
	defer e.unlockAll()
	for _, d := range list {
		if !e.owned(d.ID) {
			continue
		}
		for _, r := range fleet {
			if !r.Select.Matches(string(d.Kind), "", d.District, d.ID) {
				continue
			}
			p := part(d.ID)
			if out[p] == nil {
				out[p] = FleetCounts{}
			}
			silence, _ := e.silentFor(d, now)
			out[p].add(r.Name, d.District, fleetCount(silence, r, d))
		}
	}
	return out
}

// FleetCountsSince counts the devices sel picks, owned or not, for a
// partition no node reports (cluster mode): no reading of them came since
// since (it would have given the partition an owner, who would report it),
// so each is silent when since, or its last reading known here if later (or
// this engine's start, if later still), is more than the rule's window ago.
func (e *Engine) FleetCountsSince(now time.Time, sel func(device string) bool, since time.Time) FleetCounts {
	out := FleetCounts{}
	if e.devs == nil {
		return out
	}
	var fleet []*Rule
	for _, r := range e.Rules() {
		if r.Type == TypeFleet {
			fleet = append(fleet, r)
		}
	}
	if len(fleet) == 0 {
		return out
	}
	list := e.devs.List()
	e.lockAll()
	defer e.unlockAll()
	for _, d := range list {
		if !sel(d.ID) {
			continue
		}
		last := since
		if t, ok := e.shardFor(d.ID).lastSeen[d.ID]; ok && t.After(last) {
			last = t
		}
		if e.started.After(last) {
			last = e.started
		}
		if t := e.shardFor(d.ID).listed[d.ID]; t.After(last) {
			last = t // added at run time, after since
		}
		for _, r := range fleet {
			if r.Select.Matches(string(d.Kind), "", d.District, d.ID) {
				out.add(r.Name, d.District, fleetCount(now.Sub(last), r, d))
			}
		}
	}
	return out
}

// JudgeFleet judges the fleet rules on counts combined from every node
// (cluster mode) when this engine owns the fleet alerts (FleetOwner); a
// district without counts leaves its alert as it is, as on one machine.
func (e *Engine) JudgeFleet(c FleetCounts, now time.Time) {
	if !e.owned(FleetOwner) {
		return
	}
	e.lockAll()
	defer e.unlockAll()
	for _, r := range e.Rules() {
		if r.Type == TypeFleet {
			e.judgeFleet(r, c[r.Name], now)
		}
	}
}

// fleetCount is device d's count for rule r, silent for silence: one
// device, silent past the rule's window or not.
func fleetCount(silence time.Duration, r *Rule, d devices.Device) FleetCount {
	x := FleetCount{Devices: 1}
	if silentPast(silence, r.Factor, d) {
		x.Silent = 1
	}
	return x
}

// judgeFleet raises or resolves rule r's alert of every district counted.
// The caller holds the shard locks.
func (e *Engine) judgeFleet(r *Rule, byDistrict map[string]FleetCount, now time.Time) {
	for district, g := range byDistrict {
		if g.Devices == 0 {
			continue
		}
		s := e.shardFor(district)
		k := alertKey{Rule: r.Name, District: district, Kind: r.Select.Kind}
		ratio := float64(g.Silent) / float64(g.Devices)
		bad := ratio > r.SilentRatio
		a := s.alertToStep(k, bad)
		if a == nil {
			continue
		}
		a.state.Value = ratio
		e.emit(s, a, r, a.state.Step(r, bad, now, e.flap))
	}
}

func (e *Engine) lockAll() {
	for _, s := range e.shards {
		s.mu.Lock()
	}
}

func (e *Engine) unlockAll() {
	for _, s := range e.shards {
		s.mu.Unlock()
	}
}
