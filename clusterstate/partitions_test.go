package clusterstate

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/notifier"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/rules"
)

const partitions = 8

func connect(t testing.TB, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	return nc
}

// webhook is a real receiver on loopback: it counts deliveries per
// Idempotency-Key and notification kind, and can refuse with 500.
type webhook struct {
	srv  *httptest.Server
	fail atomic.Bool
	mu   sync.Mutex
	keys map[string]int // Idempotency-Key → 2xx deliveries
}

func newWebhook(t *testing.T) *webhook {
	w := &webhook{keys: map[string]int{}}
	w.srv = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if w.fail.Load() {
			rw.WriteHeader(http.StatusInternalServerError)
			return
		}
		w.mu.Lock()
		w.keys[r.Header.Get("Idempotency-Key")]++
		w.mu.Unlock()
	}))
	t.Cleanup(w.srv.Close)
	return w
}

// distinct is the number of distinct keys delivered whose kind is kind.
func (w *webhook) distinct(kind string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for k := range w.keys {
		if containsKind(k, kind) {
			n++
		}
	}
	return n
}

func containsKind(key, kind string) bool {
	for i := 0; i+len(kind)+2 <= len(key); i++ {
		if key[i:i+len(kind)+2] == "-"+kind+"-" {
			return true
		}
	}
	return false
}

// node is one CityPulse node's state side: engine, outbox, state store.
type node struct {
	eng    *rules.Engine
	out    *notifier.Outbox
	store  *cluster.StateStore
	ps     *Partitions
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

const burstRule = "{name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 60s}"

func startNode(t *testing.T, nc *nats.Conn, hook *webhook) *node {
	t.Helper()
	rs, err := rules.ParseRules([]byte("rules:\n- "+burstRule+"\n"), "test")
	require.NoError(t, err)
	ncfg := notifier.Default()
	ncfg.RetryMin, ncfg.RetryMax = 20*time.Millisecond, 100*time.Millisecond
	ncfg.AllowHosts = []string{"127.0.0.1"}
	ncfg.Receivers = []notifier.ReceiverConfig{{Name: "ops", Type: "webhook", URL: hook.srv.URL, Secret: "0123456789abcdef-receiver", Timeout: time.Second}}
	out, err := notifier.NewOutbox(ncfg, t.TempDir(), notifier.OutboxOptions{})
	require.NoError(t, err)
	n := &node{out: out, ps: NewPartitions(partitions, nil)}
	n.eng = rules.NewEngine(rules.Default(), rs, rules.EngineOptions{Shards: 2, Notifier: out, Journal: n.ps})
	scfg := cluster.DefaultState()
	scfg.Checkpoint = 200 * time.Millisecond
	n.store, err = cluster.NewStateStore(nc, scfg, n.ps.Snapshot, nil, nil)
	require.NoError(t, err)
	n.ps.Attach(n.eng, n.store, out)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, n.store.Ensure(ctx))
	rctx, rcancel := context.WithCancel(context.Background())
	n.cancel = rcancel
	for _, run := range []func(context.Context) error{n.eng.Run, n.out.Run, n.store.Run} {
		n.wg.Add(1)
		go func() { defer n.wg.Done(); _ = run(rctx) }()
	}
	t.Cleanup(n.stop)
	return n
}

// stop ends the node's goroutines without releasing anything: as far as
// the cluster can tell, the node died.
func (n *node) stop() { n.cancel(); n.wg.Wait() }

// deviceIn returns a device id of partition p.
func deviceIn(p int) string {
	for i := 0; ; i++ {
		if d := fmt.Sprintf("pipe-%04d", i); cluster.PartitionOf(d, partitions) == p {
			return d
		}
	}
}

func observe(e *rules.Engine, dev string, v float64, at time.Time) {
	e.Observe(pipeline.ShardOf(dev, 2), []pipeline.Reading{{Device: dev, Kind: "pipe", District: "gulou",
		Metric: "pressure", Value: v, Time: at.UnixNano(), Received: at.UnixNano()}})
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Node A owns partition p; a burst main fires there while the receiver is
// down, so its notification is pending. A dies after the transition was
// recorded (no release, no last checkpoint). Node B, on another NATS server
// of the cluster, gains p: it restores the snapshot and the transition, sends
// the pending firing notification, and when the pressure holds resolves the
// alert once; the reading that raised it, delivered to B again, does not
// fire it again. The receiver gets one firing and one resolved.
func TestAlertFiresOnceAndResolvesOnceAcrossAFailover(t *testing.T) {
	c := natstest.Start(t, 3)
	hook := newWebhook(t)
	a := startNode(t, connect(t, c.Nodes[0].URL()), hook)
	const p = 3
	dev, other := deviceIn(p), deviceIn(p+1)
	a.ps.OnOwned(p, true)
	require.True(t, a.ps.Owns(dev))
	require.False(t, a.ps.Owns(other))

	t0 := time.Now().Add(-time.Hour)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	for s := 0; s < 100; s += 10 {
		observe(a.eng, dev, 400, at(s))
	}
	waitFor(t, "a checkpoint of partition p", func() bool {
		st, err := a.store.Restore(context.Background(), p)
		return err == nil && len(st.Snapshot) > 0 && len(st.Transitions) == 0
	})
	hook.fail.Store(true)
	observe(a.eng, dev, 300, at(100)) // the burst
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, a.eng.Flush(ctx))
	a.stop() // killed: its outbox never delivered the firing notification
	require.Zero(t, hook.distinct("firing"))

	hook.fail.Store(false)
	b := startNode(t, connect(t, c.Nodes[2].URL()), hook)
	b.ps.OnOwned(p, true)
	waitFor(t, "the firing notification, sent by B", func() bool { return hook.distinct("firing") == 1 })
	for s := 100; s <= 170; s += 10 { // 100 s again: redelivered to B
		observe(b.eng, dev, 300, at(s))
	}
	waitFor(t, "the resolved notification", func() bool { return hook.distinct("resolved") == 1 })
	time.Sleep(500 * time.Millisecond) // a second firing would be sent by now
	require.Equal(t, 1, hook.distinct("firing"))
	require.Equal(t, 1, hook.distinct("resolved"))

	// Delivered notifications leave the log; a third owner has nothing to resend.
	waitFor(t, "the delivered notifications removed", func() bool {
		st, err := b.store.Restore(context.Background(), p)
		return err == nil && len(st.Notes) == 0
	})
}
