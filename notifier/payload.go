package notifier

import (
	"encoding/json"
	"strings"
	"time"
)

// webhookMessage is the Alertmanager webhook payload (version 4).
type webhookMessage struct {
	Version           string            `json:"version"`
	GroupKey          string            `json:"groupKey"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Status            string            `json:"status"`
	Receiver          string            `json:"receiver"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	ExternalURL       string            `json:"externalURL"`
	Alerts            []webhookAlert    `json:"alerts"`
}

type webhookAlert struct {
	Status       string            `json:"status"`
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       time.Time         `json:"endsAt"`
	GeneratorURL string            `json:"generatorURL"`
	Fingerprint  string            `json:"fingerprint"`
}

// postableAlert is one alert of Alertmanager's POST /api/v2/alerts.
type postableAlert struct {
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       *time.Time        `json:"endsAt,omitempty"`
	GeneratorURL string            `json:"generatorURL"`
}

// encode returns the request target and body of ev for receiver r.
func encode(r ReceiverConfig, ev Event, externalURL string) (target string, body []byte, err error) {
	gen := externalURL + "/api/v1/alerts"
	if r.Type == "alertmanager" {
		a := postableAlert{Labels: ev.Labels, Annotations: ev.Annotations, StartsAt: ev.StartsAt, GeneratorURL: gen}
		if !ev.EndsAt.IsZero() {
			a.EndsAt = &ev.EndsAt
		}
		body, err = json.Marshal([]postableAlert{a})
		return strings.TrimRight(r.URL, "/") + "/api/v2/alerts", body, err
	}
	msg := webhookMessage{Version: "4", GroupKey: "{}:{alertname=\"" + ev.Labels["alertname"] + "\"}", Status: ev.status(),
		Receiver: r.Name, GroupLabels: map[string]string{"alertname": ev.Labels["alertname"]}, CommonLabels: ev.Labels,
		CommonAnnotations: ev.Annotations, ExternalURL: externalURL,
		Alerts: []webhookAlert{{Status: ev.status(), Labels: ev.Labels, Annotations: ev.Annotations, StartsAt: ev.StartsAt,
			EndsAt: ev.EndsAt, GeneratorURL: gen, Fingerprint: ev.Fingerprint}}}
	body, err = json.Marshal(msg)
	return r.URL, body, err
}
