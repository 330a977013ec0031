package rules

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
)

// Notifier receives alert events; it must not block (the shard loop calls it).
type Notifier interface {
	Enqueue(ev notifier.Event)
}

// ruleShard holds the alert states of the devices of one pipeline shard. The
// shard loop and the tick share it under mu (the tick is rare).
type ruleShard struct {
	mu       sync.Mutex
	alerts   map[alertKey]*alert
	lastSeen map[string]time.Time
	// listed holds, for the devices never heard from, when the tick first
	// listed them (tick.go): a device added at run time is silent from then
	// on, not from the engine's start.
	listed map[string]time.Time
	// ver counts the changes to alerts made off the reading path (the tick,
	// a restore or import, a partition handed over): the series cache's
	// alert pointers are looked up again after one. A reload changes the
	// rules' generation instead, which drops the cache.
	ver     uint64
	gen     uint64               // the rules' generation the series cache was built for
	devs    map[string]*devRules // the series cache, by device (series.go)
	nSeries int                  // series in devs
	scratch State                // evaluate's state for a reading with no alert
}

// Engine evaluates the rules on every reading (in the shard loops) and on a
// tick (timers, deadman, fleet), and hands transitions to the notifier.
type Engine struct {
	cfg       Config
	log       *slog.Logger
	m         *engineMetrics
	rules     atomic.Pointer[[]*Rule]
	gen       atomic.Uint64
	shards    []*ruleShard
	devs      DeviceLister
	notifier  Notifier
	statePath string
	fsyncEach bool
	now       func() time.Time
	flap      FlapPolicy
	started   time.Time
	// ticked: a tick has listed the devices; tickShards: the tick's scratch
	// (each listed device's shard). Tick's own (tick.go).
	ticked     bool
	tickShards []uint32
	// saveSoon asks Run to log the held transitions and notify them.
	saveSoon chan struct{}
	// held are the transitions waiting to be written to the transition log: a
	// notification goes out only once a restart would remember it, so a crash
	// right after it cannot make the alert notify again.
	heldMu   sync.Mutex
	held     []heldTransition
	seq      atomic.Uint64 // numbers the transitions; the snapshot records the last it holds
	tlog     *os.File      // the transition log, open while Run runs
	restored sync.Once
	// journal records transitions before they are notified (cluster mode),
	// owns picks the owners the tick judges (nil: all); see partition.go.
	journal Journal
	owns    atomic.Pointer[func(owner string) bool]
	logged  atomic.Uint64 // the number of the last transition logged (Flush)
	flushed chan struct{} // closed and replaced when logged moves on
	flushMu sync.Mutex
}

type engineMetrics struct {
	transitions *prometheus.CounterVec
	firing      prometheus.GaugeFunc
	evals       prometheus.Counter
	journalErrs prometheus.Counter
	tickHold    prometheus.Histogram
}

// EngineOptions are what the engine is built with besides its config and rules.
type EngineOptions struct {
	// Shards is the pipeline's shard count: the engine keeps a device's state
	// in the shard pipeline.ShardOf gives it, beside the loop that evaluates
	// it. Observe's shard argument is the pipeline's shard.
	Shards int
	// Devices lists the registered devices for deadman and fleet rules (nil: none).
	Devices DeviceLister
	// Notifier receives the transitions (nil: none).
	Notifier Notifier
	// StatePath is the alert snapshot ("" for none: transitions then go to the
	// notifier at once); the transition log is beside it (.log).
	StatePath string
	// FsyncEach fsyncs the snapshot and every transition-log append
	// (pipeline.fsync "always"; notifier.Durability.FsyncEach).
	FsyncEach bool
	// Journal records every transition before it is notified (cluster mode:
	// the partition's log in JetStream); nil for none.
	Journal    Journal
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// NewEngine builds the engine; it starts nothing.
func NewEngine(cfg Config, rules []*Rule, opts EngineOptions) *Engine {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{cfg: cfg, log: log, devs: opts.Devices, notifier: opts.Notifier, statePath: opts.StatePath, fsyncEach: opts.FsyncEach, journal: opts.Journal,
		now: time.Now, saveSoon: make(chan struct{}, 1), flushed: make(chan struct{}), flap: FlapPolicy{Window: cfg.FlapWindow, Max: cfg.FlapMax}}
	e.rules.Store(&rules)
	for i := 0; i < max(opts.Shards, 1); i++ {
		e.shards = append(e.shards, &ruleShard{alerts: map[alertKey]*alert{}, lastSeen: map[string]time.Time{},
			listed: map[string]time.Time{}})
	}
	e.m = &engineMetrics{
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_rules_transitions_total", Help: "Alert transitions notified, by kind."}, []string{"kind"}),
		evals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_rules_evaluations_total", Help: "Rule evaluations on readings."}),
		journalErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_rules_journal_errors_total",
			Help: "Transitions the cluster's state log did not take (notified all the same; a next owner may not know them)."}),
		tickHold: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_rules_tick_shard_hold_seconds",
			Help:    "How long the tick held one shard's lock for its deadman and fleet rules: the pause that shard's loop may see.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 8)}),
	}
	e.m.firing = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "citypulse_rules_alerts_firing", Help: "Alerts firing now."}, func() float64 { return float64(e.count(Firing)) })
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(e.m.transitions, e.m.firing, e.m.evals, e.m.tickHold)
		if opts.Journal != nil {
			opts.Registerer.MustRegister(e.m.journalErrs)
		}
	}
	return e
}

