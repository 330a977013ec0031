package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/ingest"
	"github.com/citypulse/citypulse/internal/httpapi"
	"github.com/citypulse/citypulse/pipeline"
)

// clusterNode is this node's part of a cluster (cluster.enabled): the NATS
// connection, the publisher the gateways submit to (the JetStream stream is
// the system of record), and the owner that feeds the partitions this node
// owns into its local pipeline (whose journal is then only this node's
// buffer for its sinks' cursors). It is nil in one-machine mode.
//
// Whatever must follow partition ownership (state restored when a partition
// is gained, handed over when it is lost) registers an OwnershipFunc with
// onOwned before Run, and asks owns(device) on the hot path.
type clusterNode struct {
	cfg   ClusterConfig
	log   *slog.Logger
	nc    *nats.Conn
	clog  *cluster.Log
	pub   *cluster.Publisher
	owner *cluster.Owner
	feed  *cluster.Feed
	m     *cluster.Metrics
	dr    *cluster.Standby // nil without cluster.standby (standby.go)
	// follow writes the standby site's mirror of the readings to its store
	// while the site is a standby (nil without cluster.standby).
	follow *cluster.Follower

	hooks []cluster.OwnershipFunc // called in order on every gain and loss; the feed's first
	// prereq, if set, must succeed before the owner consumes (the state
	// store's bucket and stream exist, so a gain's restore does not wait on
	// their creation while the partition's pin runs out); false: ctx ended.
	prereq func(ctx context.Context) bool
	parts  []atomic.Bool // partition → owned, as the hooks were told
	ready  atomic.Bool   // connected to JetStream and the stream answers
	status func(ctx context.Context) cluster.Status

	// progress is each partition's position in the readings stream, handled
	// (journaled and judged; acknowledged to JetStream only later, once the
	// store has the readings); the state store checkpoints it with the alert
	// state it covers (clusterstate.go).
	progress *cluster.Progress
}

// buildCluster connects to NATS and builds the publisher and the owner, when
// cluster mode is on. It starts nothing (the NATS client connects; it keeps
// trying while no server answers).
func (s *server) buildCluster() error {
	c := s.cfg.Cluster
	if !c.Enabled {
		return nil
	}
	log := s.log.With("component", "cluster")
	opts := []nats.Option{
		nats.Name("citypulse-" + c.NodeID),
		nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("disconnected from NATS", "err", err) }),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("reconnected to NATS", "server", nc.ConnectedUrlRedacted()) }),
	}
	if c.User != "" {
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	}
	if c.Token != "" {
		opts = append(opts, nats.Token(c.Token))
	}
	nc, err := nats.Connect(strings.Join(c.URLs, ","), opts...)
	if err != nil {
		return fmt.Errorf("cluster: connect to NATS %v: %w", c.URLs, err)
	}
	s.onClose(func() error { nc.Close(); return nil })
	n := &clusterNode{cfg: c, log: log, nc: nc, m: cluster.NewMetrics(s.reg), parts: make([]atomic.Bool, c.Partitions)}
	if n.clog, err = cluster.NewLog(nc, c.Config, n.m); err != nil {
		return err
	}
	n.pub = cluster.NewPublisher(n.clog, c.NodeID, n.m)
	if err := s.buildStandby(n); err != nil {
		return err
	}
	if n.feed, err = cluster.NewFeed(s.pipe, cluster.FeedOptions{Window: c.DedupeWindow, MaxDevices: c.DedupeDevices,
		AckAfter: c.AckAfterSinks, Committer: s.pipe, Logger: log, Metrics: n.m}); err != nil {
		return err
	}
	n.progress = cluster.NewProgress(c.Partitions)
	n.hooks = []cluster.OwnershipFunc{n.feed.Owned, n.progress.Owned}
	if n.owner, err = cluster.NewOwner(nc, c.Config, n.progress.Handler(n.feed.Handle), n.owned, log, n.m); err != nil {
		return err
	}
	n.status = n.owner.Status
	s.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "citypulse_cluster_ready",
		Help: "1 when this node is connected to JetStream and the readings stream answers (cluster mode)."},
		func() float64 { return b2f(n.ready.Load()) }))
	s.cluster = n
	log.Info("cluster mode: gateways publish to JetStream", "urls", c.URLs, "stream", c.Stream,
		"partitions", c.Partitions, "node_id", c.NodeID, "ack_after_sinks", c.AckAfterSinks)
	return nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// onOwned registers f to be told of every gain and loss of a partition
// (after the hooks registered before it). Call it before Run.
func (n *clusterNode) onOwned(f cluster.OwnershipFunc) { n.hooks = append(n.hooks, f) }

// owned is the owner's OwnershipFunc: the hooks in order. A gain is
// recorded before the hooks run (they may ask owns), a loss after.
func (n *clusterNode) owned(p int, owned bool) {
	if owned {
		n.parts[p].Store(true)
	}
	for _, f := range n.hooks {
		f(p, owned)
	}
	if !owned {
		n.parts[p].Store(false)
	}
}

