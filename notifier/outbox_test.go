package notifier

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/citypulse/citypulse/pipeline"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const secret = "0123456789abcdef-receiver"

// receiver is a real HTTP receiver on loopback that verifies signatures.
type receiver struct {
	srv      *httptest.Server
	mu       sync.Mutex
	got      []webhookMessage
	keys     map[string]int
	fail     atomic.Int64 // answer 500 to this many requests
	status   atomic.Int64 // if set, answer this status
	hang     atomic.Bool
	badSigs  atomic.Int64
	requests atomic.Int64
	release  chan struct{}
}

func newReceiver(t *testing.T) *receiver {
	r := &receiver{keys: map[string]int{}, release: make(chan struct{})}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.requests.Add(1)
		if r.hang.Load() {
			select { // accepts the request and never answers
			case <-req.Context().Done():
			case <-r.release:
			}
			return
		}
		body, _ := io.ReadAll(req.Body)
		if VerifySignature(secret, req.Header.Get("X-CityPulse-Signature"), body, time.Now(), 5*time.Minute) != nil {
			r.badSigs.Add(1)
		}
		if r.fail.Load() > 0 {
			r.fail.Add(-1)
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		if s := r.status.Load(); s != 0 {
			w.WriteHeader(int(s))
			return
		}
		var m webhookMessage
		_ = json.Unmarshal(body, &m)
		r.mu.Lock()
		r.got = append(r.got, m)
		r.keys[req.Header.Get("Idempotency-Key")]++
		r.mu.Unlock()
	}))
	t.Cleanup(func() { r.hang.Store(false); close(r.release); r.srv.CloseClientConnections(); r.srv.Close() })
	return r
}

func (r *receiver) count() int { r.mu.Lock(); defer r.mu.Unlock(); return len(r.got) }

func testNotify(rs ...*receiver) Config {
	c := Default()
	c.RetryMin, c.RetryMax = 10*time.Millisecond, 50*time.Millisecond
	c.AllowHosts = []string{"127.0.0.1"}
	for i, r := range rs {
		c.Receivers = append(c.Receivers, ReceiverConfig{Name: "r" + strconv.Itoa(i), Type: "webhook", URL: r.srv.URL + "/hook", Secret: secret, Timeout: 300 * time.Millisecond})
	}
	return c
}

func startOutbox(t *testing.T, cfg Config, dir string) (*Outbox, func()) {
	t.Helper()
	return startOutboxWith(t, cfg, dir, Durability{})
}

func startOutboxWith(t *testing.T, cfg Config, dir string, dur Durability) (*Outbox, func()) {
	t.Helper()
	o, err := NewOutbox(cfg, dir, OutboxOptions{Durability: dur})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	return o, func() { cancel(); require.NoError(t, <-done) }
}

func event(kind string) Event {
	l := map[string]string{"alertname": "burst_main", "device": "pipe-0042", "district": "gulou", "severity": "critical"}
	at := time.Now()
	return Event{Kind: kind, At: at, Labels: l, Annotations: map[string]string{"summary": "Pressure at pipe-0042 (gulou) fell 96 kPa in 1m0s"},
		StartsAt: at, Fingerprint: "fp-pipe-0042", Key: "fp-pipe-0042-" + kind}
}