// shardOf returns the shard that owns a device (or, for district alerts, a
// district): the pipeline's.
func (e *Engine) shardOf(owner string) int { return pipeline.ShardOf(owner, len(e.shards)) }

// shardFor returns the state shard that owns a device or district.
func (e *Engine) shardFor(owner string) *ruleShard { return e.shards[e.shardOf(owner)] }

// Reload replaces the rules, keeping the state of rules that keep their name.
func (e *Engine) Reload(rules []*Rule) {
	e.rules.Store(&rules)
	e.gen.Add(1)
	names := map[string]bool{}
	for _, r := range rules {
		names[r.Name] = true
	}
	for _, s := range e.shards {
		s.mu.Lock()
		for k := range s.alerts {
			if !names[k.Rule] {
				delete(s.alerts, k)
			}
		}
		s.mu.Unlock()
	}
	e.log.Info("rules reloaded", "rules", len(rules))
}

// Rules returns the current rules.
func (e *Engine) Rules() []*Rule { return *e.rules.Load() }

func (e *Engine) rule(name string) *Rule {
	for _, r := range e.Rules() {
		if r.Name == name {
			return r
		}
	}
	return nil
}

// Observe evaluates the rules on readings; it runs in the shard loop and does
// no I/O (transitions are queued to the notifier).
//
// The rules a series meets and their alerts are kept in the shard's series
// cache (series.go): a reading costs a look-up there, by device once per run
// of one device's readings, and no hashing of alert keys.
func (e *Engine) Observe(shard int, rs []pipeline.Reading) {
	if len(rs) == 0 {
		return
	}
	s := e.shards[shard%len(e.shards)]
	s.mu.Lock()
	defer s.mu.Unlock()
	if g := e.gen.Load(); s.devs == nil || s.gen != g || s.nSeries > maxCachedSeries {
		s.devs, s.nSeries, s.gen = map[string]*devRules{}, 0, g
	}
	rules := e.Rules()
	var (
		d     *devRules
		recv  int64
		t     time.Time
		seen  bool // lastSeen holds t for d's device
		evals int
	)
	for i := range rs {
		r := &rs[i]
		if d == nil || r.Device != d.device || r.Kind != d.kind || r.District != d.district {
			d, seen = s.device(r), false
		}
		if i == 0 || r.Received != recv {
			recv, t, seen = r.Received, time.Unix(0, r.Received), false
		}
		if !seen && r.Kind != CityKind {
			s.lastSeen[r.Device] = t
			seen = true
		}
		sr := d.series(s, rules, r.Metric)
		if sr.ver != s.ver {
			sr.resolve(s, d)
		}
		for j, rule := range sr.rules {
			e.evaluate(s, d, sr, j, rule, r, t)
		}
		evals += len(sr.rules)
	}
	if evals > 0 {
		e.m.evals.Add(float64(evals))
	}
}

