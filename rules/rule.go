package rules

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"text/template"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/citypulse/citypulse/devices"
)

// Rule types.
const (
	TypeThreshold = "threshold" // above / below / outside, with a clear threshold (hysteresis)
	TypeRate      = "rate"      // change over a window: drop or rise
	TypeState     = "state"     // an enumerated metric equals a state
	TypeDeadman   = "deadman"   // a device silent for factor × its interval
	TypeFleet     = "fleet"     // more than a share of a district's devices of a kind silent
)

// Severities.
var severities = map[string]bool{"info": true, "warning": true, "critical": true}

// Selector picks readings by kind, metric, district and device (path.Match globs;
// empty matches everything). Kind "city" selects the vital-sign roll-ups.
type Selector struct {
	Kind     string `yaml:"kind"`
	Metric   string `yaml:"metric"`
	District string `yaml:"district"`
	Device   string `yaml:"device"`
}

func globMatch(pattern, s string) bool {
	if pattern == "" || pattern == "*" {
		return true
	}
	if !strings.ContainsAny(pattern, `*?[\`) {
		return pattern == s
	}
	ok, _ := path.Match(pattern, s)
	return ok
}

// Matches reports whether a reading of device/kind/district/metric is selected.
func (s Selector) Matches(kind, metric, district, device string) bool {
	return globMatch(s.Kind, kind) && globMatch(s.Metric, metric) && globMatch(s.District, district) && globMatch(s.Device, device)
}

// Rule is one alerting rule as written in rules.yaml.
type Rule struct {
	Name   string   `yaml:"name"`
	Type   string   `yaml:"type"`
	Select Selector `yaml:"select"`

	// threshold
	Above   *float64  `yaml:"above"`
	Below   *float64  `yaml:"below"`
	Outside []float64 `yaml:"outside"`  // [lo, hi]: fires outside
	Clear   *float64  `yaml:"clear"`    // threshold to clear (hysteresis); default: the firing threshold
	ClearIn []float64 `yaml:"clear_in"` // for outside: the range to come back into
	// rate
	Drop   *float64      `yaml:"drop"` // fires when the value fell by more than this within Window
	Rise   *float64      `yaml:"rise"`
	Window time.Duration `yaml:"window"`
	// state
	Equals       string `yaml:"equals"`        // a state name, e.g. "off", "flashing", "true"
	OutsideHours []int  `yaml:"outside_hours"` // [from, to] local hours when the state is fine (e.g. [22, 6])
	// deadman, fleet
	Factor      float64 `yaml:"factor"`       // silent for factor × the device's interval (default 3)
	SilentRatio float64 `yaml:"silent_ratio"` // fleet: share of silent devices that fires

	For            time.Duration     `yaml:"for"`       // hold-off before firing
	ClearFor       time.Duration     `yaml:"clear_for"` // hold-off before resolving (default 0: at once)
	Severity       string            `yaml:"severity"`
	Labels         map[string]string `yaml:"labels"`
	Annotations    map[string]string `yaml:"annotations"`
	RepeatInterval time.Duration     `yaml:"repeat_interval"` // re-notify while firing (0: never)

	templates map[string]*template.Template
	stateIdx  float64
}

// File is the layout of rules.yaml.
type File struct {
	Rules []Rule `yaml:"rules"`
}

// LoadRules reads and validates a rules file.
func LoadRules(p string) ([]*Rule, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read rules: %w", err)
	}
	return ParseRules(b, p)
}

// ParseRules parses and validates rules; name is used in messages.
func ParseRules(b []byte, name string) ([]*Rule, error) {
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse %s: %w", name, err)
	}
	seen := map[string]bool{}
	out := make([]*Rule, 0, len(f.Rules))
	for i := range f.Rules {
		r := &f.Rules[i]
		if err := r.compile(); err != nil {
			return nil, fmt.Errorf("%s: rules[%d] (%s): %w", name, i, r.Name, err)
		}
		if seen[r.Name] {
			return nil, fmt.Errorf("%s: rules[%d]: name %q is used twice", name, i, r.Name)
		}
		seen[r.Name] = true
		out = append(out, r)
	}
	return out, nil
}

func (r *Rule) compile() error {
	if !nameRE.MatchString(r.Name) {
		return fmt.Errorf("name %q: want [a-z][a-z0-9_]*", r.Name)
	}
	if r.Severity == "" {
		r.Severity = "warning"
	}
	if !severities[r.Severity] {
		return fmt.Errorf("severity %q: want info, warning or critical", r.Severity)
	}
	if r.For < 0 || r.ClearFor < 0 || r.RepeatInterval < 0 {
		return errors.New("for, clear_for and repeat_interval must not be negative")
	}
	switch r.Type {
	case TypeThreshold:
		if err := r.checkThreshold(); err != nil {
			return err
		}
	case TypeRate:
		if (r.Drop == nil) == (r.Rise == nil) {
			return errors.New("a rate rule needs exactly one of drop, rise")
		}
		if r.Window <= 0 || r.Window > time.Hour {
			return errors.New("a rate rule needs a window in (0, 1h]")
		}
	case TypeState:
		if err := r.compileState(); err != nil {
			return err
		}
	case TypeDeadman, TypeFleet:
		if r.Factor == 0 {
			r.Factor = 3
		}
		if r.Factor < 1 {
			return errors.New("factor must be >= 1")
		}
		if r.Type == TypeFleet && (r.SilentRatio <= 0 || r.SilentRatio >= 1) {
			return errors.New("a fleet rule needs silent_ratio in (0, 1)")
		}
	default:
		return fmt.Errorf("type %q: want threshold, rate, state, deadman or fleet", r.Type)
	}
	r.templates = map[string]*template.Template{}
	for k, v := range r.Annotations {
		t, err := template.New(k).Option("missingkey=error").Parse(v)
		if err != nil {
			return fmt.Errorf("annotation %s: %w", k, err)
		}
		r.templates[k] = t
	}
	return nil
}

// TemplateData is what annotation templates see:
// "Pressure at {{.Device}} ({{.District}}) fell {{printf \"%.0f\" .Delta}} kPa in {{.Window}}".
//
// For a deadman rule .Value is the seconds since the device's last reading;
// for a device that has not reported since CityPulse started watching it (at
// the start, or when it was added at run time), .NeverSeen is true and .Value
// is the seconds since then.
type TemplateData struct {
	Rule, Device, District, Kind, Metric string
	Value, Threshold, Delta              float64
	Window                               time.Duration
	Labels                               map[string]string
	NeverSeen                            bool
}

func (r *Rule) annotate(d TemplateData) map[string]string {
	out := make(map[string]string, len(r.templates))
	for k, t := range r.templates {
		var b strings.Builder
		if err := t.Execute(&b, d); err != nil {
			out[k] = r.Annotations[k] + " (template error: " + err.Error() + ")"
			continue
		}
		out[k] = b.String()
	}
	return out
}

// checkThreshold checks the thresholds of a threshold rule.
func (r *Rule) checkThreshold() error {
	n := 0
	for _, set := range []bool{r.Above != nil, r.Below != nil, r.Outside != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return errors.New("a threshold rule needs exactly one of above, below, outside")
	}
	if r.Outside != nil && (len(r.Outside) != 2 || r.Outside[0] > r.Outside[1]) {
		return errors.New("outside: want [lo, hi] with lo <= hi")
	}
	if r.ClearIn != nil && (r.Outside == nil || len(r.ClearIn) != 2 || r.ClearIn[0] < r.Outside[0] || r.ClearIn[1] > r.Outside[1]) {
		return errors.New("clear_in: want [lo, hi] inside outside")
	}
	if r.Clear != nil && r.Above != nil && *r.Clear > *r.Above {
		return fmt.Errorf("clear %v must be <= above %v (hysteresis)", *r.Clear, *r.Above)
	}
	if r.Clear != nil && r.Below != nil && *r.Clear < *r.Below {
		return fmt.Errorf("clear %v must be >= below %v (hysteresis)", *r.Clear, *r.Below)
	}
	return nil
}

// compileState checks a state rule and resolves the state it compares with.
func (r *Rule) compileState() error {
	if r.Equals == "" {
		return errors.New("a state rule needs equals")
	}
	if r.OutsideHours != nil && (len(r.OutsideHours) != 2 || r.OutsideHours[0] < 0 || r.OutsideHours[0] > 23 || r.OutsideHours[1] < 0 || r.OutsideHours[1] > 23) {
		return errors.New("outside_hours: want [from, to] hours 0-23")
	}
	if r.Select.Kind == "" || strings.ContainsAny(r.Select.Kind+r.Select.Metric, "*?[") || r.Select.Metric == "" {
		return errors.New("a state rule needs an exact select.kind and select.metric")
	}
	s, ok := devices.SchemaOf(devices.Kind(r.Select.Kind))
	if !ok {
		return fmt.Errorf("unknown kind %q", r.Select.Kind)
	}
	m, ok := s.Metric(r.Select.Metric)
	if !ok || m.Type != devices.State {
		return fmt.Errorf("%s %s is not an enumerated metric", r.Select.Kind, r.Select.Metric)
	}
	idx, ok := m.StateIndex(r.Equals)
	if !ok {
		return fmt.Errorf("equals %q: want one of %v", r.Equals, m.States)
	}
	r.stateIdx = idx
	return nil
}