func waitUntil(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWebhookIsSignedAlertmanagerJSON(t *testing.T) {
	rcv := newReceiver(t)
	o, stop := startOutbox(t, testNotify(rcv), t.TempDir())
	defer stop()
	o.Enqueue(event(KindFiring))
	o.Enqueue(event(KindResolved))
	waitUntil(t, "two deliveries", func() bool { return rcv.count() == 2 })
	require.Zero(t, rcv.badSigs.Load())
	m := rcv.got[0]
	require.Equal(t, "4", m.Version)
	require.Equal(t, "firing", m.Status)
	require.Equal(t, "burst_main", m.Alerts[0].Labels["alertname"])
	require.NotEmpty(t, m.Alerts[0].Fingerprint)
	require.Equal(t, "resolved", rcv.got[1].Status)
	require.Len(t, rcv.keys, 2, "an idempotency key per (alert, transition)")
}

func TestRetriesUntilTheReceiverRecovers(t *testing.T) {
	rcv := newReceiver(t)
	rcv.fail.Store(3)
	o, stop := startOutbox(t, testNotify(rcv), t.TempDir())
	defer stop()
	o.Enqueue(event(KindFiring))
	waitUntil(t, "delivery after 500s", func() bool { return rcv.count() == 1 })
	require.Equal(t, int64(4), rcv.requests.Load())
	for _, n := range rcv.keys {
		require.Equal(t, 1, n, "delivered once")
	}
}

func TestA4xxGoesToTheDeadLetters(t *testing.T) {
	rcv := newReceiver(t)
	rcv.status.Store(http.StatusBadRequest)
	o, stop := startOutbox(t, testNotify(rcv), t.TempDir())
	defer stop()
	o.Enqueue(event(KindFiring))
	waitUntil(t, "dead letter", func() bool { st := o.Status(); return len(st[0].Dead) == 1 })
	require.Equal(t, int64(1), rcv.requests.Load(), "a 4xx is not retried")
	require.Contains(t, o.Status()[0].Dead[0].LastErr, "HTTP 400")
}

func TestAHungReceiverDelaysNoOther(t *testing.T) {
	hung, fine := newReceiver(t), newReceiver(t)
	hung.hang.Store(true)
	o, stop := startOutbox(t, testNotify(hung, fine), t.TempDir())
	defer stop()
	for i := 0; i < 5; i++ {
		o.Enqueue(event(KindFiring))
	}
	waitUntil(t, "the healthy receiver", func() bool { return fine.count() == 5 })
	require.Len(t, o.Status()[0].Pending, 5, "the hung receiver's notifications wait on disk")
}

// Under every fsync policy an undelivered notification is on disk (at least
// in the page cache, which survives a crash of the process) and is delivered
// after a restart.
func TestPendingNotificationsSurviveARestart(t *testing.T) {
	for _, dur := range []Durability{{Fsync: pipeline.FsyncAlways}, {Fsync: pipeline.FsyncInterval, Interval: 20 * time.Millisecond}, {Fsync: pipeline.FsyncNever}} {
		t.Run(string(dur.Fsync), func(t *testing.T) {
			rcv := newReceiver(t)
			rcv.hang.Store(true)
			dir := t.TempDir()
			o, stop := startOutboxWith(t, testNotify(rcv), dir, dur)
			o.Enqueue(event(KindFiring))
			waitUntil(t, "on disk", func() bool { return len(o.Status()[0].Pending) == 1 })
			time.Sleep(50 * time.Millisecond) // an fsync pass runs (interval)
			stop()
			rcv.hang.Store(false)
			_, stop2 := startOutboxWith(t, testNotify(rcv), dir, dur)
			defer stop2()
			waitUntil(t, "delivered after restart", func() bool { return rcv.count() == 1 })
			waitUntil(t, "removed", func() bool {
				files, _ := filepath.Glob(filepath.Join(dir, "pending", "r0", "*.json"))
				return len(files) == 0
			})
		})
	}
}

func TestOutboxRefusesAZeroFsyncInterval(t *testing.T) {
	_, err := NewOutbox(testNotify(newReceiver(t)), t.TempDir(), OutboxOptions{Durability: Durability{Fsync: pipeline.FsyncInterval}})
	require.ErrorContains(t, err, "fsync interval")
}

func TestSSRFGuardRefusesPrivateAddresses(t *testing.T) {
	rcv := newReceiver(t)
	cfg := testNotify(rcv)
	cfg.AllowHosts = nil
	_, err := NewOutbox(cfg, t.TempDir(), OutboxOptions{})
	require.ErrorContains(t, err, "SSRF")
	o := &Outbox{cfg: cfg}
	for _, addr := range []string{"127.0.0.1:80", "10.1.2.3:443", "192.168.0.1:80", "169.254.169.254:80", "[::1]:80", "0.0.0.0:80",
		"100.64.0.1:80", "100.127.255.254:80", "198.18.0.1:80", "240.0.0.1:80", "0.1.2.3:80", "192.0.0.8:80",
		"[64:ff9b::a9fe:a9fe]:80", "[64:ff9b::7f00:1]:80", "[64:ff9b:1::a00:1]:80", "[2002:a9fe:a9fe::1]:80", "[::ffff:127.0.0.1]:80"} {
		require.Error(t, o.guard("tcp", addr, nil), addr)
	}
	for _, addr := range []string{"93.184.216.34:443", "100.128.0.1:443", "[64:ff9b::5db8:d822]:443", "[2002:5db8:d822::1]:443", "[2606:2800:220:1::1]:443"} {
		require.NoError(t, o.guard("tcp", addr, nil), "a public address is fine: %s", addr)
	}
	o.cfg.AllowHosts = []string{"10.0.0.0/8"}
	require.NoError(t, o.guard("tcp", "10.1.2.3:443", nil), "allow-listed by CIDR")
}

func TestSignatureVerification(t *testing.T) {
	body := []byte(`{"version":"4"}`)
	now := time.Unix(1767225600, 0)
	sig := Signature(secret, now, body)
	require.NoError(t, VerifySignature(secret, sig, body, now.Add(time.Minute), 5*time.Minute))
	require.ErrorContains(t, VerifySignature(secret, sig, body, now.Add(time.Hour), 5*time.Minute), "replay")
	require.ErrorContains(t, VerifySignature(secret, sig, []byte(`{}`), now, 5*time.Minute), "mismatch")
	require.ErrorContains(t, VerifySignature("another-secret-0000", sig, body, now, 5*time.Minute), "mismatch")
	require.Error(t, VerifySignature(secret, "garbage", body, now, time.Minute))
	_ = os.Getpid
}

func eventFor(device, kind string) Event {
	ev := event(kind)
	ev.Labels = map[string]string{"alertname": "burst_main", "device": device, "district": "gulou", "severity": "critical"}
	ev.Fingerprint = "fp-" + device
	ev.Key = ev.Fingerprint + "-" + kind
	return ev
}

// A slow delivery of one alert holds back that alert's later notifications
// (firing before resolved) but not other alerts to the same receiver.
func TestOneSlowAlertDelaysNoOtherAlert(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var got []string // device/status in the order the receiver finished them
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var m webhookMessage
		body, _ := io.ReadAll(req.Body)
		require.NoError(t, json.Unmarshal(body, &m))
		dev := m.CommonLabels["device"]
		if dev == "pipe-slow" && m.Status == "firing" {
			<-release
		}
		mu.Lock()
		got = append(got, dev+"/"+m.Status)
		mu.Unlock()
	}))
	defer srv.Close()
	cfg := testNotify()
	cfg.Receivers = []ReceiverConfig{{Name: "r0", Type: "webhook", URL: srv.URL, Secret: secret, Timeout: 10 * time.Second}}
	o, stop := startOutbox(t, cfg, t.TempDir())
	defer stop()
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	defer free() // before stop, also when the test fails
	order := func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), got...) }

	o.Enqueue(eventFor("pipe-slow", KindFiring))
	o.Enqueue(eventFor("pipe-slow", KindResolved))
	for _, d := range []string{"pipe-a", "pipe-b", "pipe-c"} {
		o.Enqueue(eventFor(d, KindFiring))
	}
	waitUntil(t, "the other alerts", func() bool { return len(order()) == 3 })
	require.ElementsMatch(t, []string{"pipe-a/firing", "pipe-b/firing", "pipe-c/firing"}, order(),
		"other alerts are delivered while one is slow; the slow alert's resolved waits for its firing")
	free()
	waitUntil(t, "the slow alert", func() bool { return len(order()) == 5 })
	require.Equal(t, []string{"pipe-slow/firing", "pipe-slow/resolved"}, order()[3:], "one alert's notifications in order")
}

