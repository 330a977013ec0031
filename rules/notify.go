package rules

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/pipeline"
)

// ReceiverConfig is one destination of notifications.
type ReceiverConfig struct {
	Name string `mapstructure:"name" yaml:"name"`
	// Type: "webhook" (Alertmanager webhook JSON, signed) or "alertmanager"
	// (POST <url>/api/v2/alerts of a real Alertmanager).
	Type string `mapstructure:"type" yaml:"type"`
	URL  string `mapstructure:"url" yaml:"url"`
	// Secret signs webhook bodies (X-CityPulse-Signature).
	Secret  string        `mapstructure:"secret" yaml:"secret"`
	Timeout time.Duration `mapstructure:"timeout" yaml:"timeout"`
}

// NotifyConfig configures delivery.
type NotifyConfig struct {
	Receivers []ReceiverConfig `mapstructure:"receivers" yaml:"receivers"`
	// AllowHosts lets webhooks reach hosts that resolve to loopback, link-local
	// or private addresses (SSRF guard): host names, IPs or CIDRs.
	AllowHosts []string      `mapstructure:"allow_hosts" yaml:"allow_hosts"`
	RetryMin   time.Duration `mapstructure:"retry_min" yaml:"retry_min"`
	RetryMax   time.Duration `mapstructure:"retry_max" yaml:"retry_max"`
	// MaxAge: a notification still undelivered after this goes to the dead letters.
	MaxAge      time.Duration `mapstructure:"max_age" yaml:"max_age"`
	ExternalURL string        `mapstructure:"external_url" yaml:"external_url"`
}

// DefaultNotify returns the defaults: no receivers.
func DefaultNotify() NotifyConfig {
	return NotifyConfig{RetryMin: 500 * time.Millisecond, RetryMax: time.Minute, MaxAge: 24 * time.Hour,
		ExternalURL: "http://localhost:8080"}
}

// Validate checks the section; messages name the key.
func (c NotifyConfig) Validate() error {
	var errs []error
	names := map[string]bool{}
	for i, r := range c.Receivers {
		key := fmt.Sprintf("rules.notify.receivers[%d]", i)
		if !nameRE.MatchString(r.Name) || names[r.Name] {
			errs = append(errs, fmt.Errorf("%s.name %q: want a unique [a-z][a-z0-9_]*", key, r.Name))
		}
		names[r.Name] = true
		if r.Type != "webhook" && r.Type != "alertmanager" {
			errs = append(errs, fmt.Errorf("%s.type %q: want webhook or alertmanager", key, r.Type))
		}
		if u, err := url.Parse(r.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("%s.url %q: want http(s)://host/path", key, r.URL))
		}
		if r.Type == "webhook" && len(r.Secret) < 16 {
			errs = append(errs, fmt.Errorf("%s.secret must be at least 16 characters (it signs every delivery)", key))
		}
		if r.Timeout < 0 {
			errs = append(errs, fmt.Errorf("%s.timeout must be >= 0", key))
		}
	}
	for _, h := range c.AllowHosts {
		if h == "" {
			errs = append(errs, errors.New("rules.notify.allow_hosts: empty entry"))
		}
	}
	if c.RetryMin <= 0 || c.RetryMax < c.RetryMin {
		errs = append(errs, fmt.Errorf("rules.notify.retry_min (%v) must be > 0 and <= retry_max (%v)", c.RetryMin, c.RetryMax))
	}
	if c.MaxAge < time.Minute {
		errs = append(errs, fmt.Errorf("rules.notify.max_age must be at least 1m, got %v", c.MaxAge))
	}
	return errors.Join(errs...)
}

// Outbox delivers events to every receiver, durably: an event is written to
// <dir>/pending/<receiver>/ before delivery and removed after a 2xx. The
// entry is exactly as durable as the readings that raised it (Durability
// follows pipeline.fsync): with "always" it is fsynced before delivery; with
// "interval" (the default) delivery starts once write(2) returned, which
// survives a crash of the process, and a background pass fsyncs what is still
// pending every interval, which bounds what a power loss can take.
// Each receiver has its own worker, so a hung receiver delays no other; a
// receiver gets up to deliveriesPerReceiver notifications at once, one alert's
// in order. Timeouts and 5xx (and 429) are retried
// with exponential backoff and jitter; a 4xx, or an event older than max_age,
// goes to <dir>/dead/<receiver>/ and is listed by the API. Files left by a crash
// are delivered after the restart.
type Outbox struct {
	cfg    NotifyConfig
	dir    string
	log    *slog.Logger
	m      *outboxMetrics
	client *http.Client
	now    func() time.Time
	dur    Durability

	mu       sync.Mutex
	queue    []Event
	unsynced []string // pending files written since the last fsync pass
	wake     chan struct{}
	queues   map[string]*rqueue
	seq      uint64
}

