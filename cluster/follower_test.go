package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/internal/servers"
	"github.com/citypulse/citypulse/pipeline"
	"github.com/citypulse/citypulse/storage"
)

// followerVM is a VictoriaMetrics on a fixed loopback port that a test can
// stop and start again (a store outage).
type followerVM struct {
	t    *testing.T
	dir  string
	addr string
	proc *servers.Proc
}

func (v *followerVM) start() {
	bin, err := servers.LookBinary("victoria-metrics")
	require.NoError(v.t, err)
	v.proc, err = servers.StartProc("victoria-metrics", servers.VictoriaMetricsArgs(bin, v.dir, v.addr), nil, nil,
		func() error { return servers.HTTPOK("http://" + v.addr + "/health") }, 60*time.Second)
	require.NoError(v.t, err)
}

func (v *followerVM) stop() { _ = v.proc.Stop(30 * time.Second) }

// samples returns, per device, how many samples of pipe_pressure the store
// holds at each ms.
func (v *followerVM) samples(t *testing.T) map[string]map[int64]int {
	t.Helper()
	resp, err := http.Get("http://" + v.addr + "/api/v1/export?match[]=" + url.QueryEscape(`{__name__="pipe_pressure"}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	out := map[string]map[int64]int{}
	dec := json.NewDecoder(resp.Body)
	for dec.More() {
		var line struct {
			Metric     map[string]string `json:"metric"`
			Timestamps []int64           `json:"timestamps"`
		}
		require.NoError(t, dec.Decode(&line))
		dev := line.Metric["device"]
		if out[dev] == nil {
			out[dev] = map[int64]int{}
		}
		for _, ts := range line.Timestamps {
			out[dev][ts]++
		}
	}
	return out
}

// appendReadings appends n batches of 5 readings (devices d0..d4, time
// base+i ms, unix) at the site and waits for their acknowledgements.
func appendReadings(t *testing.T, ctx context.Context, s *drSite, base int64, n int) {
	t.Helper()
	var waits []func(context.Context) error
	for i := range n {
		rs := make([]pipeline.Reading, 5)
		for d := range rs {
			rs[d] = pipeline.Reading{Device: fmt.Sprintf("d%d", d), Kind: "pipe", District: "north", Metric: "pressure",
				Value: float64(i), Time: (base + int64(i)) * int64(time.Millisecond), Received: (base + int64(i)) * int64(time.Millisecond)}
		}
		w, err := s.log.Append(ctx, i%8, fmt.Sprintf("r/%d/%d", base, i), AppendBatch(nil, rs))
		require.NoError(t, err)
		waits = append(waits, w)
	}
	for _, w := range waits {
		require.NoError(t, w(ctx))
	}
}

// TestStoreFollowerKeepsTheStandbysStoreCurrentThroughAnOutage: two
// followers at the standby site (two nodes) write the mirror of the
// primary's readings into the standby's own VictoriaMetrics: one of them
// does (the pin), every reading once; while that store is down nothing is
// acknowledged (the ack floor stays, the retries are counted) and after it
// returns every reading is there, exactly once, and the ack floor is the
// stream's last sequence. A follower at the primary (no mirror) creates
// nothing.
func TestStoreFollowerKeepsTheStandbysStoreCurrentThroughAnOutage(t *testing.T) {
	sites := natstest.StartSites(t, 1, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	p := newDRSite(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, 1)
	s := newDRSite(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, 1)
	startPrimary(t, ctx, p, 1)
	port := natstest.FreePort(t)
	vm := &followerVM{t: t, dir: t.TempDir(), addr: fmt.Sprintf("127.0.0.1:%d", port)}
	vm.start()
	t.Cleanup(func() { vm.stop() })

	rwCfg := storage.DefaultRemoteWrite()
	rwCfg.Enabled, rwCfg.URL, rwCfg.Timeout = true, "http://"+vm.addr+"/api/v1/write", 2*time.Second
	cfg := testConfig(1, 8)
	cfg.MaxBatch = 16 // bounded batches: several fetches
	var followers []*Follower
	var wg sync.WaitGroup
	fctx, stop := context.WithCancel(ctx)
	defer func() { stop(); wg.Wait() }()
	for range 2 {
		rw, err := storage.OpenRemoteWrite(rwCfg, nil, nil)
		require.NoError(t, err)
		f, err := NewFollower(connect(t, sites.Standby.URL()), cfg, []pipeline.Sink{rw}, prometheus.NewRegistry(), nil)
		require.NoError(t, err)
		followers = append(followers, f)
		wg.Add(1)
		go func() { defer wg.Done(); _ = f.Run(fctx) }()
	}
	{ // at the primary (its stream is no mirror) a follower creates no consumer
		rw, err := storage.OpenRemoteWrite(rwCfg, nil, nil)
		require.NoError(t, err)
		f, err := NewFollower(connect(t, sites.Primary.URL()), cfg, []pipeline.Sink{rw}, nil, nil)
		require.NoError(t, err)
		wg.Add(1)
		go func() { defer wg.Done(); _ = f.Run(fctx) }()
	}

	base := time.Now().Add(-time.Hour).UnixMilli() // within the store's retention
	appendReadings(t, ctx, p, base, 200)
	require.Eventually(t, func() bool {
		st := s.sync(ctx)
		return st.Role == RoleStandby && s.msgs(t, ctx, Default().Stream) == 200
	}, time.Minute, 100*time.Millisecond, "the standby mirrors the readings")
	requireStoredOnce := func(n int) {
		t.Helper()
		require.Eventually(t, func() bool {
			got := vm.samples(t)
			for d := range 5 {
				if len(got[fmt.Sprintf("d%d", d)]) != n {
					return false
				}
			}
			for _, byMs := range got {
				for ms, c := range byMs {
					require.Equal(t, 1, c, "sample at %d stored %d times", ms, c)
				}
			}
			return true
		}, 2*time.Minute, 200*time.Millisecond, "%d readings per device in the standby's store", n)
	}
	requireStoredOnce(200)
	floor := func() uint64 {
		f, ok, err := FollowedFloor(ctx, s.js, Default().Stream)
		require.NoError(t, err)
		require.True(t, ok)
		return f
	}
	require.Eventually(t, func() bool { return floor() == 200 }, 30*time.Second, 100*time.Millisecond)
	_, ok, err := FollowedFloor(ctx, p.js, Default().Stream)
	require.NoError(t, err)
	require.False(t, ok, "no follower consumer on the primary's own stream")
	a, b := followers[0].Status(), followers[1].Status()
	require.Equal(t, uint64(1000), a.ReadingsFollowed+b.ReadingsFollowed, "one node followed: %+v %+v", a, b)
	require.True(t, a.ReadingsFollowed == 0 || b.ReadingsFollowed == 0, "one node followed: %+v %+v", a, b)

	// The store down: nothing is acknowledged, the retries are counted.
	vm.stop()
	appendReadings(t, ctx, p, base+200, 100)
	require.Eventually(t, func() bool {
		return followers[0].Status().StoreRetries+followers[1].Status().StoreRetries >= 2
	}, time.Minute, 100*time.Millisecond, "the follower retries the store")
	require.Equal(t, uint64(200), floor(), "nothing acknowledged while the store is down")
	st := followers[0].Status()
	if st.ReadingsFollowed == 0 {
		st = followers[1].Status()
	}
	require.NotEmpty(t, st.Error)
	vm.start()
	requireStoredOnce(300)
	require.Eventually(t, func() bool { return floor() == 300 }, 30*time.Second, 100*time.Millisecond)
	require.Eventually(t, func() bool {
		a, b := followers[0].Status(), followers[1].Status()
		return a.LagMessages+b.LagMessages == 0 && a.AckFloor+b.AckFloor >= 300
	}, 30*time.Second, 100*time.Millisecond, "the lag is back to 0")
	t.Logf("followers: %+v, %+v", followers[0].Status(), followers[1].Status())
}
