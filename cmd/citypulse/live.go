package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/citypulse/citypulse/clusterstate"
	"github.com/citypulse/citypulse/history"
	"github.com/citypulse/citypulse/internal/durable"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/opendata"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
	"github.com/citypulse/citypulse/signals"
	"github.com/citypulse/citypulse/silence"
	"github.com/citypulse/citypulse/stream"
)

// buildLive builds what the operations centre and the public see live: the
// event stream of the operations screen, the operators' silences and
// acknowledgements, the public guidance feed and the green-wave analysis.
// It runs before the rules and the pipeline, which feed them.
func (s *server) buildLive() error {
	cfg := s.cfg
	s.events = stream.New(stream.Options{MaxClients: cfg.HTTP.MaxConnections, Registerer: s.reg, Subsystem: "events"})
	var err error
	if cfg.Cluster.Enabled { // every node's: in a key-value bucket (buildClusterState runs it)
		s.cstate = &clusterState{silences: clusterstate.NewSilences(clusterstate.SilencesOptions{
			Bucket: cfg.Cluster.State.Silences, Replicas: cfg.Cluster.State.Replicas,
			Logger: s.log.With("component", "silences"), Registerer: s.reg})}
		s.silences = s.cstate.silences.Store()
	} else if s.silences, err = silence.Open(filepath.Join(cfg.DataDir, "silences.json"), nil); err != nil {
		return err
	}
	if cfg.OpenData.Enabled {
		if cfg.OpenData.IDKey == "" {
			if cfg.OpenData.IDKey, err = publicIDKey(filepath.Join(cfg.DataDir, "opendata-id.key")); err != nil {
				return err
			}
		}
		s.feed = opendata.New(opendata.Options{Config: cfg.OpenData, Devices: s.devices,
			Logger: s.log.With("component", "opendata"), Registerer: s.reg})
	}
	if cfg.Signals.Enabled {
		var cs []signals.Corridor
		if cfg.Signals.File != "" {
			if cs, err = signals.LoadCorridors(cfg.Signals.File); err != nil {
				return err
			}
		}
		s.signals = signals.New(cs, cfg.Signals.Interval, s.log.With("component", "signals"))
	}
	return nil
}

// notifierFor is what the rules engine notifies: the alert history and the
// live stream always (the operations screen shows every transition), the
// outbox unless an active silence matches the alert.
func (s *server) notifierFor(outbox *notifier.Outbox) rules.Notifier {
	s.gate = silence.NewGate(s.silences, silence.GateFuncs[notifier.Event]{
		Labels:   func(ev notifier.Event) map[string]string { return ev.Labels },
		Key:      func(ev notifier.Event) string { return ev.Fingerprint },
		Resolved: isResolved,
	}, outbox, s.reg)
	return s.alertNotifier()
}

// alertNotifier is what every alert of the server is notified through (the
// rules' and the operations alerts', e.g. the standby's RPO alert), once
// notifierFor has built the gate.
func (s *server) alertNotifier() liveNotifier {
	return liveNotifier{next: s.gate, events: s.events, history: s.history, silences: s.silences, resolved: isResolved}
}

func isResolved(ev notifier.Event) bool { return ev.Kind == notifier.KindResolved }

// liveNotifier hands an alert event to next, records it in the alert
// history (with the silence that holds its notification back) and publishes
// it on the stream.
type liveNotifier struct {
	next     rules.Notifier
	events   *stream.Hub
	history  *history.Store
	silences *silence.Store
	resolved func(notifier.Event) bool
}

func (n liveNotifier) Enqueue(ev notifier.Event) {
	var by string
	if id, ok := n.silences.Silenced(ev.Labels); ok && !n.resolved(ev) {
		by = id
	}
	n.history.Record(ev, by)
	n.next.Enqueue(ev)
	if b, err := json.Marshal(ev); err == nil {
		n.events.Publish(stream.Event{Topic: "alert", Name: "alert", Data: b})
	}
}

// liveSubmitter submits readings to the pipeline and publishes the vital
// signs among them on the stream once they are journaled.
type liveSubmitter struct {
	pipe   *pipeline.Pipeline
	events *stream.Hub
}

type vitalSample struct {
	Name     string  `json:"name"`
	District string  `json:"district"`
	Value    float64 `json:"value"`
	At       float64 `json:"at"` // unix seconds
}

func (l liveSubmitter) Submit(ctx context.Context, rs []pipeline.Reading) error {
	if err := l.pipe.Submit(ctx, rs); err != nil {
		return err
	}
	samples := make([]vitalSample, len(rs))
	for i, r := range rs {
		samples[i] = vitalSample{Name: "city_" + r.Metric, District: r.District, Value: r.Value, At: float64(r.Time) / 1e9}
	}
	if b, err := json.Marshal(map[string]any{"samples": samples}); err == nil {
		l.events.Publish(stream.Event{Topic: "vitals", Name: "vitals", Data: b})
	}
	return nil
}

// liveRunners are the parts of buildLive that run: the public feed's stream,
// the green-wave analysis and the ingest-health beat of the operations
// stream. They stop with the gateways (the analysis submits to the pipeline).
func (s *server) liveRunners() []runner {
	var rs []runner
	if s.feed != nil {
		rs = append(rs, runFunc(s.feed.Run))
	}
	if s.signals != nil {
		rs = append(rs, runFunc(func(ctx context.Context) error { return s.signals.Run(ctx, s.pipe) }))
	}
	return append(rs, runFunc(s.publishHealth))
}

// healthEvery is how often the operations stream carries the sinks' state.
const healthEvery = 10 * time.Second

// publishHealth puts the sinks' state on the operations stream every
// healthEvery, so the screen shows ingest health and a live stream even when
// nothing else happens.
func (s *server) publishHealth(ctx context.Context) error {
	t := time.NewTicker(healthEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			b, err := json.Marshal(map[string]any{"sinks": s.pipe.Status()})
			if err != nil {
				return fmt.Errorf("health event: %w", err)
			}
			s.events.Publish(stream.Event{Topic: "health", Name: "health", Data: b})
		}
	}
}

// decorateAlert adds the operators' silence and acknowledgement to an alert view.
func (s *server) decorateAlert(a *rules.AlertView) {
	if id, ok := s.silences.Silenced(a.Labels); ok {
		a.SilencedBy = id
	}
	if ack, ok := s.silences.Acked(a.Fingerprint, a.ActiveAt); ok {
		a.Ack = ack
	}
}

// publicIDKey reads the key the public feed's aliases are made with, creating
// a random one on first use, so a device keeps its public id across restarts.
func publicIDKey(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil && len(bytes.TrimSpace(b)) >= 32 {
		return string(bytes.TrimSpace(b)), nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("opendata: the public id key %s: %w", path, err)
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	enc := hex.EncodeToString(key)
	if err := durable.WriteFile(path, []byte(enc+"\n"), 0o600, true); err != nil {
		return "", fmt.Errorf("opendata: writing the public id key: %w", err)
	}
	return enc, nil
}
