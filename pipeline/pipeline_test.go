package pipeline

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// collectSink keeps every reading written to it and can be told to fail.
type collectSink struct {
	name    string
	mu      sync.Mutex
	got     []Reading
	failing atomic.Bool
	calls   atomic.Int64
}

func (c *collectSink) Name() string { return c.name }

func (c *collectSink) Write(_ context.Context, b Batch) error {
	c.calls.Add(1)
	if c.failing.Load() {
		return errors.New("store unavailable")
	}
	c.mu.Lock()
	c.got = append(c.got, b.Readings...)
	c.mu.Unlock()
	return nil
}

func (c *collectSink) readings() []Reading {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Reading(nil), c.got...)
}

func testConfig() Config {
	c := Default()
	c.Shards = 2
	c.SegmentBytes = 64 << 10
	c.JournalMaxBytes = 64 << 20
	c.Batch = BatchPolicy{MaxReadings: 100, MaxAge: 20 * time.Millisecond}
	c.RetryMin = 10 * time.Millisecond
	c.RetryMax = 50 * time.Millisecond
	return c
}

type running struct {
	p      *Pipeline
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, dir string, cfg Config, sinks ...Sink) *running {
	t.Helper()
	specs := make([]SinkSpec, len(sinks))
	for i, s := range sinks {
		specs[i] = SinkSpec{Sink: s}
	}
	p, err := New(Options{Config: cfg, Dir: dir, Sinks: specs, DrainTimeout: 500 * time.Millisecond})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx) }()
	return r
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	require.NoError(t, <-r.done)
}

func reading(dev string, seq int) Reading {
	return Reading{Device: dev, Kind: "pipe", District: "gulou", Metric: "pressure",
		Value: float64(seq), Time: int64(seq) * int64(time.Second), Received: 42}
}

