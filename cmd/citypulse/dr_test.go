package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
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
// two sites of three NATS servers each, linked by a leaf node through a proxy
// (natstest.Sites), one CityPulse node per site. Run with CITYPULSE_TEST_DR=1
// (make test-dr).

const drToken = "dr-admin-token-of-the-test"

// drSite is what a site's CityPulse node is configured with.
type drSite struct {
	nats     *natstest.Cluster
	site     string
	peer     string
	devices  string // the device list file
	rules    string // the rules file
	hook     string // the webhook receiver's URL
	streams  string // cluster.standby.streams ("": the default, everything mirrored)
	replicas int    // of the site's streams, buckets and mirrors

	noVitals   bool          // vitals off (else the shipped vitals file)
	checkpoint time.Duration // cluster.state.checkpoint (0: the default)
	rpoBudget  time.Duration // cluster.standby.rpo_budget (0: 5 s)
	rpoHoldOff time.Duration // cluster.standby.rpo_alert_hold_off (0: the default)
}

// drNode prepares the CityPulse node of a site (not started), with the
// site's own VictoriaMetrics as its store.
func drNode(t *testing.T, ds drSite) (*servertest.Server, string) {
	vm, vmAddr, err := servers.StartVictoriaMetrics(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(func() { _ = vm.Stop(30 * time.Second) })
	env := []string{"CITYPULSE_RULES_FILE=" + ds.rules}
	vitals := ""
	if ds.noVitals {
		vitals = "\nvitals:\n  enabled: false"
	} else {
		file, _ := filepath.Abs("../../configs/vitals.yaml")
		env = append(env, "CITYPULSE_VITALS_FILE="+file)
	}
	s := servertest.New(t, binPath, env...)
	s.Probe = servertest.ProbeLive // a site not active is up but not ready (/readyz 503)
	state, standby := "", ""
	if ds.checkpoint > 0 {
		state = fmt.Sprintf("\n    checkpoint: %v", ds.checkpoint)
	}
	if ds.streams != "" {
		standby += "\n    streams: [" + ds.streams + "]"
	}
	if ds.rpoHoldOff > 0 {
		standby += fmt.Sprintf("\n    rpo_alert_hold_off: %v", ds.rpoHoldOff)
	}
	budget := cmp.Or(ds.rpoBudget, 5*time.Second)
	s.SetConfig(fmt.Sprintf(`data_dir: {{data}}
devices:
  file: %s
log:
  format: json%s
rules:
  notify:
    receivers:
      - {name: ops, type: webhook, url: %q, secret: "0123456789abcdef-ops", timeout: 2s}
    allow_hosts: [127.0.0.1]
    retry_min: 100ms
    retry_max: 1s
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
  replicas: %d
  state:
    replicas: %d%s
  standby:
    enabled: true
    site: %s
    peer_domain: %s
    replicas: %d
    rpo_budget: %v
    poll_interval: 200ms
    link_timeout: 1s%s
`, ds.devices, vitals, ds.hook, vmAddr, drToken, strings.ReplaceAll(ds.nats.URL(), ",", ", "),
		ds.replicas, ds.replicas, state, ds.site, ds.peer, ds.replicas, budget, standby))
	return s, vmAddr
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
// sequence ms) with QoS 1, one at a time, one every `every` at most, to its
// brokers in turn: on no PUBACK it moves to the next broker and sends the
// same reading again.
type drDevice struct {
	id      string
	brokers []string
	t0      int64
	every   time.Duration
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
		next := time.Now()
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
			next = next.Add(d.every)
			if wait := time.Until(next); wait > 0 {
				select {
				case <-stop:
					return
				case <-time.After(wait):
				}
			} else {
				next = time.Now() // behind: no burst to catch up
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
	var rs []pipeline.Reading
	count := func(data []byte) []pipeline.Reading {
		rs, err := cluster.DecodeBatch(data, rs[:0])
		require.NoError(t, err)
		for _, r := range rs {
			if out[r.Device] == nil {
				out[r.Device] = map[int]int{}
			}
			out[r.Device][int(r.Value)]++
		}
		return rs
	}
	next, fails, gets := uint64(1), 0, 0
	for next <= last {
		// Read from next on. On the promoted 3-server standby an ordered
		// consumer stops answering ("no responders") every few dozen
		// messages while its servers' leaf connections to the dead primary
		// are retried; the message is then read by a direct request and a
		// new consumer goes on after it.
		oc, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
			DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: next})
		if err == nil {
			for next <= last {
				var m jetstream.Msg
				if m, err = oc.Next(jetstream.FetchMaxWait(10 * time.Second)); err != nil {
					break
				}
				md, err := m.Metadata()
				require.NoError(t, err)
				rs = count(m.Data())
				next = md.Sequence.Stream + 1
			}
		}
		if err != nil {
			if raw, gerr := st.GetMsg(ctx, next); gerr == nil {
				rs = count(raw.Data)
				next++
				gets++
				continue
			}
			fails++
			require.Less(t, fails, 30, "reading stream %s from %d: %v", stream, next, err)
			time.Sleep(250 * time.Millisecond)
		}
	}
	if gets > 0 {
		t.Logf("reading stream %s: %d of %d messages read by a direct request (the consumer stopped answering)", stream, gets, last)
	}
	return out
}

// TestStandbySiteTakesOverAfterThePrimarySiteIsLost: a primary site of 3
// NATS servers and a standby site of 3 (CITYPULSE_TEST_DR_STANDBY_SERVERS),
// one CityPulse node each. Devices publish to the primary at
// CITYPULSE_TEST_DR_RATE readings/s; a burst main fires there (one
// notification at the loopback webhook); the standby refuses devices
// (counted, reason fenced) while it mirrors. The link is cut for longer than
// the RPO budget (reported) and restored (caught up); then the primary
// site's processes are all SIGKILLed, the standby is promoted with
// `citypulse standby promote --peer-down`, the devices move to it and are
// acknowledged, and the burst main's pressure, low since, resolves the alert
// there: exactly one resolved notification and no second firing (the state
// and its idempotency keys carried over by the mirrors). Every acknowledged
// reading is counted, by device sequence, in the standby's stream: the lost
// ones were acknowledged within the RPO budget before the disaster; RTO =
// disaster to the first reading acknowledged at the standby.
func TestStandbySiteTakesOverAfterThePrimarySiteIsLost(t *testing.T) {
	skipShort(t)
	if os.Getenv("CITYPULSE_TEST_DR") == "" {
		t.Skip("the disaster-recovery test runs with CITYPULSE_TEST_DR=1 (make test-dr)")
	}
	standbyServers := envInt(t, "CITYPULSE_TEST_DR_STANDBY_SERVERS", 3)
	sites := natstest.StartSites(t, 3, standbyServers)
	devFile, ids := clusterFleet(t, t.TempDir(), envInt(t, "CITYPULSE_TEST_DR_DEVICES", 20)+2)
	refused, alerting := ids[len(ids)-1], ids[len(ids)-2]
	ids = ids[:len(ids)-2]
	every := 20 * time.Millisecond // per device
	if rate := envInt(t, "CITYPULSE_TEST_DR_RATE", 0); rate > 0 {
		every = time.Duration(len(ids)) * time.Second / time.Duration(rate)
	}
	{ // the readings stream at the primary, as its installation creates it
		nc, err := nats.Connect(sites.Primary.URL())
		require.NoError(t, err)
		cfg := cluster.Default()
		cfg.Replicas, cfg.Partitions = 3, 8
		l, err := cluster.NewLog(nc, cfg, nil)
		require.NoError(t, err)
		_, err = l.EnsureStream(ctxT(t, 60*time.Second))
		require.NoError(t, err)
		nc.Close()
	}
	hook := newAlertReceiver(t, "burst_main")
	rulesFile := filepath.Join(t.TempDir(), "rules.yaml")
	require.NoError(t, os.WriteFile(rulesFile, []byte(
		"rules:\n  - {name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 5s}\n"), 0o600))
	site := drSite{devices: devFile, rules: rulesFile, hook: hook.srv.URL, checkpoint: 2 * time.Second}
	ps, ss := site, site
	ps.nats, ps.site, ps.peer, ps.replicas = sites.Primary, natstest.PrimaryDomain, natstest.StandbyDomain, 3
	ss.nats, ss.site, ss.peer, ss.replicas = sites.Standby, natstest.StandbyDomain, natstest.PrimaryDomain, standbyServers
	if os.Getenv("CITYPULSE_TEST_DR_NO_STATE") != "" { // to see the test fail: the alert state not mirrored
		ss.streams = cluster.Default().Stream + ", KV_" + cluster.DefaultState().Devices
	}
	primary, primaryVM := drNode(t, ps)
	primary.Start()
	out, _, err := drCommand(t, primary, "activate")
	require.NoError(t, err, out)
	st, _ := drStatus(t, primary)
	require.Equal(t, cluster.RoleActive, st.Role, "%+v", st)

	standby, standbyVM := drNode(t, ss)
	standby.Start() // ready once its mirror of the readings stream exists
	eventually(t, 60*time.Second, func() error {
		st, owned := drStatus(t, standby)
		if st.Role != cluster.RoleStandby || st.ActiveSite != natstest.PrimaryDomain || len(owned) != 0 {
			return fmt.Errorf("standby: %+v, owned %v", st, owned)
		}
		return nil
	})
	requireRefused(t, standby, refused)

	t0 := time.Now().Truncate(time.Second).UnixMilli()
	var devs []*drDevice
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, id := range ids {
		d := &drDevice{id: id, brokers: []string{primary.MQTT, standby.MQTT}, t0: t0, every: every, ackedAt: map[int]time.Time{}}
		devs = append(devs, d)
		wg.Add(1)
		go func() { defer wg.Done(); d.run(stop) }()
	}
	loadStart := time.Now()
	burst := &drBurst{id: alerting, hook: hook}
	burst.fire(t, primary.MQTT)
	requireStoreFollows(t, devs, standby, standbyVM)
	cutAndRestore(t, sites, standby)
	time.Sleep(3 * time.Second)

	// The disaster: the lag as the standby last saw it, then every process
	// of the primary site SIGKILLed.
	before, _ := drStatus(t, standby)
	_, firedBefore := hook.distinct("firing")
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
	resolvedAt := burst.resolve(t, standby.MQTT)
	eventually(t, 60*time.Second, func() error {
		st, owned := drStatus(t, standby)
		if st.Role != cluster.RoleActive || len(owned) != 8 {
			return fmt.Errorf("promoted standby: %+v, owned %v", st, owned)
		}
		return nil
	})

	// The devices are acknowledged at the standby: each gets 10 more.
	eventually(t, 120*time.Second, func() error {
		for _, d := range devs {
			if n, _ := d.ackedAfter(disaster); n < 10 {
				return fmt.Errorf("%s: %d acknowledged since the disaster", d.id, n)
			}
		}
		return nil
	})
	close(stop)
	wg.Wait()
	burst.requireOnce(t, disaster, resolvedAt, firedBefore)
	logReplay(t, standby, devs, disaster)
	lost := auditLoss(t, sites, devs, refused, loadStart, disaster)
	requireWholeHistory(t, devs, lost, standbyVM)
	require.NotContains(t, standby.Logs(), `"level":"ERROR"`)
	require.Equal(t, 1.0, metricSum(t, []*servertest.Server{standby}, `citypulse_dr_role{role="active"}`))
	require.Contains(t, strings.ToLower(out), `"role":"active"`)
	failBack(t, sites, primary, standby, devs)
	requireStored(t, devs, lost, primaryVM, standbyVM)
}

// requireStored: every acknowledged reading not lost with the primary's
// stream is in the primary's store or the promoted standby's. A promoted
// standby's owners that started beyond where the primary's had got to would
// leave a gap here: readings in both streams, in neither store. (Run after
// the fail-back: the primary's node, restarted, has sent what its journal
// held for its store when it was SIGKILLed.)
func requireStored(t *testing.T, devs []*drDevice, lost map[string]map[int]bool, vms ...string) {
	t.Helper()
	var missing []string
	eventually(t, 60*time.Second, func() error {
		stored := map[string]map[int64]bool{}
		for _, vm := range vms {
			for dev, samples := range exportPressure(t, vm) {
				if stored[dev] == nil {
					stored[dev] = map[int64]bool{}
				}
				for _, s := range samples {
					stored[dev][s.ms] = true
				}
			}
		}
		missing = missing[:0]
		for _, d := range devs {
			for seq := range d.ackedAt {
				if !lost[d.id][seq] && !stored[d.id][d.t0+int64(seq)] {
					missing = append(missing, fmt.Sprintf("%s#%d", d.id, seq))
				}
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%d acknowledged readings in neither store, e.g. %v", len(missing), missing[:min(len(missing), 5)])
		}
		return nil
	})
	t.Logf("every acknowledged reading not lost at the disaster is in the primary's or the standby's store")
}

// requireStoreFollows: while the primary is healthy, readings acknowledged
// at the primary appear in the standby site's own store (its store
// follower), within seconds; five readings' store lag is logged (from the
// PUBACK at the primary to the first export from the standby's
// VictoriaMetrics that holds the reading).
func requireStoreFollows(t *testing.T, devs []*drDevice, standby *servertest.Server, vm string) {
	t.Helper()
	var lags []time.Duration
	for i := range 5 {
		d := devs[i%len(devs)]
		var seq int
		var at time.Time
		eventually(t, 30*time.Second, func() error { // a reading acknowledged just now
			d.mu.Lock()
			defer d.mu.Unlock()
			for s, a := range d.ackedAt {
				if s > seq {
					seq, at = s, a
				}
			}
			if time.Since(at) > time.Second {
				return fmt.Errorf("%s: no reading acknowledged within the last second", d.id)
			}
			return nil
		})
		eventually(t, 60*time.Second, func() error {
			for _, smp := range exportDevicePressure(t, vm, d.id) {
				if smp.ms == d.t0+int64(seq) {
					return nil
				}
			}
			return fmt.Errorf("%s#%d (acknowledged at the primary %v ago) not in the standby's store", d.id, seq, time.Since(at).Round(time.Millisecond))
		})
		lags = append(lags, time.Since(at))
	}
	st, _ := drStatus(t, standby)
	require.NotNil(t, st.StoreFollower, "/api/v1/cluster's dr object has no store_follower")
	require.True(t, st.StoreFollower.Following, "%+v", *st.StoreFollower)
	sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
	t.Logf("standby's store lag (PUBACK at the primary → in the standby's VictoriaMetrics), 5 readings: min %v, median %v, max %v; follower %+v; load average %s",
		lags[0].Round(time.Millisecond), lags[2].Round(time.Millisecond), lags[4].Round(time.Millisecond), *st.StoreFollower, loadAverage())
}

// exportDevicePressure is exportPressure for one device.
func exportDevicePressure(t *testing.T, vm, device string) []storedSample {
	t.Helper()
	u := "http://" + vm + "/api/v1/export?match[]=" + url.QueryEscape(`pipe_pressure{device="`+device+`"}`)
	resp, err := http.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var out []storedSample
	dec := json.NewDecoder(resp.Body)
	for dec.More() {
		var line struct {
			Values     []float64 `json:"values"`
			Timestamps []int64   `json:"timestamps"`
		}
		require.NoError(t, dec.Decode(&line))
		for i := range line.Values {
			out = append(out, storedSample{line.Timestamps[i], line.Values[i]})
		}
	}
	return out
}

// requireWholeHistory: after the promotion the standby's own store holds
// every acknowledged reading that reached its stream, exactly once: the
// history before the position carried with the state (written by the store
// follower while it was a standby) as well as after it.
func requireWholeHistory(t *testing.T, devs []*drDevice, lost map[string]map[int]bool, vm string) {
	t.Helper()
	var want int
	eventually(t, 90*time.Second, func() error {
		stored := exportPressure(t, vm)
		var missing, dup []string
		want = 0
		for _, d := range devs {
			n := map[int64]int{}
			for _, smp := range stored[d.id] {
				n[smp.ms]++
			}
			d.mu.Lock()
			for seq := range d.ackedAt {
				if lost[d.id][seq] {
					continue
				}
				want++
				switch c := n[d.t0+int64(seq)]; {
				case c == 0:
					missing = append(missing, fmt.Sprintf("%s#%d", d.id, seq))
				case c > 1:
					dup = append(dup, fmt.Sprintf("%s#%d×%d", d.id, seq, c))
				}
			}
			d.mu.Unlock()
		}
		if len(missing)+len(dup) > 0 {
			return fmt.Errorf("the standby's store: %d acknowledged readings missing (e.g. %v), %d stored more than once (e.g. %v)",
				len(missing), missing[:min(len(missing), 5)], len(dup), dup[:min(len(dup), 5)])
		}
		return nil
	})
	t.Logf("the promoted standby's store holds every one of the %d acknowledged readings in its stream exactly once", want)
}

// requireRefused: the standby refuses a device's reading (not acknowledged,
// counted as fenced).
func requireRefused(t *testing.T, standby *servertest.Server, id string) {
	t.Helper()
	c, err := mqttConnect(standby.MQTT, id, "secret-"+id, false)
	require.NoError(t, err)
	tok := c.Publish("devices/"+id+"/readings", 1, false, []byte(`{"pressure":4242}`))
	require.False(t, tok.WaitTimeout(10*time.Second) && tok.Error() == nil, "the standby acknowledged a reading")
	c.Disconnect(0)
	require.Positive(t, metricSum(t, []*servertest.Server{standby}, `citypulse_cluster_submit_failures_total{reason="fenced"}`))
}

// cutAndRestore cuts the link for longer than the RPO budget: the standby
// reports it (status and metric); restored, the mirror catches up.
func cutAndRestore(t *testing.T, sites *natstest.Sites, standby *servertest.Server) {
	t.Helper()
	time.Sleep(3 * time.Second)
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
}

// ackedAfter counts d's readings acknowledged after t, and the first one's time.
func (d *drDevice) ackedAfter(t time.Time) (n int, first time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, at := range d.ackedAt {
		if at.After(t) {
			n++
			if first.IsZero() || at.Before(first) {
				first = at
			}
		}
	}
	return n, first
}

// drBurst is the pipe whose main bursts at the primary: its pressure falls
// from 400 to 300 kPa (the burst_main rule: a drop of 80 within 5 s) and
// stays there; it sends nothing more until the disaster (a reading at the
// primary would resolve the alert there), then its low readings at the
// promoted standby resolve it.
type drBurst struct {
	id   string
	hook *alertReceiver
}

// fire publishes the burst at broker and waits for the firing notification.
func (b *drBurst) fire(t *testing.T, broker string) {
	t.Helper()
	c, err := mqttConnect(broker, b.id, "secret-"+b.id, false)
	require.NoError(t, err)
	defer c.Disconnect(0)
	for _, v := range []int{400, 400, 400, 400, 400, 400, 300} {
		body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, time.Now().UnixMilli(), v)
		tok := c.Publish("devices/"+b.id+"/readings", 1, false, []byte(body))
		require.True(t, tok.WaitTimeout(20*time.Second) && tok.Error() == nil, "PUBACK: %v", tok.Error())
		time.Sleep(300 * time.Millisecond)
	}
	eventually(t, 60*time.Second, func() error {
		if n, _ := b.hook.distinct("firing"); n != 1 {
			return fmt.Errorf("%d firing notifications from the primary", n)
		}
		return nil
	})
}

// resolve publishes 300 kPa every 500 ms at broker until the resolved
// notification came, and returns when it did.
func (b *drBurst) resolve(t *testing.T, broker string) time.Time {
	t.Helper()
	var c mqtt.Client
	var at time.Time
	eventually(t, 120*time.Second, func() error {
		if n, _ := b.hook.distinct("resolved"); n > 0 {
			at = time.Now()
			return nil
		}
		if c == nil {
			cl, err := mqttConnect(broker, b.id, "secret-"+b.id, false)
			if err != nil {
				return err
			}
			c = cl
		}
		sendQuiet(c, b.id, 300)
		time.Sleep(500 * time.Millisecond)
		return errors.New("no resolved notification yet")
	})
	c.Disconnect(0)
	return at
}

// requireOnce: one firing (at the primary) and one resolved (from the
// standby), by Idempotency-Key, a while after the resolution; and the
// standby did not send the firing again (firedBefore: its deliveries before
// the disaster), not even under the same key.
func (b *drBurst) requireOnce(t *testing.T, disaster, resolvedAt time.Time, firedBefore int) {
	t.Helper()
	firing, firingDeliveries := b.hook.distinct("firing")
	resolved, resolvedDeliveries := b.hook.distinct("resolved")
	t.Logf("burst main: firing %d (%d deliveries, %d of them before the disaster), resolved %d (%d deliveries); resolved from the standby %v after the disaster",
		firing, firingDeliveries, firedBefore, resolved, resolvedDeliveries, resolvedAt.Sub(disaster).Round(time.Millisecond))
	require.Equal(t, 1, firing, "the alert fired once: not again at the standby")
	require.Equal(t, firedBefore, firingDeliveries, "the standby sent the primary's firing notification again")
	require.Equal(t, 1, resolved, "the alert resolved once, from the standby")
}

// logReplay logs how much the promoted standby's owners handled: what they
// replayed of the primary's history besides the readings acknowledged since.
func logReplay(t *testing.T, standby *servertest.Server, devs []*drDevice, disaster time.Time) {
	t.Helper()
	fed := metricSum(t, []*servertest.Server{standby}, "citypulse_cluster_readings_fed_total")
	var since, all int
	for _, d := range devs {
		n, _ := d.ackedAfter(disaster)
		since += n
		d.mu.Lock()
		all += len(d.ackedAt)
		d.mu.Unlock()
	}
	starts := strings.Count(standby.Logs(), "partition consumer created after the handled position")
	t.Logf("promoted standby: %d partition consumers created after the primary's position; readings fed %.0f, of which acknowledged since the disaster %d: replayed %.0f of the %d acknowledged at the primary",
		starts, fed, since, fed-float64(since), all-since)
}

// auditLoss counts, by device sequence, every acknowledged reading in the
// standby's stream: lost ones must be within the RPO budget before the
// disaster.
func auditLoss(t *testing.T, sites *natstest.Sites, devs []*drDevice, refused string, loadStart, disaster time.Time) (lostSeqs map[string]map[int]bool) {
	t.Helper()
	var rto, allBack time.Duration // the first device acknowledged again, and the last
	for _, d := range devs {
		_, first := d.ackedAfter(disaster)
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
	lostSeqs = map[string]map[int]bool{}
	for _, d := range devs {
		lostSeqs[d.id] = map[int]bool{}
		for seq, at := range d.ackedAt {
			acked++
			switch n := got[d.id][seq]; {
			case n == 0:
				lost++
				lostSeqs[d.id][seq] = true
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
	return lostSeqs
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
	// The runbook: the primary's nodes start only once its own fence record
	// names the standby (written through the link within a poll interval).
	// A node started before would find itself active and start its owners
	// and state writers, which a demotion does not stop.
	nc, err := nats.Connect(sites.Primary.URL())
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	eventually(t, 60*time.Second, func() error {
		ctx := ctxT(t, 5*time.Second)
		kv, err := js.KeyValue(ctx, cluster.FenceBucket)
		if err != nil {
			return err
		}
		e, err := kv.Get(ctx, cluster.FenceKey)
		if err != nil {
			return err
		}
		var rec cluster.Record
		if err := json.Unmarshal(e.Value(), &rec); err != nil || rec.Site != natstest.StandbyDomain {
			return fmt.Errorf("the returned primary's fence record: %s (%v)", e.Value(), err)
		}
		return nil
	})
	primary.Start()
	eventually(t, 60*time.Second, func() error {
		if st, owned := drStatus(t, primary); st.Role != cluster.RoleStandby || st.ActiveSite != natstest.StandbyDomain || len(owned) != 0 {
			return fmt.Errorf("returned primary not fenced: %+v, owned %v", st, owned)
		}
		return nil
	})
	// The runbook: salvage, then demote; a demotion refused for a tail the
	// salvage did not copy (a stream of the SIGKILLed R3 site that still
	// grew after it: seen on OBJ_) is answered by salvaging again.
	for attempt := 1; ; attempt++ {
		out, took, err := drCommand(t, standby, "salvage")
		require.NoError(t, err, out)
		_, salvaged, _ := strings.Cut(out, `"salvaged":`)
		t.Logf("fail-back: the returned primary fenced; citypulse standby salvage took %v, copied %s", took.Round(time.Millisecond), firstLine(salvaged, 160))
		out, took, err = drCommand(t, primary, "demote")
		if err != nil && attempt < 3 && strings.Contains(out, "salvage them at the active site first") {
			t.Logf("citypulse standby demote refused (attempt %d): %s", attempt, firstLine(out, 240))
			continue
		}
		require.NoError(t, err, out)
		t.Logf("citypulse standby demote took %v", took.Round(time.Millisecond))
		break
	}
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