type outboxMetrics struct {
	deliveries *prometheus.CounterVec
	dropped    prometheus.Counter
	latency    prometheus.Histogram
}

const maxQueued = 100_000

// Durability says when the outbox calls fsync(2); serve passes the pipeline's
// fsync policy and interval. The zero value fsyncs every entry ("always").
type Durability struct {
	Fsync    pipeline.FsyncPolicy
	Interval time.Duration
}

// fsyncEach reports whether every write is fsynced before it counts as done:
// "always" and the zero value; "interval" and "never" leave it to later.
func (d Durability) fsyncEach() bool {
	return d.Fsync != pipeline.FsyncInterval && d.Fsync != pipeline.FsyncNever
}

// NewOutbox builds the outbox in dir; it starts nothing.
func NewOutbox(cfg NotifyConfig, dir string, dur Durability, log *slog.Logger, reg prometheus.Registerer) (*Outbox, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dur.Fsync == pipeline.FsyncInterval && dur.Interval <= 0 {
		return nil, fmt.Errorf("outbox: fsync interval must be > 0, got %v", dur.Interval)
	}
	o := &Outbox{cfg: cfg, dir: dir, dur: dur, log: log, now: time.Now, wake: make(chan struct{}, 1), queues: map[string]*rqueue{}}
	o.client = &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, Control: o.guard}).DialContext,
		MaxIdleConnsPerHost: deliveriesPerReceiver, IdleConnTimeout: time.Minute,
	}}
	o.m = &outboxMetrics{
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_notify_deliveries_total", Help: "Notification delivery attempts, by result."}, []string{"result"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_notify_events_dropped_total", Help: "Events dropped because the in-memory queue was full (100000)."}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_notify_latency_seconds",
			Help:    "From the transition (the server's receive time of the reading that caused it, or the tick) to the receiver's 2xx, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 24)}), // 0.5 ms .. ~70 min
	}
	if reg != nil {
		reg.MustRegister(o.m.deliveries, o.m.dropped, o.m.latency)
	}
	for _, r := range cfg.Receivers {
		if err := o.checkHost(r); err != nil {
			return nil, err
		}
		for _, sub := range []string{"pending", "dead"} {
			if err := os.MkdirAll(filepath.Join(dir, sub, r.Name), 0o755); err != nil {
				return nil, fmt.Errorf("create outbox: %w", err)
			}
		}
		o.queues[r.Name] = newRQueue()
	}
	return o, nil
}

// Enqueue queues an event; it never blocks (the shard loops call it).
func (o *Outbox) Enqueue(ev Event) {
	o.mu.Lock()
	if len(o.queue) >= maxQueued {
		o.mu.Unlock()
		o.m.dropped.Inc()
		o.log.Error("notify: event queue full; an event was dropped (the outbox cannot keep up with the disk)", "alert", ev.Labels["alertname"])
		return
	}
	o.queue = append(o.queue, ev)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// outboxEntry is one event on disk for one receiver.
type outboxEntry struct {
	Receiver string    `json:"receiver"`
	Event    Event     `json:"event"`
	Queued   time.Time `json:"queued"`
	Attempts int       `json:"attempts"`
	LastErr  string    `json:"last_error,omitempty"`
}

// Run writes queued events to disk and runs one delivery worker per receiver
// until ctx is done.
func (o *Outbox) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, r := range o.cfg.Receivers {
		q := o.queues[r.Name]
		o.load(r, q)
		wg.Add(1)
		go func() { defer wg.Done(); o.deliverLoop(ctx, r, q) }()
	}
	var syncTick <-chan time.Time
	if o.dur.Fsync == pipeline.FsyncInterval {
		t := time.NewTicker(o.dur.Interval)
		defer t.Stop()
		syncTick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			o.persistQueued() // what is queued survives the restart
			wg.Wait()
			o.syncPending()
			return nil
		case <-o.wake:
			o.persistQueued()
		case <-syncTick:
			o.syncPending()
		}
	}
}

