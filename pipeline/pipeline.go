package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// Observer sees every reading right after it is journaled, in the shard loop
// that owns its device (so per-device state needs no lock). It must not block:
// no network I/O. The rules engine is an Observer.
type Observer interface {
	Observe(shard int, rs []Reading)
}

// Observers fans readings out to several observers, in order.
type Observers []Observer

// Observe calls every observer.
func (os Observers) Observe(shard int, rs []Reading) {
	for _, o := range os {
		o.Observe(shard, rs)
	}
}

// SinkSpec is a sink and its batch policy.
type SinkSpec struct {
	Sink Sink
	// Batch overrides Config.Batch for this sink when non-nil.
	Batch *BatchPolicy
}

// Options configures a Pipeline.
type Options struct {
	Config Config
	// Dir holds the journal (one directory per shard) and the sink cursors.
	Dir      string
	Sinks    []SinkSpec
	Observer Observer
	Logger   *slog.Logger
	// Registerer receives the pipeline's metrics; nil registers none.
	Registerer prometheus.Registerer
	// DrainTimeout bounds how long Run keeps writing to sinks after its context
	// is done; what is left stays in the journal and is replayed at the next start.
	DrainTimeout time.Duration
}

// Pipeline shards readings by device, journals them with group commit, and feeds
// each sink from its own cursor over the journal.
type Pipeline struct {
	cfg     Config
	dir     string
	log     *slog.Logger
	m       *metrics
	obs     Observer
	shards  []*shard
	sinks   []*sinkState
	drain   time.Duration
	closing atomic.Bool
	pool    sync.Pool

	lastBPLog atomic.Int64

	// lifeMu orders Run and Close: Run takes it for its whole life, so Close
	// waits for a Run to end and a Run after Close is refused.
	lifeMu sync.Mutex
	closed bool
}

// Pending is a submission queued by Begin: its shard loop journals it in
// the background and answers Wait. The shard loop reads its readings until
// it answers.
type Pending struct {
	rs   []Reading
	done chan error
	p    *Pipeline
	s    *shard
}

// request is the shard loop's name for a Pending.
type request = Pending

// New opens (and recovers) the journal and the sink cursors. It starts no
// goroutines: call Run.
func New(o Options) (*Pipeline, error) {
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	if o.Dir == "" {
		return nil, errors.New("pipeline: Dir is required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 5 * time.Second
	}
	p := &Pipeline{cfg: o.Config, dir: o.Dir, log: o.Logger, m: newMetrics(o.Registerer), obs: o.Observer, drain: o.DrainTimeout}
	p.pool.New = func() any { return &request{done: make(chan error, 1)} }
	if err := p.checkShardCount(); err != nil {
		return nil, err
	}
	for i := 0; i < o.Config.Shards; i++ {
		j, st, err := openJournal(filepath.Join(o.Dir, "journal", fmt.Sprintf("shard-%03d", i)), o.Config.SegmentBytes, o.Logger)
		if err != nil {
			p.closeJournals()
			return nil, fmt.Errorf("open journal of shard %d: %w", i, err)
		}
		p.m.recoveredRecs.Add(float64(st.Records))
		p.m.droppedBytes.Add(float64(st.DroppedBytes))
		if st.Damaged > 0 {
			o.Logger.Warn("journal recovered with damage: records after the damage were dropped",
				"shard", i, "damaged_segments", st.Damaged, "dropped_bytes", st.DroppedBytes, "kept_records", st.Records)
		}
		p.shards = append(p.shards, &shard{id: i, p: p, j: j, q: newQueue(o.Config.QueueSize), done: make(chan struct{})})
	}
	names := map[string]bool{}
	for _, s := range o.Sinks {
		name := s.Sink.Name()
		if names[name] || !validSinkName(name) {
			p.closeJournals()
			return nil, fmt.Errorf("pipeline: sink name %q is empty, invalid or used twice", name)
		}
		names[name] = true
		policy := o.Config.Batch
		if s.Batch != nil {
			policy = *s.Batch
			if err := policy.Validate("sink " + name + " batch"); err != nil {
				p.closeJournals()
				return nil, err
			}
		}
		cf := newCursorFile(o.Dir, name)
		pos, err := cf.load(o.Config.Shards)
		if err != nil && pos == nil {
			p.closeJournals()
			return nil, err
		}
		if err != nil {
			o.Logger.Warn("pipeline: "+err.Error(), "sink", name)
		}
		p.sinks = append(p.sinks, &sinkState{sink: s.Sink, name: name, policy: policy, cursor: cf, pos: pos, saved: append([]uint64(nil), pos...)})
		var replay uint64
		for i, sh := range p.shards {
			if end := sh.j.written.Load(); end > pos[i] {
				replay += end - pos[i]
			}
		}
		p.m.sinkReplay.WithLabelValues(name).Add(float64(replay))
	}
	if len(p.sinks) > 0 {
		n := tailReadings(p.sinks)
		for _, sh := range p.shards {
			sh.tail = newTail(n)
		}
	}
	p.updateGauges()
	return p, nil
}

// tailReadings sizes each shard's in-memory tail: twice the largest batch
// of any sink (a worker with a batch begun reads again once enough was
// appended to fill it), within [1024, 40000] readings (about 100 bytes each
// plus the strings they share).
func tailReadings(sinks []*sinkState) int {
	n := 0
	for _, st := range sinks {
		n = max(n, 2*st.policy.MaxReadings)
	}
	return min(max(n, 1024), 40000)
}

func validSinkName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// checkShardCount refuses a change of pipeline.shards while old shard journals
// exist: readings of one device would be split across shards and reordered.
func (p *Pipeline) checkShardCount() error {
	path := filepath.Join(p.dir, "journal", "shards")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("create journal dir: %w", err)
		}
		return os.WriteFile(path, []byte(strconv.Itoa(p.cfg.Shards)), 0o644)
	}
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(string(b))
	if err != nil {
		return fmt.Errorf("journal shard count file %s is damaged: %v", path, err)
	}
	if n != p.cfg.Shards {
		return fmt.Errorf("pipeline.shards is %d but the journal in %s was written with %d shards; set pipeline.shards back to %d (or let the sinks drain and remove the journal directory)",
			p.cfg.Shards, filepath.Dir(path), n, n)
	}
	return nil
}

