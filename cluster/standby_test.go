package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

const registryStream = "KV_citypulse_registry"

// drSite is one site's view in a test: its JetStream, its Standby, metrics.
type drSite struct {
	js  jetstream.JetStream
	sb  *Standby
	reg *prometheus.Registry
	log *Log
}

func newDRSite(t *testing.T, url, site, peer string, replicas int) *drSite {
	t.Helper()
	nc := connect(t, url)
	cfg := DefaultStandby(site, peer)
	cfg.Streams = []string{Default().Stream, registryStream}
	cfg.Replicas = 1
	cfg.RPOBudget = 2 * time.Second
	cfg.PollInterval = 200 * time.Millisecond
	cfg.LinkTimeout = time.Second
	// Adding the salvage source makes the server scan the whole stream
	// backwards for earlier copies from that source: 130k messages took more
	// than 30 s on the loaded test machine.
	cfg.CatchUpTimeout = 2 * time.Minute
	reg := prometheus.NewRegistry()
	sb, err := NewStandby(nc, cfg, NewStandbyMetrics(reg), nil)
	require.NoError(t, err)
	l, err := NewLog(nc, testConfig(replicas, 8), nil)
	require.NoError(t, err)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	return &drSite{js: js, sb: sb, reg: reg, log: l}
}

// sync runs one Sync round; errors are expected while the link is down.
func (d *drSite) sync(ctx context.Context) StandbyStatus {
	_ = d.sb.Sync(ctx)
	return d.sb.Status()
}

func (d *drSite) gauge(t *testing.T, name, label string) float64 {
	t.Helper()
	mfs, err := d.reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() == label {
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("metric %s{%s} not found", name, label)
	return 0
}

func (d *drSite) msgs(t *testing.T, ctx context.Context, stream string) uint64 {
	t.Helper()
	s, err := d.js.Stream(ctx, stream)
	require.NoError(t, err)
	return s.CachedInfo().State.Msgs
}

// appendN appends n batches at the site and waits for every acknowledgement.
func (d *drSite) appendN(t *testing.T, ctx context.Context, prefix string, n int) {
	t.Helper()
	waits := make([]func(context.Context) error, 0, n)
	for i := range n {
		w, err := d.log.Append(ctx, i%8, fmt.Sprintf("%s/%d", prefix, i), fmt.Appendf(nil, "%s %d", prefix, i))
		require.NoError(t, err)
		waits = append(waits, w)
	}
	for _, w := range waits {
		require.NoError(t, w(ctx))
	}
}

// startPrimary creates the primary's readings stream and registry bucket,
// puts a device in the registry and activates the site.
func startPrimary(t *testing.T, ctx context.Context, p *drSite, replicas int) jetstream.KeyValue {
	t.Helper()
	_, err := p.log.EnsureStream(ctx)
	require.NoError(t, err)
	kv, err := p.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "citypulse_registry", History: 4, Replicas: replicas})
	require.NoError(t, err)
	_, err = kv.Put(ctx, "pipe-0001", []byte(`{"district":"north"}`))
	require.NoError(t, err)
	require.NoError(t, p.sb.Activate(ctx))
	require.Error(t, p.sb.Activate(ctx), "a second activation is refused")
	return kv
}

