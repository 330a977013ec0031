package cluster

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

// reading is one device reading: device index and its per-device sequence.
type drReading struct{ dev, seq int }

// drPublisher plays the devices and their gateway: it appends readings at a
// steady rate through the current site's Log, and records which were
// acknowledged (when, by which site) and which were not (to resend, as a
// device does when it gets no acknowledgement).
type drPublisher struct {
	devices, rate int

	mu       sync.Mutex
	stopNew  bool // only resend what was not acknowledged
	inflight int
	log      *Log
	site     string
	next     []int
	acked    map[drReading]ackAt
	unacked  map[drReading]bool
	waits    chan pendingAck
}

type ackAt struct {
	at   time.Time
	site string
}

type pendingAck struct {
	r    drReading
	site string
	wait func(context.Context) error
}

func newDRPublisher(l *Log, site string, devices, rate int) *drPublisher {
	return &drPublisher{devices: devices, rate: rate, log: l, site: site, next: make([]int, devices),
		acked: map[drReading]ackAt{}, unacked: map[drReading]bool{}, waits: make(chan pendingAck, 1<<16)}
}

// run publishes until ctx is done; then it waits for the outstanding acks.
func (p *drPublisher) run(ctx context.Context) {
	done := make(chan struct{})
	go p.collect(done)
	const tick = 10 * time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	n := 0
	start := time.Now()
	for ctx.Err() == nil && !p.finished() {
		due := int(time.Since(start) * time.Duration(p.rate) / time.Second)
		for ; n < due && ctx.Err() == nil; n++ {
			r, ok := p.nextReading(n)
			if !ok {
				break
			}
			p.send(ctx, r)
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
	close(p.waits)
	<-done
}

// nextReading is a reading not acknowledged (a device resends those
// first), else a new one unless stopNew.
func (p *drPublisher) nextReading(n int) (drReading, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for r := range p.unacked {
		delete(p.unacked, r)
		p.inflight++
		return r, true
	}
	if p.stopNew {
		return drReading{}, false
	}
	d := n % p.devices
	p.next[d]++
	p.inflight++
	return drReading{d, p.next[d]}, true
}

// finish stops new readings; run returns once every reading is acknowledged.
func (p *drPublisher) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopNew = true
}

func (p *drPublisher) finished() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopNew && p.inflight == 0 && len(p.unacked) == 0
}

func (p *drPublisher) send(ctx context.Context, r drReading) {
	p.mu.Lock()
	l, site := p.log, p.site
	p.mu.Unlock()
	w, err := l.Append(ctx, PartitionOf(strconv.Itoa(r.dev), 8), fmt.Sprintf("d%d/%d", r.dev, r.seq), fmt.Appendf(nil, "%d %d", r.dev, r.seq))
	if err != nil {
		p.fail(r)
		return
	}
	p.waits <- pendingAck{r, site, w}
}

func (p *drPublisher) fail(r drReading) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inflight--
	if _, ok := p.acked[r]; !ok {
		p.unacked[r] = true
	}
}

// collect waits for each acknowledgement in its own goroutine, so that the
// time of an acknowledgement at one site is not held up by the timeouts of
// appends to the other.
func (p *drPublisher) collect(done chan<- struct{}) {
	defer close(done)
	var wg sync.WaitGroup
	defer wg.Wait()
	for pa := range p.waits {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := pa.wait(ctx); err != nil {
				p.fail(pa.r)
				return
			}
			p.mu.Lock()
			defer p.mu.Unlock()
			p.inflight--
			if _, ok := p.acked[pa.r]; !ok {
				p.acked[pa.r] = ackAt{time.Now(), pa.site}
			}
		})
	}
}

// switchTo moves the devices to another site's gateway (DNS moved).
func (p *drPublisher) switchTo(l *Log, site string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.log, p.site = l, site
}

func (p *drPublisher) ackedCopy() map[drReading]ackAt {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[drReading]ackAt, len(p.acked))
	for r, a := range p.acked {
		out[r] = a
	}
	return out
}

// firstAck is the earliest acknowledgement by site.
func (p *drPublisher) firstAck(site string) time.Time {
	var first time.Time
	for _, a := range p.ackedCopy() {
		if a.site == site && (first.IsZero() || a.at.Before(first)) {
			first = a.at
		}
	}
	return first
}

// countStream counts each reading in the stream.
func countStream(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string) map[drReading]int {
	t.Helper()
	s, err := js.Stream(ctx, stream)
	require.NoError(t, err)
	total := s.CachedInfo().State.Msgs
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	got := map[drReading]int{}
	for seen := uint64(0); seen < total; {
		batch, err := c.Fetch(1000, jetstream.FetchMaxWait(5*time.Second))
		require.NoError(t, err)
		for m := range batch.Messages() {
			var r drReading
			if _, err := fmt.Sscanf(string(m.Data()), "%d %d", &r.dev, &r.seq); err == nil {
				got[r]++
			} else {
				require.Equal(t, "probe", string(m.Data()))
			}
			seen++
		}
		require.NoError(t, batch.Error())
	}
	return got
}

