package notifier

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/citypulse/citypulse/internal/durable"
	"github.com/citypulse/citypulse/pipeline"
)

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
	cfg    Config
	dir    string
	log    *slog.Logger
	m      *outboxMetrics
	client *http.Client
	now    func() time.Time
	dur    Durability
	obs    DeliveryObserver // nil: none

	mu       sync.Mutex
	queue    []queued
	unsynced []string // pending files written since the last fsync pass
	wake     chan struct{}
	queues   map[string]*rqueue
	seq      uint64
	// cluster mode (handover.go): OnDone's function, and how many receivers
	// still have each event (by key); nil remaining: not counted
	done      func(ev Event)
	remaining map[string]int
}

type outboxMetrics struct {
	deliveries *prometheus.CounterVec
	dropped    prometheus.Counter
	latency    prometheus.Histogram
	stages     *prometheus.HistogramVec
}

// queued is an event handed to Enqueue, not yet on disk.
type queued struct {
	ev Event
	at time.Time // when Enqueue took it
}

// The parts of a notification's way, as citypulse_notify_stage_seconds
// labels them: the event's time (the reading's receipt) until Enqueue (rules,
// the transition log); Enqueue until its file is written and the receiver's
// worker has it; then until its delivery starts; the first POST until its 2xx.
const (
	stageToEnqueue = "to_enqueue"
	stageWrite     = "write"
	stageWait      = "wait"
	stageHTTP      = "http"
)

const maxQueued = 100_000

// OutboxOptions are what an outbox is built with besides its config and directory.
type OutboxOptions struct {
	Durability Durability
	// Observer learns how each delivery went (nil: no one).
	Observer   DeliveryObserver
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// NewOutbox builds the outbox in dir; it starts nothing.
func NewOutbox(cfg Config, dir string, opts OutboxOptions) (*Outbox, error) {
	dur, log, reg := opts.Durability, opts.Logger, opts.Registerer
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if dur.Fsync == pipeline.FsyncInterval && dur.Interval <= 0 {
		return nil, fmt.Errorf("outbox: fsync interval must be > 0, got %v", dur.Interval)
	}
	o := &Outbox{cfg: cfg, dir: dir, dur: dur, obs: opts.Observer, log: log, now: time.Now, wake: make(chan struct{}, 1), queues: map[string]*rqueue{}}
	o.client = &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, Control: o.guard}).DialContext,
		MaxIdleConnsPerHost: deliveriesPerReceiver, IdleConnTimeout: time.Minute,
	}}
	o.m = newOutboxMetrics(reg)
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

func newOutboxMetrics(reg prometheus.Registerer) *outboxMetrics {
	m := &outboxMetrics{
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citypulse_notify_deliveries_total", Help: "Notification delivery attempts, by result."}, []string{"result"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citypulse_notify_events_dropped_total", Help: "Events dropped because the in-memory queue was full (100000)."}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "citypulse_notify_latency_seconds",
			Help:    "From the transition (the server's receive time of the reading that caused it, or the tick) to the receiver's 2xx, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 24)}), // 0.5 ms .. ~70 min
		stages: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "citypulse_notify_stage_seconds",
			Help: "Parts of a notification's way: to_enqueue (reading received until the rules engine enqueued it), " +
				"write (its outbox file written, the receiver's worker has it), wait (until its delivery started), " +
				"http (first POST until the 2xx; only first-attempt deliveries).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 1.5, 30)}, []string{"stage"}), // 0.1 ms .. ~13 s
	}
	if reg != nil {
		reg.MustRegister(m.deliveries, m.dropped, m.latency, m.stages)
	}
	return m
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
	now := o.now()
	o.queue = append(o.queue, queued{ev: ev, at: now})
	o.mu.Unlock()
	o.m.stages.WithLabelValues(stageToEnqueue).Observe(now.Sub(ev.At).Seconds())
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// Entry is one event on disk for one receiver, as the outbox API lists it.
type Entry struct {
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
		if err := durable.SyncFile(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			o.log.Error("notify: cannot fsync an outbox file", "file", p, "err", err)
		}
		dirs[filepath.Dir(p)] = true
	}
	for d := range dirs {
		if err := durable.SyncDir(d); err != nil {
			o.log.Error("notify: cannot fsync the outbox directory", "dir", d, "err", err)
		}
	}
}

