package history

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/rules"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 12, 2, 8, 0, 0, 0, time.UTC)

func labels(dev string) map[string]string {
	return map[string]string{"alertname": "burst_main", "device": dev, "district": "gulou", "severity": "critical"}
}

// ev is the rules engine's event of kind for dev's alert, at t0+at; the
// alert went pending at t0.
func ev(dev, kind string, at time.Duration) notifier.Event {
	l := labels(dev)
	e := notifier.Event{Kind: kind, At: t0.Add(at), Labels: l, ActiveAt: t0, StartsAt: t0.Add(30 * time.Second),
		Annotations: map[string]string{"summary": "Pressure at " + dev + " fell 96 kPa in 1m0s"}, Fingerprint: rules.Fingerprint(l)}
	if kind == notifier.KindFlapping {
		e.Labels = labels(dev)
		e.Labels["flapping"] = "true"
		e.Fingerprint = rules.Fingerprint(e.Labels)
	}
	e.Key = e.Fingerprint + "-" + kind + "-" + strconv.FormatInt(e.At.UnixNano(), 36)
	return e
}

func kinds(a Alert) []string {
	var out []string
	for _, e := range a.Entries {
		k := e.Kind
		if e.Kind == KindNotification {
			k += " " + e.Event + " " + e.Receiver + " " + e.Result
		}
		out = append(out, k)
	}
	return out
}

func TestTheHistoryOfAnAlert(t *testing.T) {
	fp := rules.Fingerprint(labels("pipe-1"))
	cases := []struct {
		name   string
		record func(s *Store)
		want   []string
	}{
		{"a firing after a hold-off was pending first", func(s *Store) {
			s.Record(ev("pipe-1", notifier.KindFiring, 30*time.Second), "")
		}, []string{"pending", "firing"}},
		{"pending, firing, resolved in time order", func(s *Store) {
			s.Record(ev("pipe-1", notifier.KindFiring, 30*time.Second), "")
			s.Record(ev("pipe-1", notifier.KindResolved, 5*time.Minute), "")
		}, []string{"pending", "firing", "resolved"}},
		{"a notification is one entry, updated as its delivery goes on", func(s *Store) {
			f := ev("pipe-1", notifier.KindFiring, 30*time.Second)
			s.Record(f, "")
			for i, r := range []string{ResultRetrying, ResultRetrying, ResultDelivered} {
				s.Delivered(notifier.Delivery{Receiver: "ops", Event: f, Result: r, Attempts: i + 1, At: t0.Add(31 * time.Second)})
			}
			s.Delivered(notifier.Delivery{Receiver: "sms", Event: f, Result: ResultRefused, Attempts: 1, Err: "HTTP 400", At: t0.Add(32 * time.Second)})
		}, []string{"pending", "firing", "notification firing ops delivered", "notification firing sms refused"}},
		{"a flapping notice belongs to the alert", func(s *Store) {
			s.Record(ev("pipe-1", notifier.KindFlapping, time.Minute), "")
		}, []string{"flapping"}},
		{"only the last entries are kept", func(s *Store) {
			for i := range 30 {
				s.Record(ev("pipe-1", notifier.KindRepeat, time.Duration(i)*time.Minute), "")
			}
		}, []string{"repeat", "repeat", "repeat", "repeat", "repeat"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(Options{MaxEntries: 5})
			require.NoError(t, err)
			tc.record(s)
			a, ok := s.Get(fp)
			require.True(t, ok)
			require.Equal(t, tc.want, kinds(a))
			require.Equal(t, labels("pipe-1"), a.Labels)
		})
	}
}

func TestOnlyTheAlertsLastChangedAreKept(t *testing.T) {
	s, err := Open(Options{MaxAlerts: 3})
	require.NoError(t, err)
	now := t0
	s.now = func() time.Time { now = now.Add(time.Second); return now }
	for i := range 5 {
		s.Record(ev("pipe-"+strconv.Itoa(i), notifier.KindFiring, time.Minute), "")
	}
	for i := range 5 {
		_, ok := s.Get(rules.Fingerprint(labels("pipe-" + strconv.Itoa(i))))
		require.Equal(t, i >= 2, ok, "pipe-%d", i)
	}
}