// lossReport counts, among the acknowledged readings, those missing from
// got and those found more than once; span is the time from the earliest
// acknowledgement of a missing reading to the disaster.
func lossReport(acked map[drReading]ackAt, got map[drReading]int, disaster time.Time) (lost, dup int, span time.Duration) {
	for r, a := range acked {
		switch n := got[r]; {
		case n == 0:
			lost++
			span = max(span, disaster.Sub(a.at))
		case n > 1:
			dup++
		}
	}
	return lost, dup, span
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestDisasterPrimarySiteLostStandbyPromoted is the disaster-recovery run:
// readings appended at a 3-server primary under load; the link to the
// 1-server standby cut and restored (the mirror catches up); every primary
// server SIGKILLed; the standby promoted; the devices moved to it (resending
// what was not acknowledged). Then every acknowledged reading is looked up
// in the standby's stream: lost (the RPO) and duplicated; and the time from
// the disaster to the first acknowledgement at the standby (the RTO at the
// stream level). Last, the primary returns: it is fenced, its unreplicated
// tail salvaged, and it is re-synced as a mirror of the standby.
// CITYPULSE_TEST_DR_RATE sets the write rate (readings/s, default 1000).
func TestDisasterPrimarySiteLostStandbyPromoted(t *testing.T) {
	if os.Getenv("CITYPULSE_TEST_DR") == "" {
		t.Skip("the disaster-recovery run (4 nats-server processes, about a minute): make test-dr")
	}
	rate := envInt("CITYPULSE_TEST_DR_RATE", 1000)
	sites := natstest.StartSites(t, 3, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	p := newDRSite(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, 3)
	s := newDRSite(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, 1)
	startPrimary(t, ctx, p, 3)
	runCtx, stopRun := context.WithCancel(ctx)
	var bg sync.WaitGroup
	bg.Add(1)
	go func() { defer bg.Done(); _ = s.sb.Run(runCtx) }()
	defer func() { stopRun(); bg.Wait() }()

	pub := newDRPublisher(p.log, natstest.PrimaryDomain, 50, rate)
	pubCtx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() { defer close(pubDone); pub.run(pubCtx) }()
	defer func() { stopPub(); <-pubDone }()

	time.Sleep(3 * time.Second)
	cutAndRestore(t, sites, s)
	time.Sleep(3 * time.Second)

	// The disaster.
	lag := s.sb.Status().Streams[0]
	pinfo, err := p.js.Stream(ctx, Default().Stream)
	require.NoError(t, err)
	sinfo, err := s.js.Stream(ctx, Default().Stream)
	require.NoError(t, err)
	disaster := killAll(sites.Primary)
	t.Logf("at the disaster: standby %.3f s behind (last sync), %d messages behind (primary last seq %d, standby %d, read after it)",
		lag.SecondsBehind, int64(pinfo.CachedInfo().State.LastSeq)-int64(sinfo.CachedInfo().State.LastSeq),
		pinfo.CachedInfo().State.LastSeq, sinfo.CachedInfo().State.LastSeq)

	require.ErrorIs(t, s.sb.Promote(ctx, PromoteOptions{}), ErrPeerNotFenced)
	require.NoError(t, s.sb.Promote(ctx, PromoteOptions{PeerDown: true}))
	promoted := time.Since(disaster)
	w, err := s.log.Append(ctx, 0, "probe", []byte("probe"))
	require.NoError(t, err)
	require.NoError(t, w(ctx))
	probe := time.Since(disaster)
	pub.switchTo(s.log, natstest.StandbyDomain)
	require.Eventually(t, func() bool { return !pub.firstAck(natstest.StandbyDomain).IsZero() }, time.Minute, 10*time.Millisecond)
	rto := pub.firstAck(natstest.StandbyDomain).Sub(disaster)
	time.Sleep(3 * time.Second)
	pub.finish()
	select {
	case <-pubDone:
	case <-time.After(time.Minute):
		t.Fatal("the devices' resends were not all acknowledged within a minute")
	}

	acked := pub.ackedCopy()
	got := countStream(t, ctx, s.js, Default().Stream)
	lost, dup, span := lossReport(acked, got, disaster)
	t.Logf("rate %d readings/s: %d acknowledged; at the standby %d lost (RPO %v), %d duplicated; promoted %v after the disaster, first append acknowledged there %v after (RTO, stream level), first device reading %v after",
		rate, len(acked), lost, span.Round(time.Millisecond), dup, promoted.Round(time.Millisecond), probe.Round(time.Millisecond), rto.Round(time.Millisecond))
	require.Less(t, span, 5*time.Second, "what was lost is what the mirror lacked at the disaster")
	require.Less(t, rto, 30*time.Second)
	requireUnackedResent(t, pub)

	failBack(t, ctx, sites, p, s, acked, disaster, pinfo.CachedInfo().State.LastSeq)
}

// cutAndRestore cuts the link for 3 s under load and waits until the
// standby is back within its RPO budget.
func cutAndRestore(t *testing.T, sites *natstest.Sites, s *drSite) {
	t.Helper()
	sites.Link.Cut()
	time.Sleep(3 * time.Second)
	cutLag := s.sb.Status().Streams[0]
	t.Logf("after a 3 s cut: %.2f s behind, link up %v, within RPO %v", cutLag.SecondsBehind, cutLag.LinkUp, s.sb.Status().WithinRPO)
	require.False(t, cutLag.LinkUp)
	require.False(t, s.sb.Status().WithinRPO)
	sites.Link.Restore()
	restored := time.Now()
	require.Eventually(t, func() bool { return s.sb.Status().WithinRPO }, time.Minute, 50*time.Millisecond)
	t.Logf("back within the RPO budget %v after the link was restored", time.Since(restored).Round(time.Millisecond))
}

// killAll SIGKILLs every server of the site at once and returns when the
// last one died: the moment of the disaster (acknowledgements continue
// until a stream loses its quorum).
func killAll(c *natstest.Cluster) time.Time {
	var wg sync.WaitGroup
	for _, nd := range c.Nodes {
		wg.Go(nd.Kill)
	}
	wg.Wait()
	return time.Now()
}

// requireUnackedResent checks that the devices' resends all went through.
func requireUnackedResent(t *testing.T, pub *drPublisher) {
	t.Helper()
	pub.mu.Lock()
	defer pub.mu.Unlock()
	require.Empty(t, pub.unacked, "every reading was acknowledged in the end (at one site or the other)")
}

// failBack: the primary's servers return; the standby fences the primary (its
// record has the lower epoch), salvages the primary's unreplicated tail, and
// the primary re-syncs as a mirror of the standby.
func failBack(t *testing.T, ctx context.Context, sites *natstest.Sites, p, s *drSite, acked map[drReading]ackAt, disaster time.Time, hadSeq uint64) {
	t.Helper()
	for _, nd := range sites.Primary.Nodes {
		nd.Restart()
	}
	sites.Primary.WaitReady(time.Minute)
	sites.WaitLinked(time.Minute)
	require.Eventually(t, func() bool {
		return p.sync(ctx).Role == RoleStandby
	}, time.Minute, 100*time.Millisecond, "the returning primary is fenced: its record names the standby")
	require.Error(t, p.sb.MayAcknowledge())
	if err := p.sb.Demote(ctx, DemoteOptions{}); err != nil {
		require.ErrorIs(t, err, ErrUnreplicatedTail, "the primary's unreplicated tail is not deleted unsalvaged")
	}
	// Recovery after a SIGKILL of every server: the stream reports its state
	// once it has a leader again; it must hold at least what it held when
	// last read before the disaster.
	var state jetstream.StreamState
	require.Eventually(t, func() bool {
		ps, err := p.js.Stream(ctx, Default().Stream)
		if err != nil {
			return false
		}
		i := ps.CachedInfo()
		state = i.State
		return i.Cluster != nil && i.Cluster.Leader != "" && i.State.LastSeq >= hadSeq
	}, time.Minute, 200*time.Millisecond, "the returned primary's stream recovers what it held (last seq %d before the disaster, now %+v)", hadSeq, &state)
	t.Logf("the returned primary's stream: %d messages, last seq %d", state.Msgs, state.LastSeq)
	copied, err := s.sb.Salvage(ctx)
	require.NoError(t, err)
	got := countStream(t, ctx, s.js, Default().Stream)
	lost, dup, _ := lossReport(acked, got, disaster)
	t.Logf("salvaged %v sequences from the returned primary: now %d lost, %d duplicated", copied, lost, dup)
	require.Zero(t, lost, "with the primary's disks back, nothing acknowledged is lost")
	require.NoError(t, p.sb.Demote(ctx, DemoteOptions{}))
	want := s.msgs(t, ctx, Default().Stream)
	require.Eventually(t, func() bool {
		return p.sync(ctx).WithinRPO && p.msgs(t, ctx, Default().Stream) == want
	}, time.Minute, 100*time.Millisecond, "the returned primary mirrors everything the standby holds")
}
