package rules

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/internal/bymetric"
	"github.com/citypulse/citypulse/pipeline"
)

// CityKind and CityDevice mark roll-up readings: stored as
// city_<name>{district} (district "city" is the city-wide value).
const (
	CityKind     = string(devices.KindCity)
	CityDevice   = "city"
	CityDistrict = "city"
)

// VitalsConfig configures the vital-sign roll-ups.
type VitalsConfig struct {
	Enabled bool `mapstructure:"enabled" yaml:"enabled"`
	// Interval is how often the roll-ups are computed.
	Interval time.Duration `mapstructure:"interval" yaml:"interval"`
	// StaleFactor: a device silent for more than StaleFactor × its declared
	// interval is excluded from the roll-ups and counted as silent.
	StaleFactor float64 `mapstructure:"stale_factor" yaml:"stale_factor"`
	// File holds the roll-up definitions (configs/vitals.yaml).
	File string `mapstructure:"file" yaml:"file"`
}

// DefaultVitals returns the defaults.
func DefaultVitals() VitalsConfig {
	return VitalsConfig{Enabled: true, Interval: 10 * time.Second, StaleFactor: 3, File: "configs/vitals.yaml"}
}

// Validate checks the section; messages name the key.
func (c VitalsConfig) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.Interval < time.Second {
		errs = append(errs, fmt.Errorf("vitals.interval must be at least 1s, got %v", c.Interval))
	}
	if c.StaleFactor < 1 {
		errs = append(errs, fmt.Errorf("vitals.stale_factor must be >= 1, got %v", c.StaleFactor))
	}
	if c.File == "" {
		errs = append(errs, errors.New("vitals.file must not be empty"))
	}
	return errors.Join(errs...)
}