// persistQueued writes every queued event to each receiver's pending
// directory and hands it to the receiver's queue.
func (o *Outbox) persistQueued() {
	o.mu.Lock()
	q := o.queue
	o.queue = nil
	o.mu.Unlock()
	for i, qe := range q {
		ev := qe.ev
		ps, err := o.persist(ev)
		if err != nil {
			o.log.Error("notify: cannot write the outbox; the event is kept in memory and retried", "err", err)
			o.mu.Lock()
			o.queue = append(q[i:len(q):len(q)], o.queue...)
			o.mu.Unlock()
			return
		}
		o.mu.Lock()
		for range ps {
			o.expect(ev)
		}
		if o.dur.Fsync == pipeline.FsyncInterval {
			for _, p := range ps {
				o.unsynced = append(o.unsynced, p.path)
			}
		}
		o.mu.Unlock()
		written := o.now()
		o.m.stages.WithLabelValues(stageWrite).Observe(written.Sub(qe.at).Seconds())
		for _, p := range ps {
			p.queued = written
			o.queues[p.e.Receiver].push(p)
		}
	}
}

// persist writes ev's file for every receiver; on an error it removes those
// it wrote.
func (o *Outbox) persist(ev Event) ([]*pending, error) {
	var ps []*pending
	for _, r := range o.cfg.Receivers {
		o.seq++
		name := fmt.Sprintf("%020d-%06d-%s.json", o.now().UnixNano(), o.seq%1e6, safeName(ev.Key))
		e := Entry{Receiver: r.Name, Event: ev, Queued: o.now()}
		path := filepath.Join(o.dir, "pending", r.Name, name)
		if err := o.write(path, e); err != nil {
			for _, p := range ps {
				_ = os.Remove(p.path)
			}
			return nil, err
		}
		ps = append(ps, &pending{path: path, e: e})
	}
	return ps, nil
}

func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// write stores an outbox entry by the durability policy.
func (o *Outbox) write(path string, e Entry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return durable.WriteFile(path, b, 0o644, o.dur.FsyncEach())
}

// readEntry reads one outbox file.
func readEntry(path string) (Entry, error) {
	var e Entry
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
		o.mu.Lock()
		o.expect(e.Event)
		o.mu.Unlock()
		q.mu.Lock()
		q.items = append(q.items, &pending{path: path, e: e})
		q.mu.Unlock()
	}
}

// moveDead moves a pending file to the receiver's dead letters, with its
// last attempt count and error (a file that could not be read moves as is).
func (o *Outbox) moveDead(r ReceiverConfig, path string, e Entry) {
	dead := filepath.Join(o.dir, "dead", r.Name, filepath.Base(path))
	if e.Receiver != "" {
		if b, err := json.Marshal(e); err == nil {
			_ = durable.WriteFile(path, b, 0o644, true)
		}
	}
	if err := os.Rename(path, dead); err != nil {
		o.log.Error("notify: cannot move to the dead letters", "file", path, "err", err)
		_ = os.Remove(path)
	}
}

// Status lists one receiver's pending and dead-letter notifications.
type Status struct {
	Receiver string  `json:"receiver"`
	Pending  []Entry `json:"pending"`
	Dead     []Entry `json:"dead"`
}

// Status returns the outbox contents per receiver (at most 100 of each).
func (o *Outbox) Status() []Status {
	var out []Status
	for _, r := range o.cfg.Receivers {
		out = append(out, Status{Receiver: r.Name, Pending: o.list("pending", r), Dead: o.list("dead", r)})
	}
	return out
}

// list reads the oldest 100 entries of one receiver's sub directory.
func (o *Outbox) list(sub string, r ReceiverConfig) []Entry {
	files, _ := filepath.Glob(filepath.Join(o.dir, sub, r.Name, "*.json"))
	sort.Strings(files)
	if len(files) > 100 {
		files = files[:100]
	}
	out := []Entry{}
	for _, f := range files {
		if e, err := readEntry(f); err == nil {
			out = append(out, e)
		}
	}
	return out
}
