package cluster

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/pipeline"
)

func reading(dev string, t int64) pipeline.Reading {
	return pipeline.Reading{Device: dev, Kind: "pipe", District: "d0", Metric: "pressure", Value: float64(t), Time: t, Received: t}
}

// runPublisher starts p.Run and returns its stop function.
func runPublisher(t *testing.T, p *Publisher) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-done)
		})
	}
	t.Cleanup(stop)
	return stop
}

// publisherEnv is a one-server NATS "cluster" with the readings stream of
// the given partitions and a publisher on it, not yet running.
type publisherEnv struct {
	c   *natstest.Cluster
	cfg Config
	m   *Metrics
	l   *Log
	p   *Publisher
	ctx context.Context // ends with the test, a minute at most
}

func newPublisherEnv(t *testing.T, partitions int, tune func(*Config)) publisherEnv {
	t.Helper()
	e := publisherEnv{c: natstest.Start(t, 1), cfg: testConfig(1, partitions), m: NewMetrics(nil)}
	if tune != nil {
		tune(&e.cfg)
	}
	var err error
	e.l, err = NewLog(connect(t, e.c.URL()), e.cfg, e.m)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	e.ctx = ctx
	_, err = e.l.EnsureStream(ctx)
	require.NoError(t, err)
	e.p = NewPublisher(e.l, "gw-0", e.m)
	return e
}

// readStream decodes every batch in the stream: device → reading times in
// stream order, and the number of batches.
func readStream(t *testing.T, l *Log, cfg Config) (map[string][]int64, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := l.JetStream().Stream(ctx, cfg.Stream)
	require.NoError(t, err)
	info, err := s.Info(ctx)
	require.NoError(t, err)
	got := map[string][]int64{}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		require.NoError(t, err)
		rs, err := DecodeBatch(m.Data, nil)
		require.NoError(t, err)
		for _, r := range rs {
			require.Equal(t, Subject(PartitionOf(r.Device, cfg.Partitions)), m.Subject, "a reading goes to its device's partition")
			got[r.Device] = append(got[r.Device], r.Time)
		}
	}
	return got, int(info.State.Msgs)
}