// syncPending fsyncs the pending files written since the last pass (those
// already delivered and removed need nothing) and their directories.
func (o *Outbox) syncPending() {
	o.mu.Lock()
	paths := o.unsynced
	o.unsynced = nil
	o.mu.Unlock()
	dirs := map[string]bool{}
	for _, p := range paths {
		if err := fsyncPath(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			o.log.Error("notify: cannot fsync an outbox file", "file", p, "err", err)
		}
		dirs[filepath.Dir(p)] = true
	}
	for d := range dirs {
		if err := fsyncPath(d); err != nil {
			o.log.Error("notify: cannot fsync the outbox directory", "dir", d, "err", err)
		}
	}
}

func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}

func (o *Outbox) persistQueued() {
	o.mu.Lock()
	q := o.queue
	o.queue = nil
	o.mu.Unlock()
	for _, ev := range q {
		for _, r := range o.cfg.Receivers {
			o.seq++
			name := fmt.Sprintf("%020d-%06d-%s.json", o.now().UnixNano(), o.seq%1e6, safeName(ev.Key))
			e := outboxEntry{Receiver: r.Name, Event: ev, Queued: o.now()}
			path := filepath.Join(o.dir, "pending", r.Name, name)
			if err := o.write(path, e); err != nil {
				o.log.Error("notify: cannot write the outbox; the event is kept in memory and retried", "err", err)
				o.mu.Lock()
				o.queue = append(o.queue, ev)
				o.mu.Unlock()
				return
			}
			if o.dur.Fsync == pipeline.FsyncInterval {
				o.mu.Lock()
				o.unsynced = append(o.unsynced, path)
				o.mu.Unlock()
			}
			o.queues[r.Name].push(&pending{path: path, e: e})
		}
	}
}

func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// write stores an outbox entry by its durability policy.
func (o *Outbox) write(path string, v any) error {
	if !o.dur.fsyncEach() {
		return storeJSON(path, v, false)
	}
	if err := storeJSON(path, v, true); err != nil {
		return err
	}
	return fsyncPath(filepath.Dir(path)) // the rename itself
}

