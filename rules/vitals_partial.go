package rules

import (
	"math"
	"slices"
	"sort"
	"sync/atomic"
	"time"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

// The roll-ups are computed in two steps, so that in cluster mode each node
// can aggregate the devices it owns and one node combine the partial results:
// Partial aggregates the owned devices per (kind, district) and roll-up, and
// Combine merges partials into the roll-up readings. On one machine Compute is
// Combine of the one Partial, which gives exactly the values a direct
// computation gives (the same values in the same order).

// VitalsPartial is the roll-up inputs of the devices one node owns.
type VitalsPartial struct {
	At     time.Time      `json:"at"`
	Groups []GroupPartial `json:"groups"`
}

// GroupPartial is one (kind, district) group of a partial; district "city"
// is the group of every district.
type GroupPartial struct {
	Kind      string                 `json:"kind"`
	District  string                 `json:"district"`
	Reporting int                    `json:"reporting"`
	Silent    int                    `json:"silent"`
	Aggs      map[string]*AggPartial `json:"aggs,omitempty"` // by roll-up name
}

// AggPartial is the mergeable state of one roll-up over some devices' values.
type AggPartial struct {
	N      int       `json:"n"`
	Sum    float64   `json:"sum"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	Hits   float64   `json:"hits"`             // count_eq: values equal to value; share_outside: values outside
	Dev    float64   `json:"dev"`              // max_abs_dev
	Values []float64 `json:"values,omitempty"` // quantile only: every value
}

// SetOwns restricts Partial (and Compute) to the devices owns picks (nil:
// every device).
func (v *Vitals) SetOwns(owns func(device string) bool) {
	if owns == nil {
		v.owns.Store(nil)
		return
	}
	v.owns.Store(&owns)
}

func (v *Vitals) owned(device string) bool {
	f := v.owns.Load()
	return f == nil || (*f)(device)
}

type vitalsOwns = atomic.Pointer[func(device string) bool]

type group struct{ kind, district string }

// Partial aggregates the owned devices' latest values at now.
func (v *Vitals) Partial(now time.Time) VitalsPartial {
	series, seen := v.snapshot()
	v.m.series.Set(float64(len(series)))
	groups := map[group]*GroupPartial{}
	var order []group
	reporting := map[group][]devices.Device{}
	totalSilent := 0
	for _, d := range v.devs.List() {
		if !v.owned(d.ID) {
			continue
		}
		limit := int64(v.cfg.StaleFactor * float64(d.Interval))
		last, ok := seen[d.ID]
		fresh := ok && now.UnixNano()-last <= limit
		if !fresh {
			totalSilent++
		}
		for _, g := range []group{{string(d.Kind), d.District}, {string(d.Kind), CityDistrict}} {
			gp := groups[g]
			if gp == nil {
				gp = &GroupPartial{Kind: g.kind, District: g.district}
				groups[g] = gp
				order = append(order, g)
			}
			if fresh {
				gp.Reporting++
				reporting[g] = append(reporting[g], d)
			} else {
				gp.Silent++
			}
		}
	}
	v.m.silent.Set(float64(totalSilent))
	var vals []float64
	for _, def := range v.defs {
		for _, g := range order {
			if g.kind != def.Kind || len(reporting[g]) == 0 {
				continue
			}
			vals = vals[:0]
			for _, d := range reporting[g] {
				if x, ok := series[seriesKey{d.ID, def.Metric}]; ok {
					vals = append(vals, x)
				}
			}
			gp := groups[g]
			if gp.Aggs == nil {
				gp.Aggs = map[string]*AggPartial{}
			}
			gp.Aggs[def.Name] = partialOf(def, vals)
		}
	}
	p := VitalsPartial{At: now, Groups: make([]GroupPartial, 0, len(order))}
	for _, g := range order {
		p.Groups = append(p.Groups, *groups[g])
	}
	return p
}

// Combine merges partials (of disjoint sets of devices) into the roll-up
// readings at now: per district and city-wide, every roll-up with a
// reporting device, and the fleet counts.
func (v *Vitals) Combine(parts []VitalsPartial, now time.Time) []pipeline.Reading {
	merged := map[group]*GroupPartial{}
	districts := map[string]bool{}
	for _, p := range parts {
		for _, gp := range p.Groups {
			g := group{gp.Kind, gp.District}
			m := merged[g]
			if m == nil {
				m = &GroupPartial{Kind: gp.Kind, District: gp.District, Aggs: map[string]*AggPartial{}}
				merged[g] = m
			}
			m.Reporting += gp.Reporting
			m.Silent += gp.Silent
			for name, a := range gp.Aggs {
				m.Aggs[name] = mergeAgg(m.Aggs[name], a)
			}
			if gp.District != CityDistrict {
				districts[gp.District] = true
			}
		}
	}
	ds := make([]string, 0, len(districts)+1)
	for d := range districts {
		ds = append(ds, d)
	}
	sort.Strings(ds)
	ds = append(ds, CityDistrict)
	var out []pipeline.Reading
	emit := func(district, name string, value float64) {
		out = append(out, pipeline.Reading{Device: CityDevice, Kind: CityKind, District: district, Metric: name,
			Value: value, Time: now.UnixNano(), Received: now.UnixNano()})
	}
	for _, def := range v.defs {
		for _, district := range ds {
			g := merged[group{def.Kind, district}]
			if g == nil || g.Reporting == 0 {
				// No device of this kind here, or every one silent: there is
				// no value, and a 0 would read as a blackout or an all-clear.
				// city_fleet_<kind>_reporting and _silent say why.
				continue
			}
			if x, ok := finalAgg(def, g.Aggs[def.Name]); ok {
				emit(district, def.Name, x)
			}
		}
	}
	for _, k := range devices.Kinds() {
		for _, district := range ds {
			g := merged[group{string(k), district}]
			if g == nil || g.Reporting+g.Silent == 0 {
				continue
			}
			emit(district, "fleet_"+string(k)+"_reporting", float64(g.Reporting))
			emit(district, "fleet_"+string(k)+"_silent", float64(g.Silent))
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].District < out[j].District })
	return out
}

// partialOf is def's mergeable state over vals.
func partialOf(def Rollup, vals []float64) *AggPartial {
	a := &AggPartial{N: len(vals), Sum: sum(vals)}
	if len(vals) > 0 {
		a.Min, a.Max = slices.Min(vals), slices.Max(vals)
	}
	for _, x := range vals {
		switch def.Agg {
		case "count_eq":
			if x == def.Value {
				a.Hits++
			}
		case "share_outside":
			if x < def.Lo || x > def.Hi {
				a.Hits++
			}
		case "max_abs_dev":
			a.Dev = math.Max(a.Dev, math.Abs(x-def.Value))
		}
	}
	if def.Agg == "quantile" {
		a.Values = slices.Clone(vals)
	}
	return a
}

// mergeAgg merges b into a (nil: nothing yet); it returns the result.
func mergeAgg(a, b *AggPartial) *AggPartial {
	switch {
	case b == nil:
		return a
	case a == nil:
		c := *b
		c.Values = slices.Clone(b.Values)
		return &c
	}
	switch {
	case b.N == 0:
	case a.N == 0:
		a.Min, a.Max = b.Min, b.Max
	default:
		a.Min, a.Max = math.Min(a.Min, b.Min), math.Max(a.Max, b.Max)
	}
	a.N += b.N
	a.Sum += b.Sum
	a.Hits += b.Hits
	a.Dev = math.Max(a.Dev, b.Dev)
	a.Values = append(a.Values, b.Values...)
	return a
}

// finalAgg is def's value from its merged state; ok is false when there is
// no value to report (a min of nothing is not zero).
func finalAgg(def Rollup, a *AggPartial) (float64, bool) {
	if a == nil {
		a = &AggPartial{}
	}
	n := float64(a.N)
	switch def.Agg {
	case "count":
		return n, true
	case "sum":
		return a.Sum, true
	case "count_eq":
		return a.Hits, true
	}
	if a.N == 0 {
		return 0, false
	}
	switch def.Agg {
	case "min":
		return a.Min, true
	case "max":
		return a.Max, true
	case "mean":
		return a.Sum / n, true
	case "max_abs_dev":
		return a.Dev, true
	case "share_outside":
		return a.Hits / n, true
	case "quantile":
		s := slices.Clone(a.Values)
		slices.Sort(s)
		pos := def.Q * (n - 1)
		lo := int(math.Floor(pos))
		hi := int(math.Ceil(pos))
		return s[lo] + (s[hi]-s[lo])*(pos-float64(lo)), true
	}
	return 0, false
}