// The history survives a restart: Run saves it when it stops, Open reads it.
// A damaged file is left behind with a warning, not a failed start.
func TestTheHistorySurvivesARestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "alert-history.json")
	s, err := Open(Options{Path: path})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	f := ev("pipe-1", notifier.KindFiring, 30*time.Second)
	s.Record(f, "silence-7")
	cancel()
	require.NoError(t, <-done)

	again, err := Open(Options{Path: path})
	require.NoError(t, err)
	a, ok := again.Get(f.Fingerprint)
	require.True(t, ok)
	require.Equal(t, []string{"pending", "firing"}, kinds(a))
	require.Equal(t, "silence-7", a.Entries[1].SilencedBy)
	require.Equal(t, "Pressure at pipe-1 fell 96 kPa in 1m0s", a.Entries[1].Summary)

	require.NoError(t, os.WriteFile(path, []byte(`{"alerts":[`), 0o644))
	damaged, err := Open(Options{Path: path})
	require.NoError(t, err)
	_, ok = damaged.Get(f.Fingerprint)
	require.False(t, ok)
}

// A real outbox delivering to a real receiver on loopback reports every
// attempt: the receiver fails twice, then takes the notification.
func TestTheOutboxReportsItsDeliveries(t *testing.T) {
	var fails atomic.Int64
	fails.Store(2)
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if fails.Add(-1) >= 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer rcv.Close()
	cfg := notifier.Default()
	cfg.RetryMin, cfg.RetryMax = 10*time.Millisecond, 20*time.Millisecond
	cfg.AllowHosts = []string{"127.0.0.1"}
	cfg.Receivers = []notifier.ReceiverConfig{{Name: "ops", Type: "webhook", URL: rcv.URL + "/hook", Secret: "0123456789abcdef-receiver", Timeout: 5 * time.Second}}
	s, err := Open(Options{})
	require.NoError(t, err)
	o, err := notifier.NewOutbox(cfg, t.TempDir(), notifier.OutboxOptions{Observer: s})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- o.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()

	f := ev("pipe-1", notifier.KindFiring, 30*time.Second)
	s.Record(f, "")
	o.Enqueue(f)
	require.Eventually(t, func() bool {
		a, _ := s.Get(f.Fingerprint)
		return len(a.Entries) == 3 && a.Entries[2].Result == ResultDelivered
	}, 30*time.Second, 10*time.Millisecond)
	a, _ := s.Get(f.Fingerprint)
	n := a.Entries[2]
	require.Equal(t, KindNotification, n.Kind)
	require.Equal(t, "ops", n.Receiver)
	require.Equal(t, notifier.KindFiring, n.Event)
	require.Equal(t, 3, n.Attempts, "two failures, then delivered")
	require.Empty(t, n.Error)
}

func TestTheHistoryEndpoint(t *testing.T) {
	s, err := Open(Options{})
	require.NoError(t, err)
	f := ev("pipe-1", notifier.KindFiring, 30*time.Second)
	s.Record(f, "")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/alerts/{fingerprint}/history", s.Handler)
	for _, tc := range []struct {
		fp   string
		code int
	}{{f.Fingerprint, http.StatusOK}, {"0123456789abcdef", http.StatusNotFound}} {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/api/v1/alerts/"+tc.fp+"/history", nil))
		require.Equal(t, tc.code, rec.Code, rec.Body.String())
		var body struct {
			Status string `json:"status"`
			Data   Alert  `json:"data"`
		}
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
		if tc.code == http.StatusOK {
			require.Equal(t, "success", body.Status)
			require.Equal(t, []string{"pending", "firing"}, kinds(body.Data))
			require.Equal(t, f.Fingerprint, body.Data.Fingerprint)
		}
	}
}