// evaluate applies one reading to the alert of the j-th rule of series sr
// of device d (the caller holds s.mu).
func (e *Engine) evaluate(s *ruleShard, d *devRules, sr *seriesRules, j int, rule *Rule, r *pipeline.Reading, t time.Time) {
	a := sr.alerts[j]
	if rule.Type == TypeDeadman {
		// A reading means the device is alive.
		if a != nil {
			e.emit(s, a, rule, a.state.Step(rule, false, t, e.flap))
		}
		return
	}
	st := &s.scratch
	if a != nil {
		st = &a.state
	} else {
		// Most readings with no alert are fine: judge them on the shard's
		// scratch state, kept (in a new alert) only if there is something
		// to remember or to tell.
		*st = State{}
	}
	// The condition (a rate rule's window) goes by when the reading was
	// measured, so a backlog replayed after an outage is judged on when things
	// happened; the lifecycle goes by arrival. A threshold does not look at
	// the time.
	var at time.Time
	if rule.Type != TypeThreshold {
		at = measuredAt(r)
	}
	bad, delta := rule.condition(st, r.Value, at)
	st.Value, st.Delta = r.Value, delta
	tr := st.Step(rule, bad, t, e.flap)
	forget := !st.Bad && st.Phase == Inactive && !st.Flapping && st.Rate.IsZero()
	if a == nil {
		if forget && len(tr) == 0 {
			return
		}
		a = &alert{key: sr.key(d, rule), state: *st}
		*st = State{}
		s.alerts[a.key] = a
		sr.alerts[j] = a
	}
	if len(tr) > 0 {
		e.emit(s, a, rule, tr)
	}
	if forget {
		delete(s.alerts, a.key) // nothing to remember
		sr.alerts[j] = nil
	}
}

// emit hands the transitions of alert a (in shard s, whose lock the caller
// holds) to the notifier: at once without a state file, or held until Run has
// logged them.
func (e *Engine) emit(s *ruleShard, a *alert, r *Rule, trs []Transition) {
	if len(trs) == 0 {
		return
	}
	// after the transitions are held: Run takes them when it sees the signal
	defer func() {
		select {
		case e.saveSoon <- struct{}{}:
		default:
		}
	}()
	for _, tr := range trs {
		ev := event(s, a, r, tr)
		e.m.transitions.WithLabelValues(tr.Kind).Inc()
		switch {
		case e.notifier == nil:
		case e.statePath == "" && e.journal == nil:
			e.notifier.Enqueue(ev)
		default:
			// numbered under heldMu, so held is in number order (Flush)
			e.heldMu.Lock()
			seq := e.seq.Add(1)
			rec, err := json.Marshal(logRecord{Seq: seq, Key: a.key, State: a.state})
			if err != nil { // cannot happen for these types; notify all the same
				e.log.Error("rules: cannot encode a transition", "err", err)
			}
			e.held = append(e.held, heldTransition{ev: ev, record: rec, seq: seq, owner: ownerOf(a.key)})
			e.heldMu.Unlock()
		}
	}
}

func (e *Engine) count(p Phase) int {
	n := 0
	for _, s := range e.shards {
		s.mu.Lock()
		for _, a := range s.alerts {
			if a.state.Phase == p {
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

// Run restores the saved state (the snapshot, then the transition log on top),
// then ticks until ctx is done. Every transition is appended to the log
// before it is notified; a snapshot of every alert is written every few
// seconds and at the end, and then the log starts afresh.
func (e *Engine) Run(ctx context.Context) error {
	e.Restore()
	if e.statePath != "" {
		lf, err := e.openLog()
		if err != nil {
			return err
		}
		e.tlog = lf
		defer func() { lf.Close(); e.tlog = nil }()
		// start from a snapshot that holds what was replayed
		if err := e.save(); err != nil {
			e.log.Error("rules: cannot save alert state", "err", err)
		}
	}
	e.started = e.now()
	t := time.NewTicker(e.cfg.Tick)
	defer t.Stop()
	lastSave := time.Now()
	for {
		select {
		case <-ctx.Done():
			return errors.Join(e.logAndNotify(), e.save())
		case <-e.saveSoon:
			if err := e.logAndNotify(); err != nil {
				e.log.Error("rules: cannot log an alert transition", "err", err)
			}
		case <-t.C:
			e.Tick(e.now())
			if time.Since(lastSave) >= 5*time.Second {
				if err := e.save(); err != nil {
					e.log.Error("rules: cannot save alert state", "err", err)
				}
				lastSave = time.Now()
			}
		}
	}
}