func (p *Pipeline) closeJournals() {
	for _, s := range p.shards {
		s.j.close()
	}
}

// Shards returns the number of shards.
func (p *Pipeline) Shards() int { return len(p.shards) }

// ShardOf returns the shard that owns device.
func (p *Pipeline) ShardOf(device string) int { return ShardOf(device, len(p.shards)) }

// Submit journals the readings of one device (one kind, one district) and returns when they are durable
// by the fsync policy: then, and only then, may the device be acknowledged.
// On success each reading's Seq is its journal record's position (see
// Landed). It returns ErrBackpressure (wrapped) when the journal is at its bound or cannot
// be written, ErrClosed when the pipeline is stopping, or ctx's error. rs may be
// reused once Submit returns nil or an error other than ctx's.
func (p *Pipeline) Submit(ctx context.Context, rs []Reading) error {
	w, err := p.Begin(ctx, rs)
	if err != nil || w == nil {
		return err
	}
	return w.Wait(ctx)
}

// Begin queues the readings of one device (one kind, one district) behind
// that device's earlier submissions and returns without waiting for the
// journal: a gateway keeps reading the device's next messages while this one
// is journaled, and the shard loop's group commit carries them all. Wait on
// the result says when they are durable; call it exactly once, and leave rs
// unchanged until it returned (the shard loop reads it). A nil Pending and
// nil error mean rs was empty. The errors are Submit's, decided before
// queueing: nothing of rs is journaled.
func (p *Pipeline) Begin(ctx context.Context, rs []Reading) (*Pending, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	// A journal record stores device, kind and district once: a submission is
	// the readings of one device in one district.
	dev, kind, district := rs[0].Device, rs[0].Kind, rs[0].District
	for i := 1; i < len(rs); i++ {
		if rs[i].Device != dev || rs[i].Kind != kind || rs[i].District != district {
			return nil, fmt.Errorf("pipeline: a submission must hold one device's readings with one kind and district (got %s/%s/%s and %s/%s/%s)",
				dev, kind, district, rs[i].Device, rs[i].Kind, rs[i].District)
		}
	}
	if p.closing.Load() {
		return nil, ErrClosed
	}
	s := p.shards[ShardOf(dev, len(p.shards))]
	if limit := p.cfg.JournalMaxBytes / int64(len(p.shards)); s.j.bytes() >= limit {
		p.m.backpressure.WithLabelValues("journal_full").Inc()
		p.logBackpressure(s, limit)
		return nil, fmt.Errorf("%w: journal of shard %d is full (%d bytes)", ErrBackpressure, s.id, s.j.bytes())
	}
	req := p.pool.Get().(*request)
	req.rs, req.p, req.s = rs, p, s
	if s.q.put(req) {
		return req, nil
	}
	// The shard loop is behind: retry for a little while, then push back.
	deadline := time.Now().Add(time.Second)
	for !s.q.put(req) {
		err := ctx.Err()
		switch {
		case err != nil:
		case isClosed(s.done):
			err = ErrClosed
		case time.Now().After(deadline):
			p.m.backpressure.WithLabelValues("queue_full").Inc()
			err = fmt.Errorf("%w: shard %d queue stayed full for 1s", ErrBackpressure, s.id)
		default:
			time.Sleep(100 * time.Microsecond)
			continue
		}
		req.release()
		return nil, err
	}
	return req, nil
}

