package signals

import (
	"context"
	"log/slog"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/citypulse/citypulse/pipeline"
)

// stateGreen is the index of "green" in the traffic_light state metric
// (off, red, amber, green, flashing).
const stateGreen = 3

// The city series the analyzer submits.
const (
	MetricCycle         = "signal_cycle_seconds"
	MetricGreenRatio    = "signal_green_ratio"
	MetricCorridorError = "corridor_offset_error_seconds"
	cityKind            = "city"
	cityDistrict        = "city"
)

// Submitter journals readings (the pipeline).
type Submitter interface {
	Submit(ctx context.Context, rs []pipeline.Reading) error
}

// junction is one junction's timing, from its state transitions.
type junction struct {
	district   string
	state      int
	seen       int64 // time of the newest state reading, unix ns
	greenStart int64 // start of the current or last green
	greenEnd   int64 // end of the last green (0 while green)
	cycle      int64 // between the last two green starts, ns
	ratio      float64
}

// Analyzer keeps the junctions' timing and computes the corridors' offsets.
type Analyzer struct {
	corridors []Corridor
	interval  time.Duration
	log       *slog.Logger
	mu        sync.Mutex
	js        map[string]*junction
}

// New builds an analyzer that reports every interval; it starts nothing.
func New(corridors []Corridor, interval time.Duration, log *slog.Logger) *Analyzer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Analyzer{corridors: corridors, interval: interval, log: log, js: map[string]*junction{}}
}

// Observe follows traffic_light state transitions; it runs in the shard loop.
// Readings must come in each device's time order (a late one is ignored):
// the timing is as exact as the devices report their transitions.
func (a *Analyzer) Observe(_ int, rs []pipeline.Reading) {
	if len(rs) == 0 || rs[0].Kind != "traffic_light" {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range rs {
		if r.Metric != "state" {
			continue
		}
		j := a.js[r.Device]
		if j == nil {
			j = &junction{state: -1}
			a.js[r.Device] = j
		}
		if r.Time <= j.seen {
			continue
		}
		j.seen, j.district = r.Time, r.District
		j.transition(int(r.Value), r.Time)
	}
}

func (j *junction) transition(state int, t int64) {
	if state == j.state {
		return
	}
	switch {
	case state == stateGreen:
		if j.greenStart != 0 && j.greenEnd > j.greenStart {
			j.cycle = t - j.greenStart
			j.ratio = float64(j.greenEnd-j.greenStart) / float64(j.cycle)
		}
		j.greenStart, j.greenEnd = t, 0
	case j.state == stateGreen:
		j.greenEnd = t
	}
	j.state = state
}

// timing is a junction's cycle, or false when it is unknown or stale (no
// transition for three cycles).
func (j *junction) timing(now int64) (cycle int64, ratio float64, ok bool) {
	if j == nil || j.cycle <= 0 || now-j.greenStart > 3*j.cycle {
		return 0, 0, false
	}
	return j.cycle, j.ratio, true
}

// Results computes the series at now: each junction's cycle and green share,
// and each corridor's worst offset error (the greatest |offset − travel time|
// between consecutive junctions, modulo the cycle). A corridor with a junction
// whose timing is unknown has no sample: never a guess.
func (a *Analyzer) Results(now time.Time) []pipeline.Reading {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := now.UnixNano()
	var out []pipeline.Reading
	ids := make([]string, 0, len(a.js))
	for id := range a.js {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		j := a.js[id]
		if cycle, ratio, ok := j.timing(t); ok {
			out = append(out,
				pipeline.Reading{Device: id, Kind: cityKind, District: j.district, Metric: MetricCycle, Value: seconds(cycle), Time: t, Received: t},
				pipeline.Reading{Device: id, Kind: cityKind, District: j.district, Metric: MetricGreenRatio, Value: ratio, Time: t, Received: t})
		}
	}
	for _, c := range a.corridors {
		if e, ok := a.corridorError(c, t); ok {
			out = append(out, pipeline.Reading{Device: c.Name, Kind: cityKind, District: cityDistrict, Metric: MetricCorridorError, Value: e, Time: t, Received: t})
		}
	}
	return out
}

func (a *Analyzer) corridorError(c Corridor, now int64) (float64, bool) {
	worst := 0.0
	for i := 1; i < len(c.Junctions); i++ {
		_, diff, ok := a.offset(c, i, now)
		if !ok {
			return 0, false
		}
		worst = math.Max(worst, math.Abs(seconds(diff)))
	}
	return worst, true
}

// offset is the time from junction i-1's green start to junction i's, in
// [0, cycle) of the upstream junction, and how far that is from the travel
// time between them, modulo the cycle, in (-cycle/2, cycle/2]; false when
// either has no timing.
func (a *Analyzer) offset(c Corridor, i int, now int64) (offset, diff int64, ok bool) {
	up, down := a.js[c.Junctions[i-1].Device], a.js[c.Junctions[i].Device]
	cycle, _, ok1 := up.timing(now)
	_, _, ok2 := down.timing(now)
	if !ok1 || !ok2 {
		return 0, 0, false
	}
	offset = mod(down.greenStart-up.greenStart, cycle)
	diff = mod(offset-int64(c.Travel(i)), cycle)
	if diff > cycle/2 {
		diff -= cycle // into (-cycle/2, cycle/2]
	}
	return offset, diff, true
}

func mod(a, m int64) int64 { return ((a % m) + m) % m }

func seconds(ns int64) float64 { return float64(ns) / 1e9 }

// Run submits the results every interval until ctx is done, one submission
// per series owner (a journal record holds one device's readings).
func (a *Analyzer) Run(ctx context.Context, sub Submitter) error {
	t := time.NewTicker(a.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			for run := range pipeline.Runs(a.Results(now)) {
				if err := sub.Submit(ctx, run); err != nil && ctx.Err() == nil {
					a.log.Warn("signal timing not stored; the next interval recomputes it", "series", run[0].Device, "error", err)
				}
			}
		}
	}
}
