package clusterstate

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/silence"
)

const silencesBucket = "CITYPULSE_SILENCES"

// runUntilCleanup runs f until the test ends.
func runUntilCleanup(t *testing.T, f func(ctx context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := f(ctx); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// startSilences is one node's shared silences on nc (writable says whether
// its site may change them; nil: always), running until the test ends.
func startSilences(t *testing.T, nc *nats.Conn, writable func() error) *Silences {
	return startSilencesPurging(t, nc, writable, deleteMarkerAge)
}

// startSilencesPurging is startSilences with the delete markers purged once
// markerAge old (every markerAge/2).
func startSilencesPurging(t *testing.T, nc *nats.Conn, writable func() error, markerAge time.Duration) *Silences {
	t.Helper()
	s := NewSilences(SilencesOptions{Bucket: silencesBucket, Replicas: 1})
	s.markerAge = markerAge
	runUntilCleanup(t, func(ctx context.Context) error { return s.Run(ctx, nc, writable) })
	return s
}

func waitReady(t *testing.T, s *Silences) {
	t.Helper()
	select {
	case <-s.Ready():
	case <-time.After(time.Minute):
		t.Fatal("the silences bucket's contents were not read within a minute")
	}
}

func gulouSilence(by string) silence.Silence {
	return silence.Silence{Matchers: []silence.Matcher{{Name: "district", Value: "gulou", IsEqual: true}},
		EndsAt: time.Now().Add(time.Hour), CreatedBy: by, Comment: "main repair in Gulou"}
}

func firing(fp, district string) notifier.Event {
	now := time.Now()
	return notifier.Event{Kind: notifier.KindFiring, At: now, StartsAt: now, Fingerprint: fp, Key: fp + "-firing-1",
		Labels: map[string]string{"alertname": "burst_main", "district": district}}
}

// A silence added through node A's store holds back a notification that
// node B (another NATS server) sends through its gate to a real webhook; an
// alert it does not match passes; the silence expired at node B releases
// the held firing. With node-local stores (the old code) node B would have
// sent the silenced firing at once.
func TestASilenceAddedAtOneNodeHoldsBackAnotherNodesNotification(t *testing.T) {
	c := natstest.Start(t, 3)
	a := startSilences(t, connect(t, c.Nodes[0].URL()), nil)
	b := startSilences(t, connect(t, c.Nodes[2].URL()), nil)
	waitReady(t, a)
	waitReady(t, b)

	hook := newWebhook(t)
	ncfg := notifier.Default()
	ncfg.RetryMin, ncfg.RetryMax = 20*time.Millisecond, 100*time.Millisecond
	ncfg.AllowHosts = []string{"127.0.0.1"}
	ncfg.Receivers = []notifier.ReceiverConfig{{Name: "ops", Type: "webhook", URL: hook.srv.URL, Secret: "0123456789abcdef-receiver", Timeout: time.Second}}
	out, err := notifier.NewOutbox(ncfg, t.TempDir(), notifier.OutboxOptions{})
	require.NoError(t, err)
	runUntilCleanup(t, out.Run)
	gate := silence.NewGate(b.Store(), silence.GateFuncs[notifier.Event]{
		Labels:   func(ev notifier.Event) map[string]string { return ev.Labels },
		Key:      func(ev notifier.Event) string { return ev.Fingerprint },
		Resolved: func(ev notifier.Event) bool { return ev.Kind == notifier.KindResolved },
	}, out, prometheus.NewRegistry())

	sl, err := a.Store().Add(gulouSilence("ops-anna"))
	require.NoError(t, err)
	start := time.Now()
	require.Eventually(t, func() bool {
		_, ok := b.Store().Silenced(map[string]string{"district": "gulou"})
		return ok
	}, 30*time.Second, 20*time.Millisecond, "node B sees node A's silence")
	t.Logf("node A's silence reached node B in %v", time.Since(start).Round(time.Millisecond))
	require.Len(t, b.Store().Silences(), 1)
	require.Equal(t, sl.ID, b.Store().Silences()[0].ID)

	gate.Enqueue(firing("fp-gulou", "gulou"))
	gate.Enqueue(firing("fp-xuanwu", "xuanwu"))
	require.Eventually(t, func() bool { return hook.distinct("firing") >= 1 }, 30*time.Second, 20*time.Millisecond)
	time.Sleep(500 * time.Millisecond) // a silenced firing would have been sent with the other
	hook.mu.Lock()
	require.Equal(t, map[string]int{"fp-xuanwu-firing-1": 1}, hook.keys, "only the alert no silence matches is notified")
	hook.mu.Unlock()

	// An ack made at B reaches A.
	_, err = b.Store().Acknowledge(silence.Ack{Fingerprint: "fp-gulou", StartsAt: start, By: "ops-bo"})
	require.NoError(t, err)
	require.Eventually(t, func() bool { _, ok := a.Store().Acks()["fp-gulou"]; return ok }, 30*time.Second, 20*time.Millisecond)

	// The silence ended at B (not where it was made): A forgets it, and B's
	// gate sends the firing it held back.
	require.NoError(t, b.Store().Expire(sl.ID))
	require.Eventually(t, func() bool { return len(a.Store().Silences()) == 0 }, 30*time.Second, 20*time.Millisecond)
	require.Equal(t, 1, gate.Release())
	require.Eventually(t, func() bool { return hook.distinct("firing") == 2 }, 30*time.Second, 20*time.Millisecond)

	// A node started later reads what is in the bucket.
	_, err = a.Store().Add(gulouSilence("ops-anna"))
	require.NoError(t, err)
	late := startSilences(t, connect(t, c.Nodes[1].URL()), nil)
	waitReady(t, late)
	require.Len(t, late.Store().Silences(), 1)
}

// A silence made at the primary site is in the standby site's store within
// seconds, through the mirror of the bucket over the link. The standby's
// copy refuses changes (503 at the API) until the site is promoted; then the
// bucket is its own: the primary's silence is still there and a new one
// can be added.
func TestTheStandbySiteMirrorsThePrimarysSilences(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	psb, pnc, ssb, snc := silencesSites(ctx, t)
	primary := startSilences(t, pnc, psb.MayAcknowledge)
	waitReady(t, primary)
	sl, err := primary.Store().Add(gulouSilence("ops-anna"))
	require.NoError(t, err)

	runUntilCleanup(t, ssb.Run)
	standby := startSilences(t, snc, ssb.MayAcknowledge)
	start := time.Now()
	require.Eventually(t, func() bool {
		id, ok := standby.Store().Silenced(map[string]string{"district": "gulou"})
		return ok && id == sl.ID
	}, time.Minute, 50*time.Millisecond, "the standby's store holds the primary's silence")
	t.Logf("the primary's silence was in the standby's store %v after the standby started", time.Since(start).Round(time.Millisecond))

	_, err = standby.Store().Add(gulouSilence("ops-bo"))
	require.ErrorIs(t, err, silence.ErrReadOnly, "a standby's copy takes no changes")

	// A change at the primary while the standby watches arrives too.
	require.NoError(t, primary.Store().Expire(sl.ID))
	require.Eventually(t, func() bool { return len(standby.Store().Silences()) == 0 }, time.Minute, 50*time.Millisecond)
	sl, err = primary.Store().Add(gulouSilence("ops-anna"))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(standby.Store().Silences()) == 1 }, time.Minute, 50*time.Millisecond)

	// Promoted (a planned switch-over: the primary is fenced), the standby
	// writes its own bucket.
	require.NoError(t, ssb.Promote(ctx, cluster.PromoteOptions{}))
	var added silence.Silence
	require.Eventually(t, func() bool {
		added, err = standby.Store().Add(gulouSilence("ops-bo"))
		return err == nil
	}, time.Minute, 100*time.Millisecond, "the promoted site's store takes changes: %v", err)
	ids := map[string]bool{}
	for _, s := range standby.Store().Silences() {
		ids[s.ID] = true
	}
	require.Equal(t, map[string]bool{sl.ID: true, added.ID: true}, ids)
	require.Eventually(t, func() bool {
		_, err = primary.Store().Add(gulouSilence("ops-anna"))
		return errors.Is(err, silence.ErrReadOnly)
	}, time.Minute, 50*time.Millisecond, "the fenced primary takes no changes once it has read its record")
}

