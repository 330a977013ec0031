package rules

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/devices"
	"github.com/citypulse/citypulse/pipeline"
)

// Config is the rules section of the server config.
type Config struct {
	Enabled bool   `mapstructure:"enabled" yaml:"enabled"`
	File    string `mapstructure:"file" yaml:"file"` // configs/rules.yaml
	// Tick is how often hold-off timers, deadman and fleet rules are checked.
	Tick time.Duration `mapstructure:"tick" yaml:"tick"`
	// FlapWindow and FlapMax: more than FlapMax transitions within FlapWindow
	// make an alert "flapping".
	FlapWindow time.Duration `mapstructure:"flap_window" yaml:"flap_window"`
	FlapMax    int           `mapstructure:"flap_max" yaml:"flap_max"`
	Notify     NotifyConfig  `mapstructure:"notify" yaml:"notify"`
}

// Default returns the defaults.
func Default() Config {
	return Config{Enabled: true, File: "configs/rules.yaml", Tick: time.Second, FlapWindow: 10 * time.Minute, FlapMax: 4,
		Notify: DefaultNotify()}
}

// Validate checks the section; messages name the key.
func (c Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	var errs []error
	if c.File == "" {
		errs = append(errs, errors.New("rules.file must not be empty"))
	}
	if c.Tick < 100*time.Millisecond || c.Tick > time.Minute {
		errs = append(errs, fmt.Errorf("rules.tick must be between 100ms and 1m, got %v", c.Tick))
	}
	if c.FlapMax < 0 || (c.FlapMax > 0 && c.FlapWindow <= 0) {
		errs = append(errs, errors.New("rules.flap_max must be >= 0 and rules.flap_window > 0"))
	}
	errs = append(errs, c.Notify.Validate())
	return errors.Join(errs...)
}

// Notifier receives alert events; it must not block (the shard loop calls it).
type Notifier interface {
	Enqueue(ev Event)
}