func TestPublisherReturnsOnceJetStreamAcknowledgedAndCoalesces(t *testing.T) {
	e := newPublisherEnv(t, 8, nil)
	cfg, m, l, p, ctx := e.cfg, e.m, e.l, e.p, e.ctx
	runPublisher(t, p)

	// 64 devices submit 50 readings each, one at a time, all at once: the
	// submissions share the window and are coalesced per partition.
	const devices, each = 64, 50
	var wg sync.WaitGroup
	errs := make(chan error, devices*each)
	for d := range devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev := fmt.Sprintf("dev-%02d", d)
			for i := range each {
				errs <- p.Submit(ctx, []pipeline.Reading{reading(dev, int64(i))})
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	got, batches := readStream(t, l, cfg)
	require.Len(t, got, devices)
	for dev, times := range got {
		want := make([]int64, each)
		for i := range want {
			want[i] = int64(i)
		}
		require.Equal(t, want, times, "%s: every acknowledged reading once, in submission order", dev)
	}
	require.Less(t, batches, devices*each, "submissions waiting for an acknowledgement go together")
	t.Logf("%d submissions in %d batches", devices*each, batches)
	require.Zero(t, testutil.CollectAndCount(m.submitFailed), "no submission failed")
}

func TestPublisherSplitsASubmissionByPartition(t *testing.T) {
	e := newPublisherEnv(t, 8, nil)
	cfg, l, p, ctx := e.cfg, e.l, e.p, e.ctx
	runPublisher(t, p)
	var rs []pipeline.Reading
	for i := range 40 {
		rs = append(rs, reading(fmt.Sprintf("dev-%d", i%10), int64(i)))
	}
	require.NoError(t, p.Submit(ctx, rs))
	got, _ := readStream(t, l, cfg)
	require.Len(t, got, 10)
	for i := range 10 {
		require.Equal(t, []int64{int64(i), int64(i + 10), int64(i + 20), int64(i + 30)}, got[fmt.Sprintf("dev-%d", i)])
	}
}

// Without JetStream a submission fails (the device is not acknowledged)
// within cluster.publish_timeout, and is counted; a stopped publisher
// refuses at once.
func TestPublisherFailsWithoutJetStream(t *testing.T) {
	e := newPublisherEnv(t, 4, func(cfg *Config) { cfg.PublishTimeout = 2 * time.Second })
	c, cfg, m, p, ctx := e.c, e.cfg, e.m, e.p, e.ctx
	stop := runPublisher(t, p)
	require.NoError(t, p.Submit(ctx, []pipeline.Reading{reading("dev-1", 1)}))

	c.Nodes[0].Kill()
	start := time.Now()
	err := p.Submit(ctx, []pipeline.Reading{reading("dev-1", 2)})
	require.ErrorIs(t, err, ErrNotDurable)
	require.ErrorIs(t, err, pipeline.ErrBackpressure, "the gateways treat it as a full journal: not acknowledged, retry later")
	require.Less(t, time.Since(start), 4*cfg.PublishTimeout, "bounded by cluster.publish_timeout")
	require.Equal(t, 1.0, testutil.ToFloat64(m.submitFailed.WithLabelValues("not_acknowledged"))+
		testutil.ToFloat64(m.submitFailed.WithLabelValues("timeout")))

	stop()
	require.ErrorIs(t, p.Submit(ctx, []pipeline.Reading{reading("dev-1", 3)}), ErrPublisherStopped)
}

// With cluster.publish_linger, submissions arriving within it go in one
// batch even when nothing is in flight.
func TestPublisherLingersForLargerBatches(t *testing.T) {
	e := newPublisherEnv(t, 1, func(cfg *Config) { cfg.PublishLinger = 500 * time.Millisecond })
	cfg, l, p, ctx := e.cfg, e.l, e.p, e.ctx
	runPublisher(t, p)
	var wg sync.WaitGroup
	for d := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			require.NoError(t, p.Submit(ctx, []pipeline.Reading{reading(fmt.Sprintf("dev-%d", d), 1)}))
		}()
	}
	wg.Wait()
	got, batches := readStream(t, l, cfg)
	require.Len(t, got, 20)
	require.LessOrEqual(t, batches, 3, "20 submissions within the linger: one batch, or a few on a slow machine")
}

// TestAFencedPublisherRefusesAsBackpressure: while the fence says no (a
// disaster-recovery site that is not the active one), Submit stores nothing
// and refuses as backpressure, counted with reason fenced; once it says yes,
// the same readings are stored.
func TestAFencedPublisherRefusesAsBackpressure(t *testing.T) {
	e := newPublisherEnv(t, 4, nil)
	cfg, m, l, p, ctx := e.cfg, e.m, e.l, e.p, e.ctx
	var active sync.Mutex
	standby := true
	p.SetFence(func() error {
		active.Lock()
		defer active.Unlock()
		if standby {
			return fmt.Errorf("site b is standby")
		}
		return nil
	})
	runPublisher(t, p)
	rs := []pipeline.Reading{reading("dev-1", 1), reading("dev-2", 2)}

	err := p.Submit(ctx, rs)
	require.ErrorIs(t, err, pipeline.ErrBackpressure)
	require.ErrorContains(t, err, "site b is standby")
	require.Equal(t, 1.0, testutil.ToFloat64(m.submitFailed.WithLabelValues("fenced")))
	s, err := l.JetStream().Stream(ctx, cfg.Stream)
	require.NoError(t, err)
	info, err := s.Info(ctx)
	require.NoError(t, err)
	require.Zero(t, info.State.Msgs, "nothing stored while fenced")

	active.Lock()
	standby = false
	active.Unlock()
	require.NoError(t, p.Submit(ctx, rs))
	got, _ := readStream(t, l, cfg)
	require.Equal(t, map[string][]int64{"dev-1": {1}, "dev-2": {2}}, got)
}