// silencesSites starts a primary and a standby site (one nats-server each)
// and their standby controllers for the silences bucket alone: the
// primary's is active and running, the standby's is left to the test to run.
func silencesSites(ctx context.Context, t *testing.T) (psb *cluster.Standby, pnc *nats.Conn, ssb *cluster.Standby, snc *nats.Conn) {
	t.Helper()
	sites := natstest.StartSites(t, 1, 1)
	site := func(url, name, peer string) (*cluster.Standby, *nats.Conn) {
		nc := connect(t, url)
		cfg := cluster.DefaultStandby(name, peer)
		cfg.Streams = []string{"KV_" + silencesBucket}
		cfg.Replicas = 1
		cfg.RPOBudget, cfg.PollInterval, cfg.LinkTimeout = 5*time.Second, 200*time.Millisecond, time.Second
		sb, err := cluster.NewStandby(nc, cfg, cluster.NewStandbyMetrics(prometheus.NewRegistry()), nil)
		require.NoError(t, err)
		return sb, nc
	}
	psb, pnc = site(sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain)
	ssb, snc = site(sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain)
	require.NoError(t, psb.Activate(ctx))
	runUntilCleanup(t, psb.Run)
	return psb, pnc, ssb, snc
}

// A silence that has ended leaves the bucket: the nodes delete it within a
// few seconds of its end (before, every silence ever made stayed in it).
func TestAnEndedSilenceLeavesTheBucket(t *testing.T) {
	c := natstest.Start(t, 1)
	nc := connect(t, c.Nodes[0].URL())
	a := startSilences(t, nc, nil)
	waitReady(t, a)
	short := gulouSilence("ops-anna")
	short.EndsAt = time.Now().Add(1500 * time.Millisecond)
	sl, err := a.Store().Add(short)
	require.NoError(t, err)
	long, err := a.Store().Add(gulouSilence("ops-bo"))
	require.NoError(t, err)

	js, err := jetstream.New(nc)
	require.NoError(t, err)
	kv, err := js.KeyValue(context.Background(), silencesBucket)
	require.NoError(t, err)
	_, err = kv.Get(context.Background(), "silence."+sl.ID)
	require.NoError(t, err, "in the bucket while it lasts")
	require.Eventually(t, func() bool {
		_, err := kv.Get(context.Background(), "silence."+sl.ID)
		return errors.Is(err, jetstream.ErrKeyNotFound)
	}, 30*time.Second, 100*time.Millisecond, "the ended silence is deleted from the bucket")
	_, err = kv.Get(context.Background(), "silence."+long.ID)
	require.NoError(t, err, "the one still running stays")
}

