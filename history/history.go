package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/citypulse/citypulse/internal/durable"
	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/rules"
)

// Defaults of the bounds.
const (
	DefaultMaxAlerts  = 500
	DefaultMaxEntries = 40
	// saveEvery is how often Run writes the file when something changed.
	saveEvery = 5 * time.Second
)

// Entry kinds besides the transition kinds (notifier.Kind*).
const (
	KindPending      = "pending"
	KindNotification = "notification"
)

// Delivery results (Entry.Result).
const (
	ResultDelivered = "delivered"
	ResultRetrying  = "retrying"
	ResultRefused   = "refused"
	ResultDead      = "dead"
)

// Entry is one line of an alert's history: a transition, or a notification
// of one to one receiver (updated in place as its delivery goes on).
type Entry struct {
	At   time.Time `json:"at"`
	Kind string    `json:"kind"`
	// A transition: what the alert said then, and the silence that held its
	// notification back.
	Summary    string `json:"summary,omitempty"`
	SilencedBy string `json:"silencedBy,omitempty"`
	// A notification: of which transition (Event: its kind, Key: its
	// idempotency key), to whom, how it went.
	Event    string `json:"event,omitempty"`
	Key      string `json:"key,omitempty"`
	Receiver string `json:"receiver,omitempty"`
	Result   string `json:"result,omitempty"`
	Attempts int    `json:"attempts,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Alert is one alert's history, oldest entry first.
type Alert struct {
	Fingerprint string            `json:"fingerprint"`
	Labels      map[string]string `json:"labels"`
	Updated     time.Time         `json:"updated"`
	Entries     []Entry           `json:"entries"`
}

// Options configure a Store.
type Options struct {
	// Path is the file the history is kept in ("": memory only).
	Path string
	// MaxAlerts and MaxEntries bound it (0: the defaults).
	MaxAlerts, MaxEntries int
	Logger                *slog.Logger
}

// Store is the bounded history of every alert.
type Store struct {
	opts Options
	log  *slog.Logger
	now  func() time.Time

	mu     sync.Mutex
	alerts map[string]*Alert
	dirty  bool
}

// Open builds the store and reads what a previous run saved (a damaged file
// is logged and left behind: the history starts empty). It starts nothing.
func Open(opts Options) (*Store, error) {
	if opts.MaxAlerts <= 0 {
		opts.MaxAlerts = DefaultMaxAlerts
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Store{opts: opts, log: log, now: time.Now, alerts: map[string]*Alert{}}
	if opts.Path == "" {
		return s, nil
	}
	b, err := os.ReadFile(opts.Path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the alert history: %w", err)
	}
	var f file
	if err := json.Unmarshal(b, &f); err != nil {
		log.Warn("the alert history is damaged; starting without it", "file", opts.Path, "err", err)
		return s, nil
	}
	for _, a := range f.Alerts {
		if a != nil && a.Fingerprint != "" {
			s.alerts[a.Fingerprint] = a
		}
	}
	s.evict()
	return s, nil
}

type file struct {
	Alerts []*Alert `json:"alerts"`
}

// Record adds a transition of an alert (an event of the rules engine).
// silencedBy names the silence that held its notification back ("": none).
// A firing that was pending first also records when it went pending.
func (s *Store) Record(ev notifier.Event, silencedBy string) {
	if ev.Fingerprint == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.alert(fingerprint(ev), ev.Labels)
	if ev.Kind == notifier.KindFiring && !ev.ActiveAt.IsZero() && !ev.ActiveAt.After(ev.At) {
		s.add(a, Entry{At: ev.ActiveAt, Kind: KindPending})
	}
	s.add(a, Entry{At: ev.At, Kind: ev.Kind, Summary: ev.Annotations["summary"], SilencedBy: silencedBy})
}

// Delivered records how a notification's delivery to one receiver went
// (notifier.DeliveryObserver): one entry per notification and receiver,
// updated as the attempts go on.
func (s *Store) Delivered(d notifier.Delivery) {
	if d.Event.Fingerprint == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.alert(fingerprint(d.Event), d.Event.Labels)
	e := Entry{At: d.At, Kind: KindNotification, Event: d.Event.Kind, Key: d.Event.Key, Receiver: d.Receiver,
		Result: d.Result, Attempts: d.Attempts, Error: d.Err}
	for i := len(a.Entries) - 1; i >= 0; i-- {
		if p := &a.Entries[i]; p.Kind == KindNotification && p.Key == e.Key && p.Receiver == e.Receiver {
			*p = e
			a.Updated, s.dirty = s.now(), true
			return
		}
	}
	s.add(a, e)
}

// alert returns the history of fingerprint, made when new (the caller holds mu).
func (s *Store) alert(fp string, labels map[string]string) *Alert {
	a := s.alerts[fp]
	if a == nil {
		a = &Alert{Fingerprint: fp, Labels: cloneLabels(labels), Updated: s.now()}
		s.alerts[fp] = a
		s.evict()
	}
	return a
}

// add appends e in time order, keeping the last MaxEntries (the caller holds mu).
func (s *Store) add(a *Alert, e Entry) {
	i := sort.Search(len(a.Entries), func(i int) bool { return a.Entries[i].At.After(e.At) })
	a.Entries = slices.Insert(a.Entries, i, e)
	if n := len(a.Entries) - s.opts.MaxEntries; n > 0 {
		a.Entries = slices.Delete(a.Entries, 0, n)
	}
	a.Updated, s.dirty = s.now(), true
}

// evict drops the alerts least recently changed beyond MaxAlerts (the
// caller holds mu, or owns s).
func (s *Store) evict() {
	n := len(s.alerts) - s.opts.MaxAlerts
	if n <= 0 {
		return
	}
	all := make([]*Alert, 0, len(s.alerts))
	for _, a := range s.alerts {
		all = append(all, a)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Updated.Before(all[j].Updated) })
	for _, a := range all[:n] {
		delete(s.alerts, a.Fingerprint)
	}
}

// cloneLabels copies an alert's labels, without the one a flapping notice
// adds (it is not the alert's).
func cloneLabels(l map[string]string) map[string]string {
	c := make(map[string]string, len(l))
	for k, v := range l {
		if k != flappingLabel {
			c[k] = v
		}
	}
	return c
}

const flappingLabel = "flapping"

// fingerprint is the alert an event is about: a flapping notice carries an
// extra label, and so a fingerprint of its own, but belongs to the alert.
func fingerprint(ev notifier.Event) string {
	if _, ok := ev.Labels[flappingLabel]; ok {
		return rules.Fingerprint(cloneLabels(ev.Labels))
	}
	return ev.Fingerprint
}

// Get returns a copy of fingerprint's history.
func (s *Store) Get(fp string) (Alert, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.alerts[fp]
	if !ok {
		return Alert{}, false
	}
	c := *a
	c.Labels = cloneLabels(a.Labels)
	c.Entries = slices.Clone(a.Entries)
	return c, true
}

// Handler serves GET /api/v1/alerts/{fingerprint}/history.
func (s *Store) Handler(w http.ResponseWriter, r *http.Request) {
	a, ok := s.Get(r.PathValue("fingerprint"))
	if !ok {
		httpapi.WriteError(w, http.StatusNotFound, "not_found",
			"no history for this alert: it has not fired since the history began, or it is older than the last "+
				fmt.Sprint(s.opts.MaxAlerts)+" alerts kept")
		return
	}
	httpapi.WriteData(w, http.StatusOK, a)
}

// Run saves the history every few seconds when it changed, and once more
// when ctx is done.
func (s *Store) Run(ctx context.Context) error {
	t := time.NewTicker(saveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return s.save()
		case <-t.C:
			if err := s.save(); err != nil {
				s.log.Error("cannot save the alert history; retrying", "file", s.opts.Path, "err", err)
			}
		}
	}
}

// save writes the file if anything changed since the last save.
func (s *Store) save() error {
	if s.opts.Path == "" {
		return nil
	}
	s.mu.Lock()
	if !s.dirty {
		s.mu.Unlock()
		return nil
	}
	f := file{Alerts: make([]*Alert, 0, len(s.alerts))}
	for _, a := range s.alerts {
		c := *a
		c.Entries = slices.Clone(a.Entries)
		f.Alerts = append(f.Alerts, &c)
	}
	s.dirty = false
	s.mu.Unlock()
	sort.Slice(f.Alerts, func(i, j int) bool { return f.Alerts[i].Fingerprint < f.Alerts[j].Fingerprint })
	b, err := json.Marshal(f)
	if err == nil {
		err = durable.WriteFile(s.opts.Path, b, 0o644, true)
	}
	if err != nil {
		s.mu.Lock()
		s.dirty = true
		s.mu.Unlock()
		return fmt.Errorf("save the alert history: %w", err)
	}
	return nil
}