// Event is one notification: an alert and what happened to it.
type Event struct {
	Kind        string            `json:"kind"` // firing, resolved, repeat, flapping
	At          time.Time         `json:"at"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	StartsAt    time.Time         `json:"starts_at"`
	EndsAt      time.Time         `json:"ends_at"`
	Fingerprint string            `json:"fingerprint"`
	// Key identifies the (alert, transition): the receiver's idempotency key.
	Key string `json:"key"`
}

// alertKey identifies an alert: a rule and a series (or a district, for fleet rules).
type alertKey struct {
	Rule     string `json:"rule"`
	Device   string `json:"device"`
	Metric   string `json:"metric"`
	District string `json:"district"`
	Kind     string `json:"kind"`
}

type alert struct {
	key   alertKey
	state State
}

// ruleShard holds the alert states of the devices of one pipeline shard. The
// shard loop and the tick share it under mu (the tick is rare).
type ruleShard struct {
	mu       sync.Mutex
	alerts   map[alertKey]*alert
	lastSeen map[string]time.Time
	gen      uint64
	cand     map[[3]string][]*Rule // (kind, metric, district) → rules that may match
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
	shardOf   func(device string) int
	devs      devicesView
	notifier  Notifier
	statePath string
	dur       Durability
	now       func() time.Time
	flap      FlapPolicy
	started   time.Time
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
}

// heldTransition is a notification and its log record (the alert's state
// right after the transition, encoded in the shard loop that owns it).
type heldTransition struct {
	ev     Event
	record []byte
}

// logRecord is one line of the transition log.
type logRecord struct {
	Seq   uint64   `json:"seq"`
	Key   alertKey `json:"key"`
	State State    `json:"state"`
}

type devicesView interface {
	List() []devices.Device
	Get(id string) (devices.Device, bool)
}

type engineMetrics struct {
	transitions *prometheus.CounterVec
	firing      prometheus.GaugeFunc
	evals       prometheus.Counter
}

// NewEngine builds the engine for a pipeline of shards shards; statePath is
// where alert states are persisted ("" for none: transitions then go to the
// notifier at once), written by dur (the pipeline's fsync policy). It starts
// nothing.
func NewEngine(cfg Config, rules []*Rule, devs devicesView, shards int, n Notifier, statePath string, dur Durability, log *slog.Logger, reg prometheus.Registerer) *Engine {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{cfg: cfg, log: log, devs: devs, notifier: n, statePath: statePath, dur: dur, now: time.Now, saveSoon: make(chan struct{}, 1),
		flap: FlapPolicy{Window: cfg.FlapWindow, Max: cfg.FlapMax}}
	e.rules.Store(&rules)
	for i := 0; i < shards; i++ {
		e.shards = append(e.shards, &ruleShard{alerts: map[alertKey]*alert{}, lastSeen: map[string]time.Time{}})
	}
	e.shardOf = func(device string) int {
		h := uint32(2166136261)
		for i := 0; i < len(device); i++ {
			h ^= uint32(device[i])
			h *= 16777619
		}
		return int(h % uint32(len(e.shards)))
	}
	e.m = &engineMetrics{
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_rules_transitions_total", Help: "Alert transitions notified, by kind."}, []string{"kind"}),
		evals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_rules_evaluations_total", Help: "Rule evaluations on readings."}),
	}
	e.m.firing = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "citypulse_rules_alerts_firing", Help: "Alerts firing now."}, func() float64 { return float64(e.count(Firing)) })
	if reg != nil {
		reg.MustRegister(e.m.transitions, e.m.firing, e.m.evals)
	}
	return e
}

// SetShardFunc makes the engine shard its state like the pipeline (call before
// Run): a device's state then lives with the shard loop that evaluates it.
func (e *Engine) SetShardFunc(f func(device string) int) { e.shardOf = f }

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
func (e *Engine) Observe(shard int, rs []pipeline.Reading) {
	if len(rs) == 0 {
		return
	}
	s := e.shards[shard%len(e.shards)]
	s.mu.Lock()
	defer s.mu.Unlock()
	if g := e.gen.Load(); s.cand == nil || s.gen != g {
		s.cand, s.gen = map[[3]string][]*Rule{}, g
	}
	rules := e.Rules()
	for i := range rs {
		r := &rs[i]
		t := time.Unix(0, r.Received)
		if r.Kind != CityKind {
			s.lastSeen[r.Device] = t
		}
		ck := [3]string{r.Kind, r.Metric, r.District}
		cand, ok := s.cand[ck]
		if !ok {
			for _, rule := range rules {
				if rule.Type != TypeFleet && globMatch(rule.Select.Kind, r.Kind) && globMatch(rule.Select.District, r.District) &&
					(rule.Type == TypeDeadman || globMatch(rule.Select.Metric, r.Metric)) {
					cand = append(cand, rule)
				}
			}
			if len(s.cand) > 1<<16 {
				clear(s.cand) // bounded: many districts × metrics
			}
			s.cand[ck] = cand
		}
		for _, rule := range cand {
			if rule.Select.Device != "" && !globMatch(rule.Select.Device, r.Device) {
				continue
			}
			e.m.evals.Inc()
			if rule.Type == TypeDeadman {
				// A reading means the device is alive.
				k := alertKey{Rule: rule.Name, Device: r.Device, District: r.District, Kind: r.Kind}
				if a := s.alerts[k]; a != nil {
					e.emit(a, rule, a.state.Step(rule, false, t, e.flap))
				}
				continue
			}
			k := alertKey{Rule: rule.Name, Device: r.Device, Metric: r.Metric, District: r.District, Kind: r.Kind}
			a := s.alerts[k]
			if a == nil {
				a = &alert{key: k}
				s.alerts[k] = a
			}
			// The condition (a rate rule's window) goes by when the reading was
			// measured, so a backlog replayed after an outage is judged on when
			// things happened; the lifecycle goes by arrival.
			bad, delta := rule.condition(&a.state, r.Value, measuredAt(r))
			a.state.Value, a.state.Delta = r.Value, delta
			if tr := a.state.Step(rule, bad, t, e.flap); len(tr) > 0 {
				e.emit(a, rule, tr)
			}
			if !a.state.Bad && a.state.Phase == Inactive && !a.state.Flapping && a.state.Rate.IsZero() {
				delete(s.alerts, k) // nothing to remember
			}
		}
	}
}

// Tick advances every alert with time alone and evaluates deadman and fleet rules.
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
	silentOf := func(d devices.Device, factor float64) bool {
		limit := time.Duration(factor * float64(d.Interval))
		s := e.shards[e.shardOf(d.ID)%len(e.shards)]
		last, ok := s.lastSeen[d.ID]
		if !ok {
			// Never heard from (since start, or in the saved state): silent
			// once it has had the same chance to report as any other.
			return !e.started.IsZero() && now.Sub(e.started) > limit
		}
		return now.Sub(last) > limit
	}
	for _, s := range e.shards {
		s.mu.Lock()
	}
	for _, r := range deadman {
		for _, d := range list {
			if !r.Select.Matches(string(d.Kind), "", d.District, d.ID) {
				continue
			}
			silent := silentOf(d, r.Factor)
			s := e.shards[e.shardOf(d.ID)%len(e.shards)]
			k := alertKey{Rule: r.Name, Device: d.ID, District: d.District, Kind: string(d.Kind)}
			a := s.alerts[k]
			if a == nil {
				if !silent {
					continue
				}
				a = &alert{key: k}
				s.alerts[k] = a
			}
			a.state.Value = now.Sub(s.lastSeen[d.ID]).Seconds()
			e.emit(a, r, a.state.Step(r, silent, now, e.flap))
		}
	}
	for _, r := range fleet {
		type agg struct{ total, silent int }
		groups := map[string]*agg{}
		for _, d := range list {
			if !r.Select.Matches(string(d.Kind), "", d.District, d.ID) {
				continue
			}
			g := groups[d.District]
			if g == nil {
				g = &agg{}
				groups[d.District] = g
			}
			g.total++
			if silentOf(d, r.Factor) {
				g.silent++
			}
		}
		for district, g := range groups {
			s := e.shards[e.shardOf(district)%len(e.shards)]
			k := alertKey{Rule: r.Name, District: district, Kind: r.Select.Kind}
			ratio := float64(g.silent) / float64(g.total)
			bad := ratio > r.SilentRatio
			a := s.alerts[k]
			if a == nil {
				if !bad {
					continue
				}
				a = &alert{key: k}
				s.alerts[k] = a
			}
			a.state.Value = ratio
			e.emit(a, r, a.state.Step(r, bad, now, e.flap))
		}
	}
	byName := make(map[string]*Rule, len(rules))
	for _, r := range rules {
		byName[r.Name] = r
	}
	for _, s := range e.shards {
		for k, a := range s.alerts {
			r := byName[k.Rule]
			if r == nil {
				continue
			}
			if r.Type != TypeDeadman && r.Type != TypeFleet {
				e.emit(a, r, a.state.Advance(r, now, e.flap))
			}
		}
	}
	for _, s := range e.shards {
		s.mu.Unlock()
	}
}

// labels returns an alert's labels.
func (a *alert) labels(r *Rule) map[string]string {
	l := map[string]string{"alertname": r.Name, "severity": r.Severity}
	for k, v := range r.Labels {
		l[k] = v
	}
	for k, v := range map[string]string{"device": a.key.Device, "metric": a.key.Metric, "district": a.key.District, "kind": a.key.Kind} {
		if v != "" && (k != "device" || v != CityDevice) {
			l[k] = v
		}
	}
	return l
}

// Fingerprint hashes sorted labels, like Alertmanager's.
func Fingerprint(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	for _, k := range keys {
		h.Write([]byte(k))
		h.Write([]byte{0xff})
		h.Write([]byte(l[k]))
		h.Write([]byte{0xff})
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

func (e *Engine) emit(a *alert, r *Rule, trs []Transition) {
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
		labels := a.labels(r)
		if tr.Kind == NotifyFlapping {
			labels["flapping"] = "true"
		}
		var threshold float64
		switch {
		case r.Above != nil:
			threshold = *r.Above
		case r.Below != nil:
			threshold = *r.Below
		case r.Drop != nil:
			threshold = *r.Drop
		case r.Rise != nil:
			threshold = *r.Rise
		case r.Type == TypeFleet:
			threshold = r.SilentRatio
		}
		ev := Event{Kind: tr.Kind, At: tr.At, Labels: labels, StartsAt: a.state.FiredAt,
			Annotations: r.annotate(TemplateData{Rule: r.Name, Device: a.key.Device, District: a.key.District, Kind: a.key.Kind,
				Metric: a.key.Metric, Value: a.state.Value, Threshold: threshold, Delta: a.state.Delta, Window: r.Window, Labels: labels})}
		if tr.Kind == NotifyResolved {
			ev.EndsAt = tr.At
		}
		ev.Fingerprint = Fingerprint(labels)
		ev.Key = ev.Fingerprint + "-" + tr.Kind + "-" + strconv.FormatInt(tr.At.UnixNano(), 36)
		e.m.transitions.WithLabelValues(tr.Kind).Inc()
		switch {
		case e.notifier == nil:
		case e.statePath == "":
			e.notifier.Enqueue(ev)
		default:
			rec, err := json.Marshal(logRecord{Seq: e.seq.Add(1), Key: a.key, State: a.state})
			if err != nil { // cannot happen for these types; notify all the same
				e.log.Error("rules: cannot encode a transition", "err", err)
			}
			e.heldMu.Lock()
			e.held = append(e.held, heldTransition{ev: ev, record: rec})
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

// AlertView is an alert as the API shows it.
type AlertView struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	State       string            `json:"state"`
	ActiveAt    time.Time         `json:"activeAt"`
	Value       string            `json:"value"`
	Flapping    bool              `json:"flapping,omitempty"`
}

// Alerts returns the pending and firing alerts.
func (e *Engine) Alerts() []AlertView {
	var out []AlertView
	for _, s := range e.shards {
		s.mu.Lock()
		for _, a := range s.alerts {
			r := e.rule(a.key.Rule)
			if r == nil || a.state.Phase == Inactive {
				continue
			}
			l := a.labels(r)
			out = append(out, AlertView{Labels: l, State: a.state.Phase.String(), ActiveAt: a.state.ActiveAt,
				Value: strconv.FormatFloat(a.state.Value, 'g', -1, 64), Flapping: a.state.Flapping,
				Annotations: r.annotate(TemplateData{Rule: r.Name, Device: a.key.Device, District: a.key.District, Kind: a.key.Kind,
					Metric: a.key.Metric, Value: a.state.Value, Delta: a.state.Delta, Window: r.Window, Labels: l})})
		}
		s.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return Fingerprint(out[i].Labels) < Fingerprint(out[j].Labels) })
	return out
}

type persisted struct {
	Key   alertKey `json:"key"`
	State State    `json:"state"`
}

type stateFile struct {
	// Seq is the last transition number the snapshot holds; the transition
	// log's records after it are replayed on top.
	Seq      uint64               `json:"seq"`
	Alerts   []persisted          `json:"alerts"`
	LastSeen map[string]time.Time `json:"last_seen"`
}

// save writes the alert states (and when devices were last seen), so that a
// restart neither forgets a firing alert nor notifies it again.
func (e *Engine) save() error {
	if e.statePath == "" {
		return nil
	}
	var f stateFile
	// Read before the scan: every transition numbered up to here changed its
	// alert (under the shard lock) before it was numbered, so the scan sees it.
	f.Seq = e.seq.Load()
	f.LastSeen = map[string]time.Time{}
	for _, s := range e.shards {
		s.mu.Lock()
		for _, a := range s.alerts {
			f.Alerts = append(f.Alerts, persisted{Key: a.key, State: a.state.clone()}) // encoded after the unlock
		}
		for d, t := range s.lastSeen {
			f.LastSeen[d] = t
		}
		s.mu.Unlock()
	}
	// Run created the directory when it opened the transition log.
	if err := storeJSON(e.statePath, f, e.dur.fsyncEach()); err != nil {
		return err
	}
	// The snapshot holds every logged transition (Run logs the held ones
	// before it saves, and only Run writes either file).
	if e.tlog != nil {
		if err := e.tlog.Truncate(0); err != nil {
			return fmt.Errorf("truncate the transition log: %w", err)
		}
	}
	return nil
}

func (e *Engine) logPath() string { return strings.TrimSuffix(e.statePath, ".json") + ".log" }

// logAndNotify appends the held transitions to the transition log (one
// write(2), fsynced by the policy), then hands them to the notifier. If the
// log cannot be written they are notified all the same: an alert that might
// repeat after a crash beats an alert never sent.
func (e *Engine) logAndNotify() error {
	e.heldMu.Lock()
	held := e.held
	e.held = nil
	e.heldMu.Unlock()
	if len(held) == 0 {
		return nil
	}
	var err error
	if e.tlog != nil {
		var buf []byte
		for _, h := range held {
			buf = append(append(buf, h.record...), '\n')
		}
		if _, err = e.tlog.Write(buf); err == nil && e.dur.fsyncEach() {
			err = e.tlog.Sync()
		}
	}
	for _, h := range held {
		e.notifier.Enqueue(h.ev)
	}
	if err != nil {
		return fmt.Errorf("write the transition log: %w", err)
	}
	return nil
}

// load restores the states saved by save.
func (e *Engine) load() error {
	if e.statePath == "" {
		return nil
	}
	b, err := os.ReadFile(e.statePath)
	if errors.Is(err, os.ErrNotExist) {
		b, err = []byte(`{}`), nil
	}
	if err != nil {
		return err
	}
	var f stateFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("alert state %s is damaged (%v); starting without it", e.statePath, err)
	}
	for _, p := range f.Alerts {
		e.putAlert(p.Key, p.State)
	}
	for d, t := range f.LastSeen {
		s := e.shards[e.shardOf(d)%len(e.shards)]
		s.mu.Lock()
		s.lastSeen[d] = t
		s.mu.Unlock()
	}
	e.seq.Store(f.Seq)
	return nil
}

// putAlert restores one alert into the shard that owns its device (or, for
// district alerts, its district).
func (e *Engine) putAlert(k alertKey, st State) {
	owner := k.Device
	if owner == "" {
		owner = k.District
	}
	s := e.shards[e.shardOf(owner)%len(e.shards)]
	s.mu.Lock()
	s.alerts[k] = &alert{key: k, state: st}
	s.mu.Unlock()
}

// Restore loads the saved alert states (the snapshot, then the transition log
// on top); what cannot be read is logged and left out. Call it before the
// first Observe (serve does, before the pipeline starts); Run calls it if no
// one did. It runs once.
func (e *Engine) Restore() { e.restored.Do(e.restore) }

func (e *Engine) restore() {
	if err := e.load(); err != nil {
		e.log.Warn("rules: "+err.Error(), "file", e.statePath)
	}
	if e.statePath == "" {
		return
	}
	f, err := os.Open(e.logPath())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		e.log.Warn("rules: cannot read the transition log", "err", err)
		return
	}
	defer f.Close()
	applied, skipped := e.replayLog(f)
	if skipped > 0 {
		e.log.Warn("rules: the transition log has damaged or torn lines; replayed the others",
			"file", e.logPath(), "applied", applied, "skipped_lines", skipped)
	}
}

// replayLog applies the transition log's records newer than the snapshot, in
// order. A line that does not parse (a write torn by a crash, or damage) is
// skipped and counted; empty lines are ignored.
func (e *Engine) replayLog(r io.Reader) (applied, skipped int) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	snap := e.seq.Load()
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var rec logRecord
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil || rec.Key.Rule == "" {
			skipped++
			continue
		}
		if rec.Seq <= snap {
			continue
		}
		e.putAlert(rec.Key, rec.State)
		if rec.Seq > e.seq.Load() {
			e.seq.Store(rec.Seq)
		}
		applied++
	}
	if sc.Err() != nil {
		skipped++
	}
	return applied, skipped
}

// Run restores the saved state (the snapshot, then the transition log on top),
// then ticks until ctx is done. Every transition is appended to the log
// before it is notified; a snapshot of every alert is written every few
// seconds and at the end, and then the log starts afresh.
func (e *Engine) Run(ctx context.Context) error {
	e.Restore()
	if e.statePath != "" {
		if err := os.MkdirAll(filepath.Dir(e.statePath), 0o755); err != nil {
			return err
		}
		lf, err := os.OpenFile(e.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("open the transition log: %w", err)
		}
		// A torn last line (a crash mid-write) must not swallow the next record.
		if st, err := lf.Stat(); err == nil && st.Size() > 0 {
			if _, err := lf.Write([]byte{'\n'}); err != nil {
				lf.Close()
				return fmt.Errorf("open the transition log: %w", err)
			}
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