// The delete marker an ended silence leaves is purged once it is older than
// markerAge: the bucket's stream does not grow with every silence ever made.
func TestDeleteMarkersArePurged(t *testing.T) {
	c := natstest.Start(t, 1)
	nc := connect(t, c.Nodes[0].URL())
	a := startSilencesPurging(t, nc, nil, 2*time.Second) // purged every second, once 2 s old
	waitReady(t, a)
	long := addEnding(t, a, 5)

	js, err := jetstream.New(nc)
	require.NoError(t, err)
	msgs := bucketMsgs(t, nc)
	require.Equal(t, uint64(6), msgs(), "six silences")
	kv, err := js.KeyValue(context.Background(), silencesBucket)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		keys, err := kv.ListKeys(context.Background())
		require.NoError(t, err)
		n := 0
		for range keys.Keys() {
			n++
		}
		return n == 1
	}, 30*time.Second, 100*time.Millisecond, "the five ended silences are deleted")
	require.Eventually(t, func() bool { return msgs() == 1 }, 30*time.Second, 100*time.Millisecond,
		"their five delete markers are purged; the running silence stays")
	_, err = kv.Get(context.Background(), "silence."+long.ID)
	require.NoError(t, err)
	require.Len(t, a.Store().Silences(), 1, "the store still has the running silence")
}

// JetStream mirrors copy messages, not purges: the delete markers the
// primary purges stay in the standby's mirror (one small message per ended
// silence) until the standby is promoted; then its own nodes purge them.
func TestAStandbysMirrorKeepsTheMarkersUntilPromoted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	psb, pnc, ssb, snc := silencesSites(ctx, t)
	runUntilCleanup(t, ssb.Run)
	node := func(nc *nats.Conn, writable func() error) *Silences {
		s := startSilencesPurging(t, nc, writable, 2*time.Second) // purged every second, once 2 s old
		waitReady(t, s)
		return s
	}
	primaryMsgs, standbyMsgs := bucketMsgs(t, pnc), bucketMsgs(t, snc)

	primary := node(pnc, psb.MayAcknowledge)
	addEnding(t, primary, 3)
	standby := node(snc, ssb.MayAcknowledge)
	require.Eventually(t, func() bool { return primaryMsgs() == 1 }, 30*time.Second, 100*time.Millisecond,
		"the primary deletes the three ended silences and purges their markers")
	require.Eventually(t, func() bool { return standbyMsgs() == 4 && len(standby.Store().Silences()) == 1 },
		30*time.Second, 100*time.Millisecond, "the mirror has the running silence and the three markers")
	time.Sleep(3 * time.Second) // past markerAge, and past a purge at the primary
	require.Equal(t, uint64(4), standbyMsgs(), "the primary's purge did not reach the mirror")

	require.NoError(t, ssb.Promote(ctx, cluster.PromoteOptions{}))
	require.Eventually(t, func() bool { return standbyMsgs() == 1 }, 30*time.Second, 100*time.Millisecond,
		"the promoted site purges the markers it mirrored")
	require.Len(t, standby.Store().Silences(), 1, "the running silence stays")
}

// addEnding adds a silence that runs for an hour, which it returns, and n
// that end within a second.
func addEnding(t *testing.T, s *Silences, n int) silence.Silence {
	t.Helper()
	long, err := s.Store().Add(gulouSilence("ops-bo"))
	require.NoError(t, err)
	for range n {
		short := gulouSilence("ops-anna")
		short.EndsAt = time.Now().Add(500 * time.Millisecond)
		_, err := s.Store().Add(short)
		require.NoError(t, err)
	}
	return long
}

// bucketMsgs returns a function that counts the messages of the silences
// bucket's stream on nc's server (0 before the stream exists).
func bucketMsgs(t *testing.T, nc *nats.Conn) func() uint64 {
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	return func() uint64 {
		stream, err := js.Stream(context.Background(), "KV_"+silencesBucket)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return 0
		}
		require.NoError(t, err)
		info, err := stream.Info(context.Background())
		require.NoError(t, err)
		return info.State.Msgs
	}
}