// owns reports whether this node owns device's partition now.
func (n *clusterNode) owns(device string) bool {
	return n.parts[cluster.PartitionOf(device, n.cfg.Partitions)].Load()
}

// publisher is the runner of the gateways' publisher: it stops after the
// gateways, so that what they submitted is published and answered.
func (n *clusterNode) publisher() runner { return n.pub }

// consumers are the runners of the owner and the readiness check (and of
// the standby site's keeper): they stop before the pipeline, which they feed.
// The owner consumes only while this site is the active one.
func (n *clusterNode) consumers() []runner {
	owner := runFunc(func(ctx context.Context) error {
		if n.prereq != nil && !n.prereq(ctx) {
			return nil
		}
		return n.owner.Run(ctx)
	})
	rs := []runner{n.whenActive(owner), runFunc(n.watch)}
	if n.follow != nil {
		rs[0] = n.followThenOwn(owner)
	}
	if n.dr != nil {
		rs = append(rs, n.dr)
	}
	return rs
}

// watch keeps n.ready: connected to NATS and the stream's info answered,
// checked every second, until ctx is done.
func (n *clusterNode) watch(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var was bool
	for {
		err := n.check(ctx)
		if ok := err == nil; ok != was {
			was = ok
			if ok {
				n.log.Info("JetStream reachable: ready")
			} else {
				n.log.Warn("JetStream not reachable: not ready", "err", err)
			}
		}
		n.ready.Store(err == nil)
		select {
		case <-ctx.Done():
			n.ready.Store(false)
			return nil
		case <-t.C:
		}
	}
}

func (n *clusterNode) check(ctx context.Context) error {
	if !n.nc.IsConnected() {
		return errors.New("not connected to NATS")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := n.clog.JetStream().Stream(ctx, n.cfg.Stream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", n.cfg.Stream, err)
	}
	if info := s.CachedInfo(); info.Cluster != nil && info.Cluster.Leader == "" {
		return fmt.Errorf("stream %s has no leader", n.cfg.Stream)
	}
	return nil
}

// clusterStatus is the answer of GET /api/v1/cluster.
type clusterStatus struct {
	cluster.Status
	Connected bool   `json:"connected"`
	Server    string `json:"server"` // the NATS server connected to, credentials removed
	Ready     bool   `json:"ready"`
	// Publish is the JetStream publish-acknowledgement latency of this
	// node's batches since it started.
	Publish  latencySummary `json:"publish_ack_seconds"`
	InFlight int            `json:"publish_in_flight"`
	// DR is the disaster-recovery state (cluster.standby): role, epoch, the
	// mirrors' lag against the RPO budget.
	DR *cluster.StandbyStatus `json:"dr,omitempty"`
}

// serveStatus answers GET /api/v1/cluster.
func (n *clusterNode) serveStatus(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	st := clusterStatus{Status: n.status(ctx), Connected: n.nc.IsConnected(), Server: n.nc.ConnectedUrlRedacted(),
		Ready: n.ready.Load(), Publish: summarize(n.m.AckSeconds()), InFlight: n.clog.Pending(), DR: n.standbyStatus()}
	httpapi.WriteData(w, http.StatusOK, st)
}

// latencySummary is a histogram's count and quantiles (estimated within its
// buckets, as PromQL's histogram_quantile does).
type latencySummary struct {
	Count uint64  `json:"count"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
}

func summarize(h prometheus.Histogram) latencySummary {
	var m dto.Metric
	if err := h.Write(&m); err != nil || m.Histogram == nil {
		return latencySummary{}
	}
	var bounds []float64
	var counts []uint64
	for _, b := range m.Histogram.Bucket {
		bounds = append(bounds, b.GetUpperBound())
		counts = append(counts, b.GetCumulativeCount())
	}
	total := m.Histogram.GetSampleCount()
	return latencySummary{Count: total, P50: quantile(0.5, bounds, counts, total),
		P90: quantile(0.9, bounds, counts, total), P99: quantile(0.99, bounds, counts, total)}
}

// quantile interpolates linearly within the bucket holding rank q·total;
// past the last bound it answers the last bound.
func quantile(q float64, bounds []float64, cum []uint64, total uint64) float64 {
	if total == 0 || len(bounds) == 0 {
		return 0
	}
	rank := q * float64(total)
	lower, below := 0.0, uint64(0)
	for i, ub := range bounds {
		if float64(cum[i]) >= rank {
			in := cum[i] - below
			if in == 0 {
				return ub
			}
			return lower + (ub-lower)*(rank-float64(below))/float64(in)
		}
		lower, below = ub, cum[i]
	}
	return bounds[len(bounds)-1]
}

// publisherSubmitter is the cluster's JetStream publisher as the gateways'
// Submitter.
type publisherSubmitter struct{ pub *cluster.Publisher }

func (ps publisherSubmitter) Begin(ctx context.Context, rs []pipeline.Reading) (ingest.Waiter, error) {
	w, err := ps.pub.Begin(ctx, rs)
	if w == nil { // no nil *Publishing in a non-nil Waiter
		return nil, err
	}
	return w, nil
}