// storeJSON writes v to path atomically (a temporary file renamed over it),
// fsyncing the file first when sync is set.
func storeJSON(path string, v any, sync bool) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil && sync {
		err = f.Sync()
	}
	if err := errors.Join(err, f.Close()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// deliveriesPerReceiver bounds the notifications in flight to one receiver.
// Different alerts are delivered concurrently (a burst of incidents is not
// queued behind one slow request); one alert's notifications (firing, then
// resolved) are delivered in order.
const deliveriesPerReceiver = 4

// pending is one notification on disk waiting for delivery.
type pending struct {
	path string
	e    outboxEntry
}

// rqueue is one receiver's pending notifications in order, with the alerts
// (fingerprints) that have a delivery in flight.
type rqueue struct {
	mu       sync.Mutex
	items    []*pending
	inflight map[string]bool
	wake     chan struct{}
}

func newRQueue() *rqueue {
	return &rqueue{inflight: map[string]bool{}, wake: make(chan struct{}, 1)}
}

func (q *rqueue) push(p *pending) {
	q.mu.Lock()
	q.items = append(q.items, p)
	q.mu.Unlock()
	q.signal()
}

func (q *rqueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// next takes the oldest notification whose alert has none in flight.
func (q *rqueue) next() *pending {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, p := range q.items {
		fp := p.e.Event.Fingerprint
		if q.inflight[fp] {
			continue
		}
		q.inflight[fp] = true
		q.items = append(q.items[:i], q.items[i+1:]...)
		return p
	}
	return nil
}

func (q *rqueue) done(p *pending) {
	q.mu.Lock()
	delete(q.inflight, p.e.Event.Fingerprint)
	q.mu.Unlock()
	q.signal()
}

// readEntry reads one outbox file.
func readEntry(path string) (outboxEntry, error) {
	var e outboxEntry
	b, err := os.ReadFile(path)
	if err == nil {
		err = json.Unmarshal(b, &e)
	}
	return e, err
}

// load queues what a previous run left in the receiver's pending directory,
// oldest first; unreadable files go to the dead letters.
func (o *Outbox) load(r ReceiverConfig, q *rqueue) {
	files, _ := filepath.Glob(filepath.Join(o.dir, "pending", r.Name, "*.json"))
	sort.Strings(files)
	for _, path := range files {
		e, err := readEntry(path)
		if err != nil {
			o.log.Error("notify: unreadable outbox file moved to the dead letters", "file", path, "err", err)
			o.moveDead(r, path, e)
			continue
		}
		q.mu.Lock()
		q.items = append(q.items, &pending{path: path, e: e})
		q.mu.Unlock()
	}
}

// deliverLoop delivers one receiver's notifications, up to
// deliveriesPerReceiver at once, until ctx is done; what is undelivered then
// stays on disk for the next start.
func (o *Outbox) deliverLoop(ctx context.Context, r ReceiverConfig, q *rqueue) {
	slots := make(chan struct{}, deliveriesPerReceiver)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		p := q.next()
		for p == nil {
			select {
			case <-ctx.Done():
				return
			case <-q.wake:
			}
			p = q.next()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			o.deliver(ctx, r, p)
			q.done(p)
			<-slots
		}()
	}
}

// deliver sends one notification until it is delivered, refused (4xx), too
// old (max_age) or ctx is done, retrying with exponential backoff and jitter.
func (o *Outbox) deliver(ctx context.Context, r ReceiverConfig, p *pending) {
	backoff := o.cfg.RetryMin
	e := p.e
	for {
		e.Attempts++
		status, err := o.send(ctx, r, e.Event)
		switch {
		case err == nil && status/100 == 2:
			o.m.deliveries.WithLabelValues("ok").Inc()
			o.m.latency.Observe(o.now().Sub(e.Event.At).Seconds())
			_ = os.Remove(p.path)
			return
		case err == nil && status/100 == 4 && status != http.StatusTooManyRequests && status != http.StatusRequestTimeout:
			o.m.deliveries.WithLabelValues("rejected").Inc()
			e.LastErr = fmt.Sprintf("HTTP %d (not retried)", status)
			o.log.Error("notify: receiver refused a notification; it is kept in the dead letters", "receiver", r.Name, "status", status, "alert", e.Event.Labels["alertname"])
			o.moveDead(r, p.path, e)
			return
		}
		if ctx.Err() != nil {
			return
		}
		o.m.deliveries.WithLabelValues("retry").Inc()
		if err != nil {
			e.LastErr = err.Error()
		} else {
			e.LastErr = "HTTP " + strconv.Itoa(status)
		}
		if o.now().Sub(e.Queued) > o.cfg.MaxAge {
			o.log.Error("notify: undelivered for longer than rules.notify.max_age; moved to the dead letters", "receiver", r.Name, "err", e.LastErr)
			o.moveDead(r, p.path, e)
			return
		}
		_ = o.write(p.path, e) // keep the attempt count and error for the API
		o.log.Warn("notify: delivery failed; retrying", "receiver", r.Name, "attempt", e.Attempts, "err", e.LastErr, "backoff", backoff)
		wait := backoff/2 + time.Duration(rand.Int64N(int64(backoff)/2+1))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, o.cfg.RetryMax)
	}
}

func (o *Outbox) moveDead(r ReceiverConfig, path string, e outboxEntry) {
	dead := filepath.Join(o.dir, "dead", r.Name, filepath.Base(path))
	if e.Receiver != "" {
		_ = storeJSON(path, e, true)
	}
	if err := os.Rename(path, dead); err != nil {
		o.log.Error("notify: cannot move to the dead letters", "file", path, "err", err)
		_ = os.Remove(path)
	}
}

// Signature returns the X-CityPulse-Signature header value for body at t:
// "t=<unix>,v1=<hex HMAC-SHA256(secret, "<unix>." + body)>".
func Signature(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts))
	m.Write([]byte("."))
	m.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(m.Sum(nil))
}

// VerifySignature checks a signature header against body, refusing
// timestamps further than tolerance from now (replays).
func VerifySignature(secret, header string, body []byte, now time.Time, tolerance time.Duration) error {
	var ts, sig string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sig = v
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || sig == "" {
		return errors.New("malformed signature header")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("signature timestamp is %v away from now: outside the replay window", d.Round(time.Second))
	}
	want := Signature(secret, time.Unix(sec, 0), body)
	if !hmac.Equal([]byte(want), []byte("t="+ts+",v1="+sig)) {
		return errors.New("signature mismatch")
	}
	return nil
}

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

func status(ev Event) string {
	if ev.Kind == NotifyResolved {
		return "resolved"
	}
	return "firing"
}