func TestStandbyMirrorsCatchUpAfterTheLinkIsCutAndLagIsExported(t *testing.T) {
	sites := natstest.StartSites(t, 1, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p := newDRSite(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, 1)
	s := newDRSite(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, 1)
	kv := startPrimary(t, ctx, p, 1)
	p.appendN(t, ctx, "before", 300)

	require.Eventually(t, func() bool {
		st := s.sync(ctx)
		return st.Role == RoleStandby && st.ActiveSite == natstest.PrimaryDomain && s.sb.CheckRPO() == nil &&
			s.msgs(t, ctx, Default().Stream) == 300
	}, time.Minute, 100*time.Millisecond, "the standby mirrors the readings and follows the primary's record")
	require.Error(t, s.sb.MayAcknowledge(), "a standby acknowledges nothing")
	require.Equal(t, RoleActive, p.sync(ctx).Role)
	require.NoError(t, p.sb.MayAcknowledge(), "the primary's record names it")
	skv, err := s.js.KeyValue(ctx, "citypulse_registry")
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		e, err := skv.Get(ctx, "pipe-0001")
		return err == nil && string(e.Value()) == `{"district":"north"}`
	}, 30*time.Second, 100*time.Millisecond, "the registry bucket is readable as a key-value bucket at the standby")

	sites.Link.Cut()
	p.appendN(t, ctx, "during", 500)
	_, err = kv.Put(ctx, "pipe-0002", []byte(`{"district":"south"}`))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		st := s.sync(ctx)
		return !st.PeerReachable && !st.Streams[0].LinkUp && st.Streams[0].SecondsBehind > 2.5
	}, time.Minute, 100*time.Millisecond, "with the link cut the lag grows past the 2 s budget")
	st := s.sb.Status()
	require.Equal(t, uint64(300), s.msgs(t, ctx, Default().Stream), "nothing crossed the cut link")
	require.Greater(t, st.Streams[0].SecondsBehind, 2.0)
	require.False(t, st.WithinRPO)
	require.ErrorContains(t, s.sb.CheckRPO(), "behind the active site")
	require.Equal(t, 1.0, s.gauge(t, "citypulse_dr_rpo_exceeded", ""))
	require.Greater(t, s.gauge(t, "citypulse_dr_replication_lag_seconds", Default().Stream), 2.0)
	require.Equal(t, 2.0, s.gauge(t, "citypulse_dr_rpo_budget_seconds", ""))

	sites.Link.Restore()
	restored := time.Now()
	require.Eventually(t, func() bool {
		st := s.sync(ctx)
		return st.WithinRPO && st.PeerReachable && s.msgs(t, ctx, Default().Stream) == 800
	}, time.Minute, 100*time.Millisecond, "the mirror catches up once the link is back")
	t.Logf("caught up %v after the link was restored; lag now %.2f s", time.Since(restored), s.sb.Status().Streams[0].SecondsBehind)
	require.Equal(t, 0.0, s.gauge(t, "citypulse_dr_rpo_exceeded", ""))
	require.Equal(t, 0.0, s.gauge(t, "citypulse_dr_replication_lag_messages", Default().Stream))
	require.Eventually(t, func() bool {
		e, err := skv.Get(ctx, "pipe-0002")
		return err == nil && string(e.Value()) == `{"district":"south"}`
	}, 30*time.Second, 100*time.Millisecond, "a registry change made during the cut arrives")

	time.Sleep(4 * time.Second) // idle, longer than the budget
	st = s.sync(ctx)
	t.Logf("idle link: %+v", st.Streams)
	require.True(t, st.WithinRPO, "an idle, healthy link is not lag: the mirror hears the source's heartbeats")
}