// Wait returns once the submission is durable (nil) or failed: ErrBackpressure
// (wrapped) when the journal could not be written, ErrClosed when the
// pipeline stopped first, or ctx's error. After ctx's error the shard loop
// may still read the readings: they must not be reused. w must not be used
// after Wait.
func (w *Pending) Wait(ctx context.Context) error {
	select {
	case err := <-w.done:
		w.release()
		return err
	case <-ctx.Done():
		// The request may still be journaled; it is not acknowledged, so the
		// device re-sends: a duplicate, never a loss. w stays with the shard.
		return ctx.Err()
	case <-w.s.done:
		select {
		case err := <-w.done:
			w.release()
			return err
		default:
			return ErrClosed
		}
	}
}

// Ready reports whether the shard loop has answered (Wait returns at once).
func (w *Pending) Ready() bool { return len(w.done) > 0 }

func (w *Pending) release() {
	p := w.p
	w.rs, w.p, w.s = nil, nil, nil
	p.pool.Put(w)
}

func (p *Pipeline) logBackpressure(s *shard, limit int64) {
	now := time.Now().UnixNano()
	last := p.lastBPLog.Load()
	if now-last < int64(10*time.Second) || !p.lastBPLog.CompareAndSwap(last, now) {
		return
	}
	slow, lag, lastErr := "", uint64(0), ""
	for _, st := range p.sinks {
		st.mu.Lock()
		if l := s.j.written.Load() - st.pos[s.id]; l >= lag {
			slow, lag, lastErr = st.name, l, st.lastErr
		}
		st.mu.Unlock()
	}
	p.log.Error(fmt.Sprintf("journal is full (%s per shard): devices are not being acknowledged and will retry. "+
		"The slowest sink %q is %s behind (last error: %s); fix that sink, or raise pipeline.journal_max_bytes",
		byteSize(limit), slow, byteSize(int64(lag)), orNone(lastErr)), "shard", s.id)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func byteSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// Run runs the shard loops and the sink workers until ctx is done. Then it stops
// taking submissions, journals what was queued, gives the sinks up to
// DrainTimeout to catch up, saves their cursors and closes the journal.
func (p *Pipeline) Run(ctx context.Context) error {
	p.lifeMu.Lock()
	defer p.lifeMu.Unlock()
	if p.closed {
		return ErrClosed
	}
	defer func() { p.closed = true }()
	sinkCtx, cancelSinks := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelSinks()
	shardsDone := make(chan struct{})

	var sg errgroup.Group
	for _, st := range p.sinks {
		for _, s := range p.shards {
			w := &sinkWorker{p: p, st: st, s: s, r: newJournalReader(s.j)}
			sg.Go(func() error { return w.run(sinkCtx, shardsDone) })
		}
	}
	var g errgroup.Group
	for _, s := range p.shards {
		g.Go(func() error { s.run(ctx); return nil })
	}
	g.Go(func() error { p.housekeeping(ctx); return nil })
	<-ctx.Done()
	p.closing.Store(true)
	_ = g.Wait()
	close(shardsDone)

	stop := time.AfterFunc(p.drain, cancelSinks)
	sinkErr := sg.Wait()
	stop.Stop()
	p.stopCommitSignals()

	var errs []error
	for _, st := range p.sinks {
		if err := st.save(); err != nil {
			errs = append(errs, fmt.Errorf("save cursor of sink %s: %w", st.name, err))
		}
	}
	for _, s := range p.shards {
		if err := s.j.close(); err != nil {
			errs = append(errs, fmt.Errorf("close journal of shard %d: %w", s.id, err))
		}
	}
	return errors.Join(append(errs, sinkErr)...)
}

// Close closes the journal files of a pipeline that never ran (for example
// when start-up fails after New). After Run it has nothing left to do; it
// waits for a Run in progress to return. It is idempotent, and Run after Close
// returns ErrClosed.
func (p *Pipeline) Close() error {
	p.lifeMu.Lock()
	defer p.lifeMu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	p.closing.Store(true)
	p.stopCommitSignals()
	var errs []error
	for _, s := range p.shards {
		if err := s.j.close(); err != nil {
			errs = append(errs, fmt.Errorf("close journal of shard %d: %w", s.id, err))
		}
	}
	return errors.Join(errs...)
}

// housekeeping saves cursors, deletes segments every sink has passed and
// updates gauges.
func (p *Pipeline) housekeeping(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	rates := time.NewTicker(5 * time.Second)
	defer rates.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.saveCursorsAndTrim()
			p.updateGauges()
		case now := <-rates.C:
			for _, st := range p.sinks {
				st.updateRate(now)
			}
		}
	}
}

