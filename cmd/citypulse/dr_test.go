package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
	"github.com/citypulse/citypulse/internal/servers"
	"github.com/citypulse/citypulse/pipeline"
)

// The disaster-recovery test through the server (docs/disaster-recovery.md):
// two sites of one NATS server each, linked by a leaf node through a proxy
// (natstest.Sites), one CityPulse node per site. Run with CITYPULSE_TEST_DR=1
// (make test-dr).

const drToken = "dr-admin-token-of-the-test"

// drNode prepares the CityPulse node of a site (not started), with the
// site's own VictoriaMetrics as its store.
func drNode(t *testing.T, natsURL, site, peer, devices string) *servertest.Server {
	vm, vmAddr, err := servers.StartVictoriaMetrics(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(func() { _ = vm.Stop(30 * time.Second) })
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	s := servertest.New(t, binPath, "CITYPULSE_VITALS_FILE="+vitals, "CITYPULSE_RULES_FILE="+rulesFile)
	s.Probe = servertest.ProbeLive // a site not active is up but not ready (/readyz 503)
	s.SetConfig(fmt.Sprintf(`data_dir: {{data}}
devices:
  file: %s
log:
  format: json
storage:
  remote_write:
    enabled: true
    url: http://%s/api/v1/write
http:
  admin_token: %s
cluster:
  enabled: true
  urls: [%s]
  partitions: 8
  replicas: 1
  state:
    replicas: 1
  standby:
    enabled: true
    site: %s
    peer_domain: %s
    replicas: 1
    rpo_budget: 5s
    poll_interval: 200ms
    link_timeout: 1s
`, devices, vmAddr, drToken, natsURL, site, peer))
	return s
}

// drCommand runs `citypulse standby <args>` against node and returns its
// output and how long it took.
func drCommand(t *testing.T, node *servertest.Server, args ...string) (string, time.Duration, error) {
	t.Helper()
	args = append([]string{"standby"}, append(args, "--config", filepath.Join(node.Dir, "citypulse.yaml"),
		"--url", "http://"+node.HTTP)...)
	start := time.Now()
	cmd := exec.Command(binPath, args...)
	cmd.Env = append(os.Environ(), node.Env...)
	out, err := cmd.CombinedOutput()
	return string(out), time.Since(start), err
}

// drStatus reads /api/v1/cluster's dr part.
func drStatus(t *testing.T, node *servertest.Server) (cluster.StandbyStatus, []int) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+node.HTTP+"/api/v1/cluster", nil)
	req.Header.Set("Authorization", "Bearer "+drToken)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var st struct {
		Data clusterStatus `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	require.NotNil(t, st.Data.DR, "/api/v1/cluster has no dr part")
	return *st.Data.DR, st.Data.Owned
}

// drDevice publishes readings 1, 2, ... (value = sequence, time = t0 +
// sequence ms) with QoS 1, one at a time, to its brokers in turn: on no
// PUBACK it moves to the next broker and sends the same reading again.
type drDevice struct {
	id      string
	brokers []string
	t0      int64
	mu      sync.Mutex
	ackedAt map[int]time.Time
}

func (d *drDevice) run(stop <-chan struct{}) {
	var c interface {
		Disconnect(uint)
	}
	seq, next := 1, 0
	defer func() {
		if c != nil {
			c.Disconnect(0)
		}
	}()
	for {
		select {
		case <-stop:
			return
		default:
		}
		cl, err := mqttConnect(d.brokers[next%len(d.brokers)], d.id, "secret-"+d.id, false)
		next++
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		c = cl
		for {
			body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, d.t0+int64(seq), seq)
			tok := cl.Publish("devices/"+d.id+"/readings", 1, false, []byte(body))
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				break // not acknowledged: the same reading again, to the next broker
			}
			d.mu.Lock()
			d.ackedAt[seq] = time.Now()
			d.mu.Unlock()
			seq++
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		cl.Disconnect(0)
		c = nil
	}
}

// streamReadings reads every reading in the stream at the site url:
// device → value → copies.
func streamReadings(t *testing.T, url, stream string) map[string]map[int]int {
	t.Helper()
	nc, err := nats.Connect(url)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx := ctxT(t, 2*time.Minute)
	st, err := js.Stream(ctx, stream)
	require.NoError(t, err)
	last := st.CachedInfo().State.LastSeq
	out := map[string]map[int]int{}
	if last == 0 {
		return out
	}
	oc, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	var rs []pipeline.Reading
	for {
		m, err := oc.Next(jetstream.FetchMaxWait(10 * time.Second))
		require.NoError(t, err)
		rs, err = cluster.DecodeBatch(m.Data(), rs[:0])
		require.NoError(t, err)
		for _, r := range rs {
			if out[r.Device] == nil {
				out[r.Device] = map[int]int{}
			}
			out[r.Device][int(r.Value)]++
		}
		md, err := m.Metadata()
		require.NoError(t, err)
		if md.Sequence.Stream >= last {
			return out
		}
	}
}

// TestStandbySiteTakesOverAfterThePrimarySiteIsLost: a primary site and a
// standby site, one NATS server and one CityPulse node each. Devices publish
// to the primary; the standby refuses devices (counted, reason fenced) while
// it mirrors; the primary site's processes are SIGKILLed; the standby is
// promoted with `citypulse standby promote --peer-down`; the devices move to
// it and are acknowledged. Before the disaster the link is cut for longer
// than the RPO budget (reported) and restored (caught up). Every acknowledged reading is counted, by device
// sequence, in the standby's stream: the lost ones were acknowledged within
// the RPO budget before the disaster; RTO = disaster to the first reading
// acknowledged at the standby.
func TestStandbySiteTakesOverAfterThePrimarySiteIsLost(t *testing.T) {
	skipShort(t)
	if os.Getenv("CITYPULSE_TEST_DR") == "" {
		t.Skip("the disaster-recovery test runs with CITYPULSE_TEST_DR=1 (make test-dr)")
	}
	sites := natstest.StartSites(t, 1, 1)
	devFile, ids := clusterFleet(t, t.TempDir(), envInt(t, "CITYPULSE_TEST_DR_DEVICES", 20)+1)
	{ // the readings stream at the primary, as its installation creates it
		nc, err := nats.Connect(sites.Primary.URL())
		require.NoError(t, err)
		cfg := cluster.Default()
		cfg.Replicas, cfg.Partitions = 1, 8
		l, err := cluster.NewLog(nc, cfg, nil)
		require.NoError(t, err)
		_, err = l.EnsureStream(ctxT(t, 30*time.Second))
		require.NoError(t, err)
		nc.Close()
	}
	primary := drNode(t, sites.Primary.URL(), natstest.PrimaryDomain, natstest.StandbyDomain, devFile)
	primary.Start()
	out, _, err := drCommand(t, primary, "activate")
	require.NoError(t, err, out)
	st, _ := drStatus(t, primary)
	require.Equal(t, cluster.RoleActive, st.Role, "%+v", st)

	standby := drNode(t, sites.Standby.URL(), natstest.StandbyDomain, natstest.PrimaryDomain, devFile)
	standby.Start() // ready once its mirror of the readings stream exists
	eventually(t, 60*time.Second, func() error {
		st, owned := drStatus(t, standby)
		if st.Role != cluster.RoleStandby || st.ActiveSite != natstest.PrimaryDomain || len(owned) != 0 {
			return fmt.Errorf("standby: %+v, owned %v", st, owned)
		}
		return nil
	})

	// The standby refuses devices: not acknowledged, counted.
	refused := ids[len(ids)-1]
	c, err := mqttConnect(standby.MQTT, refused, "secret-"+refused, false)
	require.NoError(t, err)
	tok := c.Publish("devices/"+refused+"/readings", 1, false, []byte(`{"pressure":4242}`))
	require.False(t, tok.WaitTimeout(10*time.Second) && tok.Error() == nil, "the standby acknowledged a reading")
	c.Disconnect(0)
	require.Positive(t, metricSum(t, []*servertest.Server{standby}, `citypulse_cluster_submit_failures_total{reason="fenced"}`))

	t0 := time.Now().Truncate(time.Second).UnixMilli()
	var devs []*drDevice
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, id := range ids[:len(ids)-1] {
		d := &drDevice{id: id, brokers: []string{primary.MQTT, standby.MQTT}, t0: t0, ackedAt: map[int]time.Time{}}
		devs = append(devs, d)
		wg.Add(1)
		go func() { defer wg.Done(); d.run(stop) }()
	}
	loadStart := time.Now()
	time.Sleep(3 * time.Second)

	// The link cut for longer than the RPO budget: the standby reports it
	// (status and metric); restored, the mirror catches up.
	sites.Link.Cut()
	cut := time.Now()
	var worst float64
	eventually(t, 30*time.Second, func() error {
		st, _ := drStatus(t, standby)
		for _, ms := range st.Streams {
			worst = max(worst, ms.SecondsBehind)
		}
		if st.WithinRPO || metricSum(t, []*servertest.Server{standby}, "citypulse_dr_rpo_exceeded") != 1 {
			return fmt.Errorf("link cut %v ago: still within the RPO budget: %+v", time.Since(cut), st)
		}
		return nil
	})
	exceededAfter := time.Since(cut)
	sites.Link.Restore()
	restored := time.Now()
	eventually(t, 60*time.Second, func() error {
		st, _ := drStatus(t, standby)
		for _, ms := range st.Streams {
			worst = max(worst, ms.SecondsBehind)
			if ms.Stream == cluster.Default().Stream && (ms.LagMessages != 0 || !ms.LinkUp) {
				return fmt.Errorf("readings mirror not caught up: %+v", ms)
			}
		}
		if !st.WithinRPO || metricSum(t, []*servertest.Server{standby}, "citypulse_dr_rpo_exceeded") != 0 {
			return fmt.Errorf("restored %v ago: not within the RPO budget: %+v", time.Since(restored), st)
		}
		return nil
	})
	t.Logf("link cut: RPO budget (5 s) reported exceeded after %v; restored: caught up and within the budget after %v; worst seconds behind %.2f",
		exceededAfter.Round(time.Millisecond), time.Since(restored).Round(time.Millisecond), worst)
	time.Sleep(3 * time.Second)

	// The disaster: the lag as the standby last saw it, then every process
	// of the primary site SIGKILLed.
	before, _ := drStatus(t, standby)
	primary.Kill()
	for _, n := range sites.Primary.Nodes {
		n.Kill()
	}
	disaster := time.Now()
	var lagMsgs uint64
	var lagSec float64
	for _, ms := range before.Streams {
		if ms.Stream == cluster.Default().Stream {
			lagMsgs, lagSec = ms.LagMessages, ms.SecondsBehind
		}
	}
	t.Logf("at the disaster: readings mirror %d messages, %.3f s behind (within budget: %v); load average %s",
		lagMsgs, lagSec, before.WithinRPO, loadAverage())

	out, took, err := drCommand(t, standby, "promote", "--peer-down")
	require.NoError(t, err, out)
	promoted := time.Now()
	t.Logf("citypulse standby promote --peer-down: %v (%v after the disaster)", took.Round(time.Millisecond), promoted.Sub(disaster).Round(time.Millisecond))
	eventually(t, 60*time.Second, func() error {
		st, owned := drStatus(t, standby)
		if st.Role != cluster.RoleActive || len(owned) != 8 {
			return fmt.Errorf("promoted standby: %+v, owned %v", st, owned)
		}
		return nil
	})

	// The devices are acknowledged at the standby: each gets 10 more.
	ackedAfter := func(d *drDevice) (n int, first time.Time) {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, at := range d.ackedAt {
			if at.After(disaster) {
				n++
				if first.IsZero() || at.Before(first) {
					first = at
				}
			}
		}
		return n, first
	}
	eventually(t, 120*time.Second, func() error {
		for _, d := range devs {
			if n, _ := ackedAfter(d); n < 10 {
				return fmt.Errorf("%s: %d acknowledged since the disaster", d.id, n)
			}
		}
		return nil
	})
	close(stop)
	wg.Wait()

	var rto, allBack time.Duration // the first device acknowledged again, and the last
	for _, d := range devs {
		_, first := ackedAfter(d)
		if rto == 0 || first.Sub(disaster) < rto {
			rto = first.Sub(disaster)
		}
		allBack = max(allBack, first.Sub(disaster))
	}
	got := streamReadings(t, sites.Standby.URL(), cluster.Default().Stream)
	// The refused reading was never acknowledged; the broker holds a QoS 1
	// publish refused as backpressure for up to 30 s, retrying, so it may be
	// stored once the standby is promoted within that time (at least once).
	t.Logf("the reading refused before the promotion is stored %d times (a held publish retried after it)", got[refused][4242])
	var early int // acknowledged before the disaster: the write rate
	for _, d := range devs {
		for _, at := range d.ackedAt {
			if at.Before(disaster) {
				early++
			}
		}
	}
	t.Logf("write rate before the disaster: %.0f readings/s acknowledged (%d devices)", float64(early)/disaster.Sub(loadStart).Seconds(), len(devs))
	var acked, lost, dup int
	var lostAt []time.Duration
	for _, d := range devs {
		for seq, at := range d.ackedAt {
			acked++
			switch n := got[d.id][seq]; {
			case n == 0:
				lost++
				lostAt = append(lostAt, disaster.Sub(at))
			case n > 1:
				dup += n - 1
			}
		}
	}
	sort.Slice(lostAt, func(i, j int) bool { return lostAt[i] > lostAt[j] })
	t.Logf("acknowledged %d readings; lost %d (acknowledged at most %v before the disaster), duplicated in the stream %d; RTO (disaster → first reading acknowledged at the standby) %v, every device acknowledged again after %v",
		acked, lost, firstOr(lostAt), dup, rto.Round(time.Millisecond), allBack.Round(time.Millisecond))
	budget := 5 * time.Second
	for _, ago := range lostAt {
		require.Less(t, ago, budget+time.Second, "a reading acknowledged %v before the disaster was lost: beyond the RPO budget", ago)
	}
	require.Positive(t, rto)
	require.NotContains(t, standby.Logs(), `"level":"ERROR"`)
	require.Equal(t, 1.0, metricSum(t, []*servertest.Server{standby}, `citypulse_dr_role{role="active"}`))
	require.Contains(t, strings.ToLower(out), `"role":"active"`)
	failBack(t, sites, primary, standby, devs)
}

// failBack: the primary site's NATS server and node return; the primary is
// fenced (its node acknowledges nothing), the standby salvages what it
// lacked (`citypulse standby salvage`), the primary is demoted (`citypulse
// standby demote`) and re-synced: its stream then holds every reading
// acknowledged at either site.
func failBack(t *testing.T, sites *natstest.Sites, primary, standby *servertest.Server, devs []*drDevice) {
	t.Helper()
	for _, n := range sites.Primary.Nodes {
		n.Restart()
	}
	sites.WaitLinked(60 * time.Second)
	returned := time.Now()
	primary.Start()
	eventually(t, 60*time.Second, func() error {
		if st, owned := drStatus(t, primary); st.Role != cluster.RoleStandby || st.ActiveSite != natstest.StandbyDomain || len(owned) != 0 {
			return fmt.Errorf("returned primary not fenced: %+v, owned %v", st, owned)
		}
		return nil
	})
	out, took, err := drCommand(t, standby, "salvage")
	require.NoError(t, err, out)
	_, salvaged, _ := strings.Cut(out, `"salvaged":`)
	t.Logf("fail-back: the returned primary fenced; citypulse standby salvage took %v, copied %s", took.Round(time.Millisecond), firstLine(salvaged, 160))
	out, took, err = drCommand(t, primary, "demote")
	require.NoError(t, err, out)
	t.Logf("citypulse standby demote took %v", took.Round(time.Millisecond))
	eventually(t, 120*time.Second, func() error {
		st, _ := drStatus(t, primary)
		for _, ms := range st.Streams {
			if ms.Stream == cluster.Default().Stream && (!ms.Mirror || ms.LagMessages != 0 || !ms.LinkUp || ms.Msgs == 0) {
				return fmt.Errorf("primary's readings stream not yet a caught-up mirror: %+v", ms)
			}
		}
		return nil
	})
	got := streamReadings(t, sites.Primary.URL(), cluster.Default().Stream)
	lost := 0
	for _, d := range devs {
		for seq := range d.ackedAt {
			if got[d.id][seq] == 0 {
				lost++
			}
		}
	}
	t.Logf("re-synced %v after the primary's return: %d acknowledged readings missing at the primary", time.Since(returned).Round(time.Millisecond), lost)
	require.Zero(t, lost)
	require.NotContains(t, primary.Logs(), `"level":"ERROR"`)
}

func firstLine(s string, n int) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

func firstOr(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return ds[0].Round(time.Millisecond)
}