// Rollup defines one vital sign: an aggregation of the latest value of one
// metric over the reporting devices of a kind, per district and city-wide.
type Rollup struct {
	Name   string  `yaml:"name"` // series city_<name>
	Kind   string  `yaml:"kind"`
	Metric string  `yaml:"metric"`
	Agg    string  `yaml:"agg"`   // min, max, mean, sum, count, quantile, count_eq, share_outside, max_abs_dev
	Q      float64 `yaml:"q"`     // quantile: 0..1
	Value  float64 `yaml:"value"` // count_eq: the value counted; max_abs_dev: the reference
	Lo     float64 `yaml:"lo"`    // share_outside: the acceptable range
	Hi     float64 `yaml:"hi"`
	Help   string  `yaml:"help"`
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

func (r Rollup) validate() error {
	if !nameRE.MatchString(r.Name) {
		return fmt.Errorf("rollup name %q: want [a-z][a-z0-9_]*", r.Name)
	}
	s, ok := devices.SchemaOf(devices.Kind(r.Kind))
	if !ok {
		return fmt.Errorf("rollup %s: unknown kind %q", r.Name, r.Kind)
	}
	if _, ok := s.Metric(r.Metric); !ok {
		return fmt.Errorf("rollup %s: kind %s has no metric %q", r.Name, r.Kind, r.Metric)
	}
	switch r.Agg {
	case "min", "max", "mean", "sum", "count", "count_eq", "max_abs_dev":
	case "quantile":
		if r.Q < 0 || r.Q > 1 {
			return fmt.Errorf("rollup %s: q must be in [0, 1], got %v", r.Name, r.Q)
		}
	case "share_outside":
		if r.Lo > r.Hi {
			return fmt.Errorf("rollup %s: lo %v > hi %v", r.Name, r.Lo, r.Hi)
		}
	default:
		return fmt.Errorf("rollup %s: unknown agg %q (want min, max, mean, sum, count, quantile, count_eq, share_outside, max_abs_dev)", r.Name, r.Agg)
	}
	return nil
}

// LoadRollups reads and validates the roll-up definitions.
func LoadRollups(path string) ([]Rollup, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read vital-sign definitions: %w", err)
	}
	var f struct {
		Rollups []Rollup `yaml:"rollups"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	seen := map[string]bool{}
	for i, r := range f.Rollups {
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("%s: rollups[%d]: %w", path, i, err)
		}
		if seen[r.Name] || r.Name == "fleet" {
			return nil, fmt.Errorf("%s: rollups[%d]: name %q is used twice", path, i, r.Name)
		}
		seen[r.Name] = true
	}
	return f.Rollups, nil
}

// DeviceLister is what the roll-ups, and the deadman and fleet rules, need
// of the registry.
type DeviceLister interface {
	List() []devices.Device
}

// Submitter journals readings (the pipeline).
type Submitter interface {
	Submit(ctx context.Context, rs []pipeline.Reading) error
}

// Vitals keeps the latest value of every series (updated by the shard loops)
// and computes the roll-ups on an interval, submitting them back into the
// pipeline as city_* series so that every sink and the rules see them.
type Vitals struct {
	cfg    VitalsConfig
	defs   []Rollup
	devs   DeviceLister
	log    *slog.Logger
	m      *vitalsMetrics
	shards []*latestShard
	owns   vitalsOwns // nil: every device
}

// latestShard is the latest values of a shard's devices. Observe looks a
// device up once per run of its readings and its metrics in a short list,
// tried first where the last one was found (the readings of a device repeat
// their metrics in one order): no (device, metric) is hashed per reading.
type latestShard struct {
	mu   sync.Mutex
	devs map[string]*latestDevice
}

// latestDevice is one device's latest values and when it last reported.
type latestDevice struct {
	seen   int64 // the last received (unix ns); 0: none after 1970
	values bymetric.List[float64]
}

type seriesKey struct{ device, metric string }

type vitalsMetrics struct {
	duration prometheus.Histogram
	series   prometheus.Gauge
	silent   prometheus.Gauge
}

// NewVitals returns the roll-up engine for a pipeline of shards shards.
func NewVitals(cfg VitalsConfig, defs []Rollup, devs DeviceLister, shards int, log *slog.Logger, reg prometheus.Registerer) *Vitals {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	v := &Vitals{cfg: cfg, defs: defs, devs: devs, log: log, m: &vitalsMetrics{
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "citypulse_vitals_compute_duration_seconds", Help: "Time to compute all vital-sign roll-ups.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9)}),
		series: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_vitals_series_tracked", Help: "Series whose latest value the roll-ups keep."}),
		silent: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citypulse_vitals_devices_silent", Help: "Devices silent for more than stale_factor × their interval."}),
	}}
	if reg != nil {
		reg.MustRegister(v.m.duration, v.m.series, v.m.silent)
	}
	for i := 0; i < shards; i++ {
		v.shards = append(v.shards, &latestShard{devs: map[string]*latestDevice{}})
	}
	return v
}

// Observe records the latest values; it runs in the shard loop.
func (v *Vitals) Observe(shard int, rs []pipeline.Reading) {
	if len(rs) == 0 || rs[0].Kind == CityKind {
		return
	}
	s := v.shards[shard%len(v.shards)]
	s.mu.Lock()
	var d *latestDevice
	for i := range rs {
		r := &rs[i]
		if i == 0 || r.Device != rs[i-1].Device {
			if d = s.devs[r.Device]; d == nil {
				d = &latestDevice{}
				s.devs[r.Device] = d
			}
		}
		d.values.Set(r.Metric, r.Value)
		d.seen = max(d.seen, r.Received)
	}
	s.mu.Unlock()
}

// snapshot copies the latest values of the devices in want.
func (v *Vitals) snapshot() (map[seriesKey]float64, map[string]int64) {
	series := map[seriesKey]float64{}
	seen := map[string]int64{}
	for _, s := range v.shards {
		s.mu.Lock()
		for dev, d := range s.devs {
			d.values.All(func(m string, v float64) { series[seriesKey{dev, m}] = v })
			if d.seen > 0 {
				seen[dev] = d.seen
			}
		}
		s.mu.Unlock()
	}
	return series, seen
}

// Compute returns the roll-up readings at now (of the owned devices: every
// device unless SetOwns says otherwise).
func (v *Vitals) Compute(now time.Time) []pipeline.Reading {
	start := time.Now()
	out := v.Combine([]VitalsPartial{v.Partial(now)}, now)
	v.m.duration.Observe(time.Since(start).Seconds())
	return out
}

// aggregate applies def's aggregation over vals; ok is false when there is
// no value to report (a min of nothing is not zero).
func aggregate(def Rollup, vals []float64) (float64, bool) {
	return finalAgg(def, partialOf(def, vals))
}

func sum(vals []float64) float64 {
	s := 0.0
	for _, x := range vals {
		s += x
	}
	return s
}

// Run computes the roll-ups every interval and submits them to sub (the
// pipeline, which is built after the observers it calls) until ctx is done.
func (v *Vitals) Run(ctx context.Context, sub Submitter) error {
	if sub == nil {
		return errors.New("vitals: no submitter")
	}
	t := time.NewTicker(v.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			// One submission per district: a journal record carries one district.
			for run := range pipeline.Runs(v.Compute(now)) {
				if err := sub.Submit(ctx, run); err != nil && ctx.Err() == nil {
					v.log.Warn("vitals: roll-ups not journaled; the next interval recomputes them", "district", run[0].District, "err", err)
				}
			}
		}
	}
}