// send delivers one event to one receiver and returns the HTTP status.
func (o *Outbox) send(ctx context.Context, r ReceiverConfig, ev Event) (int, error) {
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	gen := o.cfg.ExternalURL + "/api/v1/alerts"
	var body []byte
	var err error
	target := r.URL
	if r.Type == "alertmanager" {
		target = strings.TrimRight(r.URL, "/") + "/api/v2/alerts"
		a := map[string]any{"labels": ev.Labels, "annotations": ev.Annotations, "startsAt": ev.StartsAt, "generatorURL": gen}
		if !ev.EndsAt.IsZero() {
			a["endsAt"] = ev.EndsAt
		}
		body, err = json.Marshal([]any{a})
	} else {
		msg := webhookMessage{Version: "4", GroupKey: "{}:{alertname=\"" + ev.Labels["alertname"] + "\"}", Status: status(ev),
			Receiver: r.Name, GroupLabels: map[string]string{"alertname": ev.Labels["alertname"]}, CommonLabels: ev.Labels,
			CommonAnnotations: ev.Annotations, ExternalURL: o.cfg.ExternalURL,
			Alerts: []webhookAlert{{Status: status(ev), Labels: ev.Labels, Annotations: ev.Annotations, StartsAt: ev.StartsAt,
				EndsAt: ev.EndsAt, GeneratorURL: gen, Fingerprint: ev.Fingerprint}}}
		body, err = json.Marshal(msg)
	}
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "CityPulse")
	req.Header.Set("Idempotency-Key", ev.Key)
	if r.Secret != "" {
		req.Header.Set("X-CityPulse-Signature", Signature(r.Secret, o.now(), body))
	}
	resp, err := o.client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return resp.StatusCode, nil
}

// guard is the dialer's Control hook: it refuses loopback, link-local,
// private and unspecified addresses unless allow-listed (SSRF guard). It runs
// on the resolved address, so DNS rebinding cannot slip past it.
func (o *Outbox) guard(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return err
	}
	ip = ip.Unmap()
	if !(ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast()) {
		return nil
	}
	for _, a := range o.cfg.AllowHosts {
		if a == "localhost" && ip.IsLoopback() {
			return nil
		}
		if p, err := netip.ParsePrefix(a); err == nil && p.Contains(ip) {
			return nil
		}
		if p, err := netip.ParseAddr(a); err == nil && p.Unmap() == ip {
			return nil
		}
	}
	return fmt.Errorf("refusing to send a webhook to %s: loopback, link-local and private addresses need rules.notify.allow_hosts (SSRF guard)", ip)
}

// checkHost refuses, at start-up, a receiver whose host resolves to an
// address the guard would refuse (the dialer checks again on every connect).
func (o *Outbox) checkHost(r ReceiverConfig) error {
	u, _ := url.Parse(r.URL)
	host := u.Hostname()
	for _, a := range o.cfg.AllowHosts {
		if a == host {
			return nil
		}
	}
	addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
	if err != nil {
		o.log.Warn("notify: cannot resolve a receiver now; it is checked again on every delivery", "receiver", r.Name, "err", err)
		return nil
	}
	for _, ip := range addrs {
		if err := o.guard("tcp", net.JoinHostPort(ip.String(), "0"), nil); err != nil {
			return fmt.Errorf("rules.notify receiver %s (%s): %w", r.Name, r.URL, err)
		}
	}
	return nil
}

// OutboxStatus lists pending and dead-letter notifications.
type OutboxStatus struct {
	Receiver string        `json:"receiver"`
	Pending  []outboxEntry `json:"pending"`
	Dead     []outboxEntry `json:"dead"`
}

// Status returns the outbox contents per receiver (at most 100 of each).
func (o *Outbox) Status() []OutboxStatus {
	var out []OutboxStatus
	for _, r := range o.cfg.Receivers {
		st := OutboxStatus{Receiver: r.Name, Pending: []outboxEntry{}, Dead: []outboxEntry{}}
		for _, sub := range []string{"pending", "dead"} {
			files, _ := filepath.Glob(filepath.Join(o.dir, sub, r.Name, "*.json"))
			sort.Strings(files)
			if len(files) > 100 {
				files = files[:100]
			}
			for _, f := range files {
				if e, err := readEntry(f); err == nil {
					if sub == "pending" {
						st.Pending = append(st.Pending, e)
					} else {
						st.Dead = append(st.Dead, e)
					}
				}
			}
		}
		out = append(out, st)
	}
	return out
}