// submitAll submits per device: devices × n readings, in messages of k.
func submitAll(t *testing.T, p *Pipeline, devices, n, k int) {
	t.Helper()
	var wg sync.WaitGroup
	for d := 0; d < devices; d++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev := fmt.Sprintf("pipe-%04d", d)
			for i := 0; i < n; i += k {
				rs := make([]Reading, 0, k)
				for j := i; j < min(i+k, n); j++ {
					rs = append(rs, reading(dev, j))
				}
				if err := p.Submit(context.Background(), rs); err != nil {
					t.Errorf("submit: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// requireAllInOrder checks that every device's readings 0..n-1 arrived, each
// once, in order.
func requireAllInOrder(t *testing.T, got []Reading, devices, n int) {
	t.Helper()
	byDev := map[string][]float64{}
	for _, r := range got {
		byDev[r.Device] = append(byDev[r.Device], r.Value)
	}
	require.Len(t, byDev, devices)
	for dev, vs := range byDev {
		require.Len(t, vs, n, "device %s", dev)
		for i, v := range vs {
			require.Equal(t, float64(i), v, "device %s reading %d out of order or missing", dev, i)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestPipelineDeliversEveryReadingInDeviceOrder(t *testing.T) {
	dir := t.TempDir()
	sink := &collectSink{name: "collect"}
	r := start(t, dir, testConfig(), sink)
	submitAll(t, r.p, 8, 500, 10)
	waitFor(t, "all readings", func() bool { return len(sink.readings()) == 8*500 })
	r.stop(t)
	requireAllInOrder(t, sink.readings(), 8, 500)
	for _, rd := range sink.readings() {
		require.Equal(t, "gulou", rd.District)
		require.Equal(t, int64(42), rd.Received)
	}
}

func TestPipelineResumesFromTheSinkCursorAfterRestart(t *testing.T) {
	dir := t.TempDir()
	sink := &collectSink{name: "collect"}
	r := start(t, dir, testConfig(), sink)
	submitAll(t, r.p, 4, 100, 10)
	waitFor(t, "first run", func() bool { return len(sink.readings()) == 400 })
	r.stop(t)

	// Second run: the sink saw everything, so nothing is replayed.
	sink2 := &collectSink{name: "collect"}
	late := &collectSink{name: "late"} // a new sink reads the journal from its start
	r = start(t, dir, testConfig(), sink2, late)
	waitFor(t, "late sink catches up", func() bool { return len(late.readings()) == 400 })
	r.stop(t)
	require.Empty(t, sink2.readings())
	requireAllInOrder(t, late.readings(), 4, 100)
}

func TestPipelineReplaysWhatAFailedSinkHadNotWritten(t *testing.T) {
	dir := t.TempDir()
	sink := &collectSink{name: "collect"}
	sink.failing.Store(true)
	r := start(t, dir, testConfig(), sink)
	submitAll(t, r.p, 4, 100, 10) // acknowledged while the sink fails
	r.stop(t)
	require.Empty(t, sink.readings())

	sink2 := &collectSink{name: "collect"}
	r = start(t, dir, testConfig(), sink2)
	waitFor(t, "replay", func() bool { return len(sink2.readings()) == 400 })
	r.stop(t)
	requireAllInOrder(t, sink2.readings(), 4, 100)
}

func TestAFailingSinkDelaysNeitherIngestNorOtherSinks(t *testing.T) {
	dir := t.TempDir()
	slow := &collectSink{name: "slow"}
	fast := &collectSink{name: "fast"}
	slow.failing.Store(true)
	cfg := testConfig()
	r := start(t, dir, cfg, slow, fast)

	const devices, n = 8, 2000
	submitAll(t, r.p, devices, n, 10)
	waitFor(t, "the healthy sink", func() bool { return len(fast.readings()) == devices*n })
	outage := 30 * time.Second
	if testing.Short() {
		outage = 2 * time.Second
	}
	time.Sleep(outage) // the failing sink keeps failing while nothing else waits for it
	require.Empty(t, slow.readings())
	require.Positive(t, r.p.Status()[0].LagBytes)
	require.NotEmpty(t, r.p.Status()[0].LastError)

	t0 := time.Now()
	slow.failing.Store(false)
	waitFor(t, "the backlog to drain", func() bool { return len(slow.readings()) == devices*n })
	elapsed := time.Since(t0)
	t.Logf("sink failed for %v; its backlog of %d readings drained in %v (%.0f readings/s, including the retry backoff)",
		outage, devices*n, elapsed.Round(time.Millisecond), float64(devices*n)/elapsed.Seconds())
	r.stop(t)
	requireAllInOrder(t, slow.readings(), devices, n)
	requireAllInOrder(t, fast.readings(), devices, n)
}

func TestJournalFullPushesBackAndRecovers(t *testing.T) {
	dir := t.TempDir()
	sink := &collectSink{name: "collect"}
	sink.failing.Store(true)
	cfg := testConfig()
	cfg.Shards = 1
	cfg.JournalMaxBytes = 2 * cfg.SegmentBytes
	r := start(t, dir, cfg, sink)

	accepted := 0
	var bpErr error
	for i := 0; i < 100000 && bpErr == nil; i++ {
		err := r.p.Submit(context.Background(), []Reading{reading("pipe-0001", i)})
		if errors.Is(err, ErrBackpressure) {
			bpErr = err
			break
		}
		require.NoError(t, err)
		accepted++
	}
	require.ErrorIs(t, bpErr, ErrBackpressure, "the journal bound must push back")
	require.Contains(t, bpErr.Error(), "full")

	sink.failing.Store(false)
	waitFor(t, "the sink to drain the journal", func() bool { return len(sink.readings()) == accepted })
	waitFor(t, "segments to be deleted", func() bool { return r.p.JournalBytes() < cfg.JournalMaxBytes })
	require.NoError(t, r.p.Submit(context.Background(), []Reading{reading("pipe-0001", accepted)}))
	waitFor(t, "the new reading", func() bool { return len(sink.readings()) == accepted+1 })
	r.stop(t)
	requireAllInOrder(t, sink.readings(), 1, accepted+1)
}

func TestSubmitAfterStopIsRefused(t *testing.T) {
	r := start(t, t.TempDir(), testConfig())
	r.stop(t)
	require.ErrorIs(t, r.p.Submit(context.Background(), []Reading{reading("pipe-0001", 1)}), ErrClosed)
}

func TestSubmitRejectsMixedDevices(t *testing.T) {
	r := start(t, t.TempDir(), testConfig())
	defer r.stop(t)
	err := r.p.Submit(context.Background(), []Reading{reading("pipe-0001", 1), reading("pipe-0002", 1)})
	require.ErrorContains(t, err, "one device")
	other := reading("pipe-0001", 2)
	other.District = "xuanwu"
	err = r.p.Submit(context.Background(), []Reading{reading("pipe-0001", 1), other})
	require.ErrorContains(t, err, "one kind and district", "the record format stores the district once")
}

func TestChangingTheShardCountIsRefused(t *testing.T) {
	dir := t.TempDir()
	r := start(t, dir, testConfig())
	r.stop(t)
	cfg := testConfig()
	cfg.Shards = 3
	_, err := New(Options{Config: cfg, Dir: dir})
	require.ErrorContains(t, err, "pipeline.shards is 3 but the journal")
}

func TestFsyncPoliciesAllDeliver(t *testing.T) {
	for _, pol := range []FsyncPolicy{FsyncAlways, FsyncInterval, FsyncNever} {
		t.Run(string(pol), func(t *testing.T) {
			cfg := testConfig()
			cfg.Fsync = pol
			sink := &collectSink{name: "collect"}
			r := start(t, t.TempDir(), cfg, sink)
			submitAll(t, r.p, 2, 50, 5)
			waitFor(t, "all", func() bool { return len(sink.readings()) == 100 })
			r.stop(t)
		})
	}
}

func TestBatchPolicy(t *testing.T) {
	p := BatchPolicy{MaxReadings: 10, MaxBytes: 100, MaxAge: time.Second}
	t0 := time.Unix(0, 0)
	tests := []struct {
		name      string
		n, size   int
		now       time.Time
		full, due bool
	}{
		{"a small young batch waits", 1, 10, t0, false, false},
		{"a batch at max readings is full", 10, 10, t0, true, false},
		{"a batch at max bytes is full", 2, 100, t0, true, false},
		{"a batch at max age is due", 1, 1, t0.Add(time.Second), false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.full, p.Full(tc.n, tc.size))
			require.Equal(t, tc.due, p.Due(t0, tc.now))
		})
	}
	require.False(t, BatchPolicy{MaxReadings: 10}.Full(1, 1<<30), "max_bytes 0 means no byte limit")
}

func TestConfigValidateNamesTheKey(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"zero shards", func(c *Config) { c.Shards = 0 }, "pipeline.shards"},
		{"unknown fsync policy", func(c *Config) { c.Fsync = "sometimes" }, "pipeline.fsync"},
		{"tiny journal bound", func(c *Config) { c.JournalMaxBytes = 1 }, "pipeline.journal_max_bytes"},
		{"zero batch age", func(c *Config) { c.Batch.MaxAge = 0 }, "pipeline.batch.max_age"},
	}
	require.NoError(t, Default().Validate())
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.mutate(&c)
			require.ErrorContains(t, c.Validate(), tc.want)
		})
	}
}

