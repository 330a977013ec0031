package rules

import (
	"net/http"
	"sort"
	"strconv"
	"time"

	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/notifier"
)

// API serves the rules, the alerts and the outbox in the Prometheus API shape,
// so that Grafana lists them:
//
//	GET /api/v1/rules   {"status":"success","data":{"groups":[…]}}
//	GET /api/v1/alerts  {"status":"success","data":{"alerts":[…]}}
//	GET /api/v1/outbox  pending and dead-letter notifications per receiver
type API struct {
	e        *Engine
	o        OutboxLister
	file     string
	decorate func(*AlertView)
}

// OutboxLister is what the API needs of the outbox (*notifier.Outbox).
type OutboxLister interface {
	Status() []notifier.Status
}

// NewAPI returns the API over e and o (o may be nil: no outbox). decorate,
// when not nil, adds what operators decided about each alert (silenced,
// acknowledged) before it is shown.
func NewAPI(e *Engine, o OutboxLister, file string, decorate func(*AlertView)) *API {
	return &API{e: e, o: o, file: file, decorate: decorate}
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
			out = append(out, view(s, a, r))
		}
		s.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return Fingerprint(out[i].Labels) < Fingerprint(out[j].Labels) })
	return out
}

// Alerts handles GET /api/v1/alerts.
func (a *API) Alerts(w http.ResponseWriter, _ *http.Request) {
	alerts := a.e.Alerts()
	if alerts == nil {
		alerts = []AlertView{}
	}
	if a.decorate != nil {
		for i := range alerts {
			a.decorate(&alerts[i])
		}
	}
	httpapi.WriteData(w, http.StatusOK, map[string]any{"alerts": alerts})
}

type ruleView struct {
	State          string            `json:"state"`
	Name           string            `json:"name"`
	Query          string            `json:"query"`
	Duration       float64           `json:"duration"`
	KeepFiringFor  float64           `json:"keepFiringFor"`
	Labels         map[string]string `json:"labels"`
	Annotations    map[string]string `json:"annotations"`
	Alerts         []AlertView       `json:"alerts"`
	Health         string            `json:"health"`
	Type           string            `json:"type"`
	LastEvaluation time.Time         `json:"lastEvaluation"`
	EvaluationTime float64           `json:"evaluationTime"`
}

// Rules handles GET /api/v1/rules.
func (a *API) Rules(w http.ResponseWriter, _ *http.Request) {
	alerts := a.e.Alerts()
	var views []ruleView
	for _, r := range a.e.Rules() {
		v := ruleView{Name: r.Name, Query: describe(r), Duration: r.For.Seconds(), KeepFiringFor: r.ClearFor.Seconds(),
			Labels: map[string]string{"severity": r.Severity}, Annotations: r.Annotations, Alerts: []AlertView{},
			Health: "ok", Type: "alerting", State: "inactive", LastEvaluation: time.Now()}
		for k, val := range r.Labels {
			v.Labels[k] = val
		}
		for _, al := range alerts {
			if al.Labels["alertname"] != r.Name {
				continue
			}
			v.Alerts = append(v.Alerts, al)
			if al.State == "firing" || v.State == "inactive" {
				v.State = al.State
			}
		}
		views = append(views, v)
	}
	if views == nil {
		views = []ruleView{}
	}
	httpapi.WriteData(w, http.StatusOK, map[string]any{"groups": []any{map[string]any{
		"name": "citypulse", "file": a.file, "rules": views, "interval": a.e.cfg.Tick.Seconds(),
		"lastEvaluation": time.Now(), "evaluationTime": 0,
	}}})
}

// Outbox handles GET /api/v1/outbox.
func (a *API) Outbox(w http.ResponseWriter, _ *http.Request) {
	if a.o == nil {
		httpapi.WriteData(w, http.StatusOK, []notifier.Status{})
		return
	}
	httpapi.WriteData(w, http.StatusOK, a.o.Status())
}

// describe renders a rule as a readable expression for the "query" field.
func describe(r *Rule) string {
	sel := r.Select.Kind + "_" + r.Select.Metric
	if r.Select.Kind == "" {
		sel = "any device"
	}
	f := func(x float64) string { return strconv.FormatFloat(x, 'g', -1, 64) }
	switch r.Type {
	case TypeThreshold:
		switch {
		case r.Above != nil:
			return sel + " > " + f(*r.Above)
		case r.Below != nil:
			return sel + " < " + f(*r.Below)
		default:
			return sel + " outside [" + f(r.Outside[0]) + ", " + f(r.Outside[1]) + "]"
		}
	case TypeRate:
		if r.Drop != nil {
			return sel + " drops more than " + f(*r.Drop) + " within " + r.Window.String()
		}
		return sel + " rises more than " + f(*r.Rise) + " within " + r.Window.String()
	case TypeState:
		return sel + " == " + r.Equals
	case TypeDeadman:
		return sel + " silent for " + f(r.Factor) + " x its interval"
	case TypeFleet:
		return "share of " + r.Select.Kind + " devices silent per district > " + f(r.SilentRatio)
	}
	return r.Type
}
