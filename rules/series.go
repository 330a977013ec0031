package rules

import "github.com/citypulse/citypulse/pipeline"

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

// shortList is how many metrics a device's list is scanned for; a device
// with more (a district's roll-ups) has them in a map too.
const shortList = 16

// devRules is one device's series.
type devRules struct {
	device, kind, district string
	list                   []*seriesRules
	next                   int                     // where the next reading's metric is looked for first
	byMetric               map[string]*seriesRules // beyond shortList metrics
	// moved is the same device with another kind or district (re-registered),
	// nil for most.
	moved *devRules
}

// seriesRules is one series: the rules its readings meet, in the rules'
// order, and the alert of each (nil: none).
type seriesRules struct {
	metric string
	idx    int    // in its device's list
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
	if sr := d.find(metric); sr != nil {
		return sr
	}
	sr := &seriesRules{metric: metric, idx: len(d.list)}
	for _, rule := range rules {
		if rule.Type != TypeFleet && globMatch(rule.Select.Kind, d.kind) && globMatch(rule.Select.District, d.district) &&
			(rule.Type == TypeDeadman || globMatch(rule.Select.Metric, metric)) && globMatch(rule.Select.Device, d.device) {
			sr.rules = append(sr.rules, rule)
		}
	}
	sr.alerts = make([]*alert, len(sr.rules))
	sr.resolve(s, d)
	d.list = append(d.list, sr)
	d.next = sr.idx + 1
	if len(d.list) > shortList {
		if d.byMetric == nil {
			d.byMetric = make(map[string]*seriesRules, 2*len(d.list))
			for _, x := range d.list {
				d.byMetric[x.metric] = x
			}
		}
		d.byMetric[metric] = sr
	}
	s.nSeries++
	return sr
}

// find returns the device's series of metric, nil if it has none yet.
func (d *devRules) find(metric string) *seriesRules {
	n := len(d.list)
	if n == 0 {
		return nil
	}
	if sr := d.list[d.next%n]; sr.metric == metric {
		d.next = sr.idx + 1
		return sr
	}
	if d.byMetric != nil {
		sr := d.byMetric[metric]
		if sr != nil {
			d.next = sr.idx + 1
		}
		return sr
	}
	for _, sr := range d.list {
		if sr.metric == metric {
			d.next = sr.idx + 1
			return sr
		}
	}
	return nil
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