// writeRecords writes n single-reading records into a fresh one-shard journal
// and returns the segment file.
func writeRecords(t *testing.T, dir string, n int) string {
	t.Helper()
	j, _, err := openJournal(dir, 1<<30, discard())
	require.NoError(t, err)
	for i := 0; i < n; i++ {
		require.NoError(t, j.append(appendRecord(nil, []Reading{reading("pipe-0001", i)})))
	}
	require.NoError(t, j.close())
	return filepath.Join(dir, segmentName(0))
}

func readAll(t *testing.T, j *journal) []Reading {
	t.Helper()
	r := newJournalReader(j)
	defer r.close()
	var out []Reading
	pos := uint64(0)
	for {
		var err error
		before := len(out)
		out, pos, _, err = r.read(pos, out, 1000, 0)
		require.NoError(t, err)
		if len(out) == before {
			return out
		}
	}
}

func TestJournalRecoversEveryRecordBeforeTheDamage(t *testing.T) {
	const n = 100
	offsetOf := func(k int) int { // records vary in length (varint times)
		off := 0
		for i := 0; i < k; i++ {
			off += len(appendRecord(nil, []Reading{reading("pipe-0001", i)}))
		}
		return off
	}
	tests := []struct {
		name     string
		damage   func(t *testing.T, path string)
		wantKept int
	}{
		{"a torn tail record is cut off", func(t *testing.T, path string) {
			fi, err := os.Stat(path)
			require.NoError(t, err)
			require.NoError(t, os.Truncate(path, fi.Size()-3))
		}, n - 1},
		{"a flipped bit in the middle drops the rest of the segment", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			b[offsetOf(50)+headerSize+5] ^= 0x10
			require.NoError(t, os.WriteFile(path, b, 0o644))
		}, 50},
		{"a zero-filled page is detected", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			off := offsetOf(30)
			clear(b[off:min(off+4096, len(b))])
			require.NoError(t, os.WriteFile(path, b, 0o644))
		}, 30},
		{"zeros appended after the last record are dropped", func(t *testing.T, path string) {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			require.NoError(t, err)
			_, err = f.Write(make([]byte, 4096))
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}, n},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := writeRecords(t, dir, n)
			tc.damage(t, path)
			j, st, err := openJournal(dir, 1<<30, discard())
			require.NoError(t, err, "damage must never stop the journal from opening")
			require.Equal(t, tc.wantKept, st.Records)
			require.Positive(t, st.DroppedBytes)
			got := readAll(t, j)
			require.Len(t, got, tc.wantKept)
			for i, r := range got {
				require.Equal(t, float64(i), r.Value)
			}
			// The journal stays writable after recovery.
			require.NoError(t, j.append(appendRecord(nil, []Reading{reading("pipe-0001", 999)})))
			require.Len(t, readAll(t, j), tc.wantKept+1)
			require.NoError(t, j.close())
		})
	}
}