// syncBuffer is a log destination the test reads while the outbox writes.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// When writing an event to the outbox fails, that event and every event
// queued after it stay queued for the next pass (the old code kept the
// failed one and dropped the rest of the pass).
func TestAFailedOutboxWriteKeepsTheRestOfThePass(t *testing.T) {
	rcv := newReceiver(t)
	dir := t.TempDir()
	var logs syncBuffer
	o, err := NewOutbox(testNotify(rcv), dir, OutboxOptions{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, err)
	// A file where the receiver's pending directory should be: every write fails.
	pendingDir := filepath.Join(dir, "pending", "r0")
	require.NoError(t, os.Remove(pendingDir))
	require.NoError(t, os.WriteFile(pendingDir, nil, 0o644))
	for _, d := range []string{"pipe-a", "pipe-b", "pipe-c"} {
		o.Enqueue(eventFor(d, KindFiring)) // queued before Run: one pass holds all three
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	waitUntil(t, "the failed write", func() bool { return strings.Contains(logs.String(), "cannot write the outbox") })

	require.NoError(t, os.Remove(pendingDir))
	require.NoError(t, os.Mkdir(pendingDir, 0o755))
	o.Enqueue(eventFor("pipe-d", KindFiring)) // the next pass
	waitUntil(t, "four deliveries", func() bool { return rcv.count() == 4 })
	devs := map[string]bool{}
	rcv.mu.Lock()
	for _, m := range rcv.got {
		devs[m.CommonLabels["device"]] = true
	}
	rcv.mu.Unlock()
	require.Equal(t, map[string]bool{"pipe-a": true, "pipe-b": true, "pipe-c": true, "pipe-d": true}, devs)
}

// The outbox sends what is enqueued at once: Enqueue wakes the writer and the
// write wakes the receiver's worker. With its only period (the fsync pass) an
// hour long, a notification that waited for a tick would not arrive before
// the deadline (checked: persisting on the fsync tick instead of the wake-up
// fails here).
func TestEnqueueSendsWithoutWaitingForATick(t *testing.T) {
	rcv := newReceiver(t)
	reg := prometheus.NewRegistry()
	o, err := NewOutbox(testNotify(rcv), t.TempDir(), OutboxOptions{
		Durability: Durability{Fsync: pipeline.FsyncInterval, Interval: time.Hour}, Registerer: reg})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	for i, kind := range []string{KindFiring, KindResolved, KindFiring} {
		ev := event(kind)
		ev.Key += strconv.Itoa(i)
		o.Enqueue(ev)
		waitUntil(t, "delivery "+strconv.Itoa(i+1), func() bool { return rcv.count() == i+1 })
	}
	// each part of the way was timed once per delivery
	for _, stage := range []string{stageToEnqueue, stageWrite, stageWait, stageHTTP} {
		h := &dto.Metric{}
		require.NoError(t, o.m.stages.WithLabelValues(stage).(prometheus.Histogram).Write(h))
		require.EqualValues(t, 3, h.GetHistogram().GetSampleCount(), stage)
	}
}
