package rules

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
	"strconv"
	"time"

	"github.com/citypulse/citypulse/notifier"
)

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

// threshold is the value a rule compares with, for the templates' .Threshold.
func (r *Rule) threshold() float64 {
	switch {
	case r.Above != nil:
		return *r.Above
	case r.Below != nil:
		return *r.Below
	case r.Drop != nil:
		return *r.Drop
	case r.Rise != nil:
		return *r.Rise
	case r.Type == TypeFleet:
		return r.SilentRatio
	}
	return 0
}

// templateData is what alert a's annotations see. Both the notification and
// the API build it here, so they say the same. The caller holds s.mu, the
// lock of the shard that holds a.
func templateData(s *ruleShard, a *alert, r *Rule, labels map[string]string) TemplateData {
	d := TemplateData{Rule: r.Name, Device: a.key.Device, District: a.key.District, Kind: a.key.Kind,
		Metric: a.key.Metric, Value: a.state.Value, Threshold: r.threshold(), Delta: a.state.Delta, Window: r.Window, Labels: labels}
	if r.Type == TypeDeadman {
		_, seen := s.lastSeen[a.key.Device]
		d.NeverSeen = !seen
	}
	return d
}

// event builds the notification of transition tr of alert a (the caller
// holds s.mu).
func event(s *ruleShard, a *alert, r *Rule, tr Transition) notifier.Event {
	labels := a.labels(r)
	if tr.Kind == NotifyFlapping {
		labels["flapping"] = "true"
	}
	ev := notifier.Event{Kind: tr.Kind, At: tr.At, Labels: labels, StartsAt: a.state.FiredAt, ActiveAt: a.state.ActiveAt,
		Annotations: r.annotate(templateData(s, a, r, labels))}
	if tr.Kind == NotifyResolved {
		ev.EndsAt = tr.At
	}
	ev.Fingerprint = Fingerprint(labels)
	ev.Key = ev.Fingerprint + "-" + tr.Kind + "-" + strconv.FormatInt(tr.At.UnixNano(), 36)
	return ev
}

// AlertView is an alert as the API shows it. SilencedBy and Ack are filled
// in by the API's decorator (the operators' silences and acknowledgements).
type AlertView struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	State       string            `json:"state"`
	ActiveAt    time.Time         `json:"activeAt"`
	Value       string            `json:"value"`
	Flapping    bool              `json:"flapping,omitempty"`
	Fingerprint string            `json:"fingerprint"`
	SilencedBy  string            `json:"silencedBy,omitempty"`
	Ack         any               `json:"ack,omitempty"`
}

// view is alert a as the API shows it (the caller holds s.mu).
func view(s *ruleShard, a *alert, r *Rule) AlertView {
	l := a.labels(r)
	return AlertView{Labels: l, State: a.state.Phase.String(), ActiveAt: a.state.ActiveAt, Fingerprint: Fingerprint(l),
		Value: strconv.FormatFloat(a.state.Value, 'g', -1, 64), Flapping: a.state.Flapping,
		Annotations: r.annotate(templateData(s, a, r, l))}
}