func TestJournalReaderFollowsSegmentsAndTrimming(t *testing.T) {
	dir := t.TempDir()
	j, _, err := openJournal(dir, 1024, discard())
	require.NoError(t, err)
	for i := 0; i < 200; i++ {
		require.NoError(t, j.append(appendRecord(nil, []Reading{reading("pipe-0001", i)})))
	}
	ents, _ := os.ReadDir(dir)
	require.Greater(t, len(ents), 3, "records should span several segments")
	got := readAll(t, j)
	require.Len(t, got, 200)
	n, err := j.truncateBefore(got[150].Seq)
	require.NoError(t, err)
	require.Positive(t, n)
	require.NoError(t, j.close())

	j, st, err := openJournal(dir, 1024, discard())
	require.NoError(t, err)
	require.Zero(t, st.DroppedBytes)
	rest := readAll(t, j)
	// Only whole segments before the position are deleted: the first kept
	// reading lies in the segment that holds reading 150.
	require.Greater(t, rest[0].Value, float64(100))
	require.LessOrEqual(t, rest[0].Value, float64(150))
	require.Equal(t, float64(199), rest[len(rest)-1].Value)
	require.NoError(t, j.close())
}

func TestRecordRoundTrip(t *testing.T) {
	rs := []Reading{
		{Device: "tl-0001", Kind: "traffic_light", District: "xuanwu", Metric: "state", Value: 3, Time: -5, Received: 7},
		{Device: "tl-0001", Kind: "traffic_light", District: "xuanwu", Metric: "queue_length", Value: 12.5, Time: 1 << 62, Received: 7},
	}
	b := appendRecord(nil, rs)
	n, err := recordLen(b)
	require.NoError(t, err)
	require.Equal(t, len(b), n)
	got, err := decodeRecord(nil, b[headerSize:], 9, make(interner))
	require.NoError(t, err)
	for i := range rs {
		rs[i].Seq = 9
	}
	require.Equal(t, rs, got)
}

func TestShardOfIsStable(t *testing.T) {
	seen := map[int]bool{}
	for i := 0; i < 1000; i++ {
		dev := fmt.Sprintf("pipe-%04d", i)
		s := ShardOf(dev, 4)
		require.Equal(t, s, ShardOf(dev, 4))
		seen[s] = true
	}
	keys := make([]int, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	require.Equal(t, []int{0, 1, 2, 3}, keys, "devices spread over every shard")
}

// The re-read at start-up is counted: what a sink had not confirmed before a
// stop is replayed (an upper bound on what it may receive twice), and after a
// clean catch-up nothing is.
func TestReplayAtStartIsCounted(t *testing.T) {
	dir := t.TempDir()
	sink := &collectSink{name: "collect"}
	sink.failing.Store(true)
	r := start(t, dir, testConfig(), sink)
	submitAll(t, r.p, 4, 100, 10)
	r.stop(t)

	replayed := func(sinks ...Sink) float64 {
		specs := make([]SinkSpec, len(sinks))
		for i, s := range sinks {
			specs[i] = SinkSpec{Sink: s}
		}
		reg := prometheus.NewRegistry()
		p, err := New(Options{Config: testConfig(), Dir: dir, Sinks: specs, DrainTimeout: 500 * time.Millisecond, Registerer: reg})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- p.Run(ctx) }()
		waitFor(t, "catch-up", func() bool {
			c, ok := sinks[0].(*collectSink)
			return !ok || len(c.readings()) == 400
		})
		cancel()
		require.NoError(t, <-done)
		return testutil.ToFloat64(p.m.sinkReplay.WithLabelValues("collect"))
	}
	first := replayed(&collectSink{name: "collect"})
	require.Positive(t, first, "the unconfirmed journal is re-read")
	require.Zero(t, replayed(&collectSink{name: "collect-other"}, &collectSink{name: "collect"}), "nothing after a clean catch-up")
}
