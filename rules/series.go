package rules

import (
	"github.com/citypulse/citypulse/internal/bymetric"
	"github.com/citypulse/citypulse/pipeline"
)

// The series cache of a rule shard: per device (with its kind and district),
// per metric, the rules its readings meet and the alert of each. Observe
// looks a device up once per run of its readings (a submission is one
// device's) and its metric in a short list, tried first where the device's
// last metric was found, so a reading hashes no alert key, no (kind, metric,
// district) and no (device, metric). It is dropped when the rules change
// (their generation) and its alert pointers are looked up again when the
// alerts change off the reading path (ruleShard.ver).

// maxCachedSeries bounds a shard's series cache (it starts over beyond).
const maxCachedSeries = 1 << 20

// devRules is one device's series.
type devRules struct {
	device, kind, district string
	metrics                bymetric.List[*seriesRules]
	// moved is the same device with another kind or district (re-registered),
	// nil for most.
	moved *devRules
}

// seriesRules is one series: the rules its readings meet, in the rules'
// order, and the alert of each (nil: none).
type seriesRules struct {
	metric string
	ver    uint64 // the shard's ver when alerts was looked up
	rules  []*Rule
	alerts []*alert
}

// device returns r's device in the cache, added if new (s.mu held).
func (s *ruleShard) device(r *pipeline.Reading) *devRules {
	first := s.devs[r.Device]
	d := first
	for d != nil && (d.kind != r.Kind || d.district != r.District) {
		d = d.moved
	}
	if d == nil {
		d = &devRules{device: r.Device, kind: r.Kind, district: r.District, moved: first}
		s.devs[r.Device] = d
	}
	return d
}

// series returns the device's series of metric, added with the rules it
// meets if new.
func (d *devRules) series(s *ruleShard, rules []*Rule, metric string) *seriesRules {
	if sr, ok := d.metrics.Find(metric); ok {
		return sr
	}
	sr := &seriesRules{metric: metric}
	for _, rule := range rules {
		if rule.Type != TypeFleet && globMatch(rule.Select.Kind, d.kind) && globMatch(rule.Select.District, d.district) &&
			(rule.Type == TypeDeadman || globMatch(rule.Select.Metric, metric)) && globMatch(rule.Select.Device, d.device) {
			sr.rules = append(sr.rules, rule)
		}
	}
	sr.alerts = make([]*alert, len(sr.rules))
	sr.resolve(s, d)
	d.metrics.Add(metric, sr)
	s.nSeries++
	return sr
}

// key returns the key of rule's alert on the series (a deadman alert is the
// device's, with no metric).
func (sr *seriesRules) key(d *devRules, rule *Rule) alertKey {
	k := alertKey{Rule: rule.Name, Device: d.device, Metric: sr.metric, District: d.district, Kind: d.kind}
	if rule.Type == TypeDeadman {
		k.Metric = ""
	}
	return k
}

// resolve looks the series' alerts up (s.mu held).
func (sr *seriesRules) resolve(s *ruleShard, d *devRules) {
	for j, rule := range sr.rules {
		sr.alerts[j] = s.alerts[sr.key(d, rule)]
	}
	sr.ver = s.ver
}