func TestPromoteFencesTheOtherSiteAndFailBackLosesNothing(t *testing.T) {
	sites := natstest.StartSites(t, 1, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	p := newDRSite(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, 1)
	s := newDRSite(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, 1)
	startPrimary(t, ctx, p, 1)
	p.appendN(t, ctx, "primary", 200)
	require.Eventually(t, func() bool {
		return s.sync(ctx).WithinRPO && s.msgs(t, ctx, Default().Stream) == 200
	}, time.Minute, 100*time.Millisecond)

	// The link cut: the standby cannot tell a dead primary from a cut link.
	sites.Link.Cut()
	err := s.sb.Promote(ctx, PromoteOptions{})
	require.ErrorIs(t, err, ErrPeerNotFenced)
	require.Equal(t, RoleStandby, s.sync(ctx).Role)
	sites.Link.Restore()
	sites.WaitLinked(time.Minute)

	// Planned switch-over: the primary is fenced, the mirrors drained, then promoted.
	require.Eventually(t, func() bool { return s.sync(ctx).PeerReachable }, time.Minute, 100*time.Millisecond)
	require.NoError(t, s.sb.Promote(ctx, PromoteOptions{}))
	require.Equal(t, RoleStandby, p.sync(ctx).Role, "the old primary's own record now names the standby")
	require.Error(t, p.sb.MayAcknowledge())
	require.NoError(t, s.sb.MayAcknowledge())
	require.Equal(t, RoleActive, s.sync(ctx).Role)
	require.Equal(t, 1.0, s.gauge(t, "citypulse_dr_role", RoleActive))
	require.Equal(t, 2.0, s.gauge(t, "citypulse_dr_epoch", ""))
	s.appendN(t, ctx, "standby", 100) // the promoted stream takes the gateways' appends
	require.Equal(t, uint64(300), s.msgs(t, ctx, Default().Stream))
	require.Equal(t, uint64(200), p.msgs(t, ctx, Default().Stream), "the link does not carry readings to the old primary's stream")

	// Fail-back: the old primary becomes a mirror of the standby, then takes over again.
	require.NoError(t, p.sb.Demote(ctx, DemoteOptions{}))
	require.Eventually(t, func() bool {
		return p.sync(ctx).WithinRPO && p.msgs(t, ctx, Default().Stream) == 300
	}, time.Minute, 100*time.Millisecond, "the returned primary re-syncs from the standby")
	require.NoError(t, p.sb.Promote(ctx, PromoteOptions{}))
	require.Equal(t, RoleStandby, s.sync(ctx).Role)
	require.Equal(t, RoleActive, p.sync(ctx).Role)
	require.NoError(t, s.sb.Demote(ctx, DemoteOptions{}))
	p.appendN(t, ctx, "back", 50)
	require.Eventually(t, func() bool {
		return s.sync(ctx).WithinRPO && s.msgs(t, ctx, Default().Stream) == 350
	}, time.Minute, 100*time.Millisecond, "the standby mirrors the primary again")
	require.Equal(t, uint64(350), p.msgs(t, ctx, Default().Stream), "nothing the standby acknowledged was lost")
	require.Equal(t, 3.0, p.gauge(t, "citypulse_dr_epoch", ""))
}

// A partition, not a disaster: the operator wrongly states the primary down
// while only the link is cut, and the primary keeps acknowledging. When the
// link returns, the higher epoch fences the primary, its tail (acknowledged
// during the cut, never mirrored) is refused deletion, salvaged into the
// promoted standby, and only then is the primary re-synced as a mirror.
func TestAReturningPrimaryIsFencedAndItsUnreplicatedTailSalvaged(t *testing.T) {
	sites := natstest.StartSites(t, 1, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	p := newDRSite(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, 1)
	s := newDRSite(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, 1)
	kv := startPrimary(t, ctx, p, 1)
	p.appendN(t, ctx, "mirrored", 100)
	require.Eventually(t, func() bool {
		return s.sync(ctx).WithinRPO && s.msgs(t, ctx, Default().Stream) == 100
	}, time.Minute, 100*time.Millisecond)

	sites.Link.Cut()
	p.appendN(t, ctx, "tail", 40) // acknowledged at the primary, never mirrored
	// A state write at the cut-off primary: superseded by the active site's
	// state, neither salvaged nor a reason for Demote to refuse.
	_, err := kv.Put(ctx, "written.during.the.cut", []byte("stale"))
	require.NoError(t, err)
	require.NoError(t, s.sb.Promote(ctx, PromoteOptions{PeerDown: true}))
	s.appendN(t, ctx, "promoted", 60)
	require.Equal(t, RoleActive, p.sync(ctx).Role, "cut off, the primary cannot know: this is why PeerDown must be true")
	require.Equal(t, RoleActive, s.sync(ctx).Role)

	sites.Link.Restore()
	sites.WaitLinked(time.Minute)
	require.Eventually(t, func() bool {
		return s.sync(ctx).PeerReachable && p.sync(ctx).Role == RoleStandby
	}, time.Minute, 100*time.Millisecond, "the active site writes its higher epoch into the primary's bucket")
	require.Error(t, p.sb.MayAcknowledge())
	require.Equal(t, 1.0, s.gauge(t, "citypulse_dr_role", RoleActive))

	err = p.sb.Demote(ctx, DemoteOptions{})
	require.ErrorIs(t, err, ErrUnreplicatedTail)
	require.ErrorContains(t, err, "sequences 101..140")
	require.ErrorContains(t, err, Default().Stream, "the readings' tail, not the bucket's, stops the demotion")
	copied, err := s.sb.Salvage(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]uint64{Default().Stream: 40}, copied)
	require.Equal(t, uint64(200), s.msgs(t, ctx, Default().Stream), "100 mirrored + 60 promoted + 40 salvaged")
	copied, err = s.sb.Salvage(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]uint64{Default().Stream: 0}, copied, "salvage is done once")

	require.NoError(t, p.sb.Demote(ctx, DemoteOptions{}), "the bucket's tail is discarded without --discard-tail")
	require.Eventually(t, func() bool {
		return p.sync(ctx).WithinRPO && p.msgs(t, ctx, Default().Stream) == 200
	}, time.Minute, 100*time.Millisecond)
	skv, err := s.js.KeyValue(ctx, "citypulse_registry")
	require.NoError(t, err)
	_, err = skv.Get(ctx, "written.during.the.cut")
	require.ErrorIs(t, err, jetstream.ErrKeyNotFound, "the cut-off primary's bucket write is not salvaged into the active site")
}

func TestFenceRecordRule(t *testing.T) {
	for _, tc := range []struct {
		name            string
		a, b            Record
		aWins, conflict bool
	}{
		{"higher epoch wins", Record{Site: "standby", Epoch: 2}, Record{Site: "primary", Epoch: 1}, true, false},
		{"lower epoch loses", Record{Site: "primary", Epoch: 1}, Record{Site: "standby", Epoch: 2}, false, false},
		{"same record", Record{Site: "primary", Epoch: 3}, Record{Site: "primary", Epoch: 3}, false, false},
		{"same epoch, two sites", Record{Site: "primary", Epoch: 3}, Record{Site: "standby", Epoch: 3}, false, true},
		{"no record yet", Record{}, Record{}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.aWins, tc.a.Wins(tc.b))
			require.Equal(t, tc.conflict, tc.a.Conflicts(tc.b))
		})
	}
}

func TestStandbyConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*StandbyConfig)
		want string
	}{
		{"defaults", func(*StandbyConfig) {}, ""},
		{"same site and peer", func(c *StandbyConfig) { c.PeerDomain = c.Site }, "standby.site"},
		{"no streams", func(c *StandbyConfig) { c.Streams = nil }, "standby.streams"},
		{"replicas 2", func(c *StandbyConfig) { c.Replicas = 2 }, "standby.replicas"},
		{"poll slower than the budget", func(c *StandbyConfig) { c.PollInterval = time.Minute }, "standby.poll_interval"},
		{"zero timeout", func(c *StandbyConfig) { c.LinkTimeout = 0 }, "link_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultStandby("b", "a")
			tc.edit(&c)
			err := c.Validate()
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}