func (p *Pipeline) saveCursorsAndTrim() {
	for _, st := range p.sinks {
		if err := st.save(); err != nil {
			p.log.Error("pipeline: cannot save sink cursor; it will replay from its last saved position after a restart",
				"sink", st.name, "err", err)
		}
	}
	for _, s := range p.shards {
		lo := s.j.written.Load()
		for _, st := range p.sinks {
			st.mu.Lock()
			lo = min(lo, st.saved[s.id])
			st.mu.Unlock()
		}
		n, err := s.j.truncateBefore(lo)
		p.m.segmentsFreed.Add(float64(n))
		if err != nil {
			p.log.Error("pipeline: cannot delete journal segment", "shard", s.id, "err", err)
		}
	}
}

func (p *Pipeline) updateGauges() {
	for _, s := range p.shards {
		p.m.journalBytes.WithLabelValues(strconv.Itoa(s.id)).Set(float64(s.j.bytes()))
	}
	for _, st := range p.sinks {
		p.m.sinkLag.WithLabelValues(st.name).Set(float64(p.lagBytes(st)))
	}
}

func (p *Pipeline) lagBytes(st *sinkState) int64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	var lag int64
	for _, s := range p.shards {
		if w := s.j.written.Load(); w > st.pos[s.id] {
			lag += int64(w - st.pos[s.id])
		}
	}
	return lag
}

// SinkStatus is a sink's progress, for the API.
type SinkStatus struct {
	Name          string    `json:"name"`
	LagBytes      int64     `json:"lag_bytes"`
	Written       uint64    `json:"readings_written"`
	Batches       uint64    `json:"batches"`
	Errors        uint64    `json:"errors"`
	RatePerSecond float64   `json:"readings_per_second"` // over the last 5 s
	LastError     string    `json:"last_error,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
	LastWriteTime time.Time `json:"last_write_time,omitzero"`
	// Refused counts, by reason, the readings the sink was given but its store
	// refused for their own sake (see RefusalReporter); they are included in
	// Written. Absent for a sink that refuses nothing.
	Refused map[string]uint64 `json:"refused,omitempty"`
}

// Status returns every sink's progress.
func (p *Pipeline) Status() []SinkStatus {
	out := make([]SinkStatus, 0, len(p.sinks))
	for _, st := range p.sinks {
		lag := p.lagBytes(st)
		st.mu.Lock()
		s := SinkStatus{Name: st.name, LagBytes: lag, Written: st.written, Batches: st.batches, RatePerSecond: st.rate,
			Errors: st.errors, LastError: st.lastErr, LastErrorTime: st.lastErrTime, LastWriteTime: st.lastWrite}
		st.mu.Unlock()
		if rr, ok := st.sink.(RefusalReporter); ok {
			s.Refused = rr.Refused()
		}
		out = append(out, s)
	}
	return out
}

// JournalBytes returns the journal's size on disk over all shards.
func (p *Pipeline) JournalBytes() int64 {
	var n int64
	for _, s := range p.shards {
		n += s.j.bytes()
	}
	return n
}
