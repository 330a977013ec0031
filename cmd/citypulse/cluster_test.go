package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
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
)

// The cluster tests run a 3-node NATS cluster, CityPulse nodes (the real
// binary) in cluster mode and VictoriaMetrics as their shared store.
// TestClusterLosesNothingAcknowledged takes about a minute and runs in `make
// test`; TestClusterThroughput about two, only with CITYPULSE_TEST_CLUSTER=1
// (`make test-cluster` runs both, verbosely).

func skipUnlessCluster(t *testing.T) {
	t.Helper()
	skipShort(t)
	if os.Getenv("CITYPULSE_TEST_CLUSTER") == "" {
		t.Skip("the cluster tests run with CITYPULSE_TEST_CLUSTER=1 (make test-cluster)")
	}
}

// clusterFleet is the test's device list: n pipes spread over 3 districts.
func clusterFleet(t *testing.T, dir string, n int) (string, []string) {
	t.Helper()
	var b strings.Builder
	b.WriteString("devices:\n")
	var ids []string
	for i := range n {
		id := fmt.Sprintf("pipe-c%03d", i)
		ids = append(ids, id)
		fmt.Fprintf(&b, "  - {id: %s, kind: pipe, district: d%d, interval: 10s, secret: \"secret-%s\"}\n", id, i%3, id)
	}
	f := filepath.Join(dir, "devices.yaml")
	require.NoError(t, os.WriteFile(f, []byte(b.String()), 0o600))
	return f, ids
}

// clusterEnv is the shared infrastructure of a cluster test.
type clusterEnv struct {
	t       *testing.T
	nats    *natstest.Cluster
	vm      string // host:port
	devices string // the device list file
	ids     []string
}

func startClusterEnv(t *testing.T, devices int) *clusterEnv {
	t.Helper()
	e := &clusterEnv{t: t, nats: natstest.Start(t, 3)}
	vm, addr, err := servers.StartVictoriaMetrics(t.TempDir())
	require.NoError(t, err)
	t.Cleanup(func() { _ = vm.Stop(30 * time.Second) })
	e.vm = addr
	e.devices, e.ids = clusterFleet(t, t.TempDir(), devices)
	return e
}

// nodeID is the cluster.node_id of the tests' CityPulse node i.
func nodeID(i int) string { return fmt.Sprintf("cp-%d", i) }

// preferredBy is the set of partitions rendezvous hashing assigns to node i
// while the nodes live are live (cluster.Assign).
func preferredBy(partitions, i int, live ...int) map[int]bool {
	var ids []string
	for _, n := range live {
		ids = append(ids, nodeID(n))
	}
	out := map[int]bool{}
	for p, id := range cluster.Assign(partitions, ids) {
		if id == nodeID(i) {
			out[p] = true
		}
	}
	return out
}

// node prepares CityPulse node i (cluster.node_id nodeID(i); not started);
// partitions as configured.
func (e *clusterEnv) node(i, partitions int) *servertest.Server {
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	rulesFile, _ := filepath.Abs("../../configs/rules.yaml")
	s := servertest.New(e.t, binPath, "CITYPULSE_VITALS_FILE="+vitals, "CITYPULSE_RULES_FILE="+rulesFile)
	urls := strings.ReplaceAll(e.nats.URL(), ",", ", ")
	s.SetConfig(fmt.Sprintf(`data_dir: {{data}}
devices:
  file: %s
log:
  format: json
storage:
  remote_write:
    enabled: true
    url: http://%s/api/v1/write
    batch:
      max_age: 200ms
cluster:
  enabled: true
  urls: [%s]
  node_id: %s
  partitions: %d
`, e.devices, e.vm, urls, nodeID(i), partitions))
	return s
}

// device publishes readings 1, 2, ... of one device with QoS 1, one at a
// time, each with value = sequence number and time = t0 + sequence ms: a
// reading is acknowledged when its PUBACK came. On an error (no PUBACK: not
// acknowledged) it connects to the next node's broker and sends the same
// reading again, as a device does.
type device struct {
	id      string
	brokers []string
	next    int // index of the broker to connect to next
	t0      int64
	acked   []int // sequence numbers acknowledged, in order
	resent  int
	lat     []time.Duration
}

func (d *device) connect() (mqtt.Client, error) {
	addr := d.brokers[d.next%len(d.brokers)]
	d.next++
	return mqttConnect(addr, d.id, "secret-"+d.id, false)
}

// run publishes until stop is closed (the reading in flight is finished,
// for at most 30 s more), or maxSeq readings are acknowledged.
func (d *device) run(stop <-chan struct{}, maxSeq int) {
	var c mqtt.Client
	defer func() {
		if c != nil {
			c.Disconnect(0)
		}
	}()
	seq := 1
	var stopAt time.Time
	retrying := false // the reading seq was sent and not acknowledged
	for seq <= maxSeq {
		select {
		case <-stop:
			if stopAt.IsZero() {
				stopAt = time.Now()
			}
		default:
		}
		if !stopAt.IsZero() && (!retrying || time.Since(stopAt) > 30*time.Second) {
			return
		}
		if c == nil {
			var err error
			if c, err = d.connect(); err != nil {
				c = nil
				time.Sleep(100 * time.Millisecond)
				continue
			}
		}
		body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, d.t0+int64(seq), seq)
		start := time.Now()
		tok := c.Publish("devices/"+d.id+"/readings", 1, false, []byte(body))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			d.resent++
			retrying = true
			c.Disconnect(0)
			c = nil
			continue // not acknowledged: the same reading again, to another node
		}
		retrying = false
		d.lat = append(d.lat, time.Since(start))
		d.acked = append(d.acked, seq)
		seq++
	}
}

// storedSample is one sample of the store's export.
type storedSample struct {
	ms    int64
	value float64
}

// exportPressure reads every pipe_pressure sample from VictoriaMetrics:
// device → samples.
func exportPressure(t *testing.T, vm string) map[string][]storedSample {
	t.Helper()
	u := "http://" + vm + "/api/v1/export?match[]=" + url.QueryEscape(`{__name__="pipe_pressure"}`)
	resp, err := http.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	out := map[string][]storedSample{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var line struct {
			Metric     map[string]string `json:"metric"`
			Values     []float64         `json:"values"`
			Timestamps []int64           `json:"timestamps"`
		}
		require.NoError(t, json.Unmarshal(sc.Bytes(), &line))
		dev := line.Metric["device"]
		for i := range line.Values {
			out[dev] = append(out[dev], storedSample{line.Timestamps[i], line.Values[i]})
		}
	}
	require.NoError(t, sc.Err())
	return out
}

// audit counts the acknowledged readings in the store: lost (not there at
// their exact time with their value), duplicated (more than one sample at
// their time), wrong (a sample at the time with another value), and the
// readings stored that were never acknowledged (sent, then the device did
// not get the PUBACK: it sent them again).
type audit struct {
	acked, stored, lost, duplicated, wrong, extra int
	lostExamples                                  []string
}

func auditStore(devs []*device, got map[string][]storedSample) audit {
	var a audit
	for _, d := range devs {
		samples := got[d.id]
		byTime := map[int64][]float64{}
		for _, s := range samples {
			byTime[s.ms] = append(byTime[s.ms], s.value)
		}
		a.stored += len(samples)
		acked := map[int64]bool{}
		for _, seq := range d.acked {
			a.acked++
			ms := d.t0 + int64(seq)
			acked[ms] = true
			vs := byTime[ms]
			switch {
			case len(vs) == 0:
				a.lost++
				if len(a.lostExamples) < 10 {
					a.lostExamples = append(a.lostExamples, fmt.Sprintf("%s#%d", d.id, seq))
				}
			case len(vs) > 1:
				a.duplicated += len(vs) - 1
			case vs[0] != float64(seq):
				a.wrong++
			}
		}
		for ms := range byTime {
			if !acked[ms] {
				a.extra++
			}
		}
	}
	return a
}

// logTimes returns the time and partition of each JSON log line of logs
// whose msg is msg.
func logTimes(logs, msg string) []struct {
	at        time.Time
	partition int
} {
	var out []struct {
		at        time.Time
		partition int
	}
	for line := range strings.SplitSeq(logs, "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		var l struct {
			Time      time.Time `json:"time"`
			Msg       string    `json:"msg"`
			Partition int       `json:"partition"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == msg {
			out = append(out, struct {
				at        time.Time
				partition int
			}{l.Time, l.Partition})
		}
	}
	return out
}

// streamLeader is the NATS server leading the readings stream.
func streamLeader(t *testing.T, urls string) string {
	t.Helper()
	nc, err := nats.Connect(urls)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	var leader string
	eventually(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, cluster.Default().Stream)
		if err != nil {
			return err
		}
		if c := s.CachedInfo().Cluster; c == nil || c.Leader == "" {
			return fmt.Errorf("no stream leader")
		}
		leader = s.CachedInfo().Cluster.Leader
		return nil
	})
	return leader
}

// metricSum adds up a counter's value over the nodes' /metrics.
func metricSum(t *testing.T, nodes []*servertest.Server, name string) float64 {
	t.Helper()
	var sum float64
	for _, n := range nodes {
		resp, err := http.Get("http://" + n.HTTP + "/metrics")
		if err != nil {
			continue // a node killed at the end
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for line := range strings.SplitSeq(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == name {
				v, _ := strconv.ParseFloat(f[1], 64)
				sum += v
			}
		}
	}
	return sum
}

// vmMetric adds up one of VictoriaMetrics's own counters over its labels.
func vmMetric(t *testing.T, vm, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + vm + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var sum float64
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && (f[0] == name || strings.HasPrefix(f[0], name+"{")) {
			v, _ := strconv.ParseFloat(f[1], 64)
			sum += v
		}
	}
	return sum
}

func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// TestClusterLosesNothingAcknowledged: 3 CityPulse nodes on a 3-node NATS
// cluster, QoS 1 devices spread over their brokers; one CityPulse node is
// SIGKILLed (and restarted 10 s later, with its disk, as a supervisor
// does: its journal replays what its sinks had not written, which the
// survivors wrote too; for a node that never returns see
// TestClusterLosesNothingAcknowledgedWhenANodeNeverReturns), then the NATS
// server leading the stream is SIGKILLed. Every
// acknowledged reading must be in VictoriaMetrics exactly once, at its time,
// with its value; the partition hand-over time is measured from the logs.
func TestClusterLosesNothingAcknowledged(t *testing.T) {
	skipShort(t)
	const (
		nDevices   = 24
		partitions = 12
	)
	e := startClusterEnv(t, nDevices)
	nodes := e.startNodes(3, partitions)
	t0 := time.Now().Truncate(time.Second).UnixMilli()
	stop := make(chan struct{})
	var pubs sync.WaitGroup
	devs := startDevices(e.ids, brokersOf(nodes), t0, stop, &pubs)
	time.Sleep(8 * time.Second)
	victim := nodes[1]
	mine := e.awaitPreferred(victim, 1, len(nodes), partitions)
	killedAt := time.Now()
	victim.Kill()
	t.Logf("SIGKILLed CityPulse node 1 at %s", killedAt.Format(time.RFC3339Nano))
	time.Sleep(10 * time.Second)
	victim.Start() // the same data dir: its journal replays to the store
	t.Logf("restarted CityPulse node 1 after %v", time.Since(killedAt).Round(time.Millisecond))
	time.Sleep(6 * time.Second)
	leader := streamLeader(t, e.nats.URL())
	natsKilledAt := time.Now()
	e.nats.Node(leader).Kill()
	t.Logf("SIGKILLed NATS server %s (the stream leader)", leader)
	time.Sleep(10 * time.Second)
	close(stop)
	pubs.Wait()
	publishing := time.Since(time.UnixMilli(t0))

	// Hand-over: the partitions node 1 preferred (pref) are taken by
	// the survivors; the time from the SIGKILL to the first batch handled.
	taken, took := handover(nodes, 1, partitions, killedAt, 10*time.Second)
	require.Equal(t, mine, taken, "each of node 1's partitions with devices is taken over by a survivor within 10 s")

	// Every acknowledged reading, in the store: wait until the counts settle.
	a := e.awaitStored(nodes, devs, partitions, 90*time.Second)
	var lat []time.Duration
	resent := 0
	for _, d := range devs {
		lat = append(lat, d.lat...)
		resent += d.resent
	}
	redelivered := metricSum(t, nodes, "citypulse_cluster_redeliveries_total")
	dropped := metricSum(t, nodes, "citypulse_cluster_duplicates_dropped_total")
	late := metricSum(t, nodes, "citypulse_cluster_readings_late_total")
	vmDedup := vmMetric(t, e.vm, "vm_deduplicated_samples_total")
	t.Logf("acknowledged %d readings of %d devices in %v (%.0f/s); stored %d; lost %d, duplicated %d, wrong value %d, stored but never acknowledged %d (sent again by the device); load average %s",
		a.acked, nDevices, publishing.Round(time.Second), float64(a.acked)/publishing.Seconds(), a.stored, a.lost, a.duplicated, a.wrong, a.extra, loadAverage())
	t.Logf("hand-over after the SIGKILL: %v (all %d partitions of node 1 by survivors); NATS leader killed at +%v",
		took.Round(time.Millisecond), len(taken), natsKilledAt.Sub(killedAt).Round(time.Second))
	t.Logf("device-side PUBACK latency p50 %v p99 %v max %v; readings sent again after no PUBACK: %d",
		percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 1), resent)
	t.Logf("live nodes' counters: redeliveries %v, duplicates dropped %v, late readings (order not restorable) %v; VictoriaMetrics deduplicated %v samples",
		redelivered, dropped, late, vmDedup)
	require.Zero(t, a.lost, "lost")
	require.Zero(t, a.duplicated, "duplicated in the store")
	require.Zero(t, a.wrong, "stored with another value")
	require.Positive(t, a.acked)

	// Every node's query API answers from the shared store: the whole city,
	// not the node's own partitions.
	q := "/api/v1/query?query=" + url.QueryEscape("sum(count_over_time(pipe_pressure[1h]))")
	direct := instantValue(t, "http://"+e.vm+q)
	require.Positive(t, direct)
	for _, i := range []int{0, 2} {
		require.Equal(t, direct, instantValue(t, "http://"+nodes[i].HTTP+q), "node %d's query API answers from the shared store", i)
	}
	for _, n := range nodes {
		n.Stop()
	}
}

// ownedBy is the set of partitions a node says it owns (/api/v1/cluster).
func ownedBy(t *testing.T, nd *servertest.Server) map[int]bool {
	t.Helper()
	resp, err := http.Get("http://" + nd.HTTP + "/api/v1/cluster")
	require.NoError(t, err)
	defer resp.Body.Close()
	var st struct {
		Data clusterStatus `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	owned := map[int]bool{}
	for _, p := range st.Data.Owned {
		owned[p] = true
	}
	return owned
}

// instantValue is the single value of an instant query's answer.
func instantValue(t *testing.T, u string) float64 {
	t.Helper()
	resp, err := http.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	var ans struct {
		Data struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&ans))
	require.Len(t, ans.Data.Result, 1, u)
	v, err := strconv.ParseFloat(ans.Data.Result[0].Value[1].(string), 64)
	require.NoError(t, err)
	return v
}

// TestClusterThroughput measures acknowledged readings per second of QoS 1
// devices (one reading a message, the next after the PUBACK) with one
// machine (no cluster, the same store: the baseline), 1 CityPulse node in
// cluster mode, and 3 nodes, on the same 3-node NATS cluster, for
// CITYPULSE_TEST_CLUSTER_SECONDS (default 15) each with
// CITYPULSE_TEST_CLUSTER_DEVICES devices (default 192).
func TestClusterThroughput(t *testing.T) {
	skipUnlessCluster(t)
	secs, nDevices := envInt(t, "CITYPULSE_TEST_CLUSTER_SECONDS", 15), envInt(t, "CITYPULSE_TEST_CLUSTER_DEVICES", 192)
	e := startClusterEnv(t, nDevices)
	for _, run := range []struct {
		name    string
		nodes   int
		cluster bool
	}{{"one machine (baseline)", 1, false}, {"cluster, 1 node", 1, true}, {"cluster, 3 nodes", 3, true}} {
		nodes := make([]*servertest.Server, run.nodes)
		var wg sync.WaitGroup
		for i := range nodes {
			nodes[i] = e.node(i, 12)
			if !run.cluster {
				nodes[i].Env = append(nodes[i].Env, "CITYPULSE_CLUSTER_ENABLED=false")
			}
			wg.Add(1)
			go func() { defer wg.Done(); nodes[i].Start() }()
		}
		wg.Wait()
		var brokers []string
		for _, n := range nodes {
			brokers = append(brokers, n.MQTT)
		}
		var cpPids, natsPids []int
		for _, n := range nodes {
			cpPids = append(cpPids, n.Pid())
		}
		for _, n := range e.nats.Nodes {
			natsPids = append(natsPids, n.Pid())
		}
		cp0, nats0 := cpuOf(t, cpPids), cpuOf(t, natsPids)
		n, elapsed, lat := publishFor(e.ids, brokers, time.Duration(secs)*time.Second)
		if run.cluster {
			t.Logf("%s: the owners caught up (every batch acknowledged to JetStream) %v after the devices stopped",
				run.name, caughtUp(t, e.nats.URL(), 12).Round(10*time.Millisecond))
		}
		cp, nc := cpuOf(t, cpPids)-cp0, cpuOf(t, natsPids)-nats0
		t.Logf("%s: %d readings acknowledged in %v: %.0f readings/s; PUBACK latency p50 %v p99 %v (load average %s)",
			run.name, n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), percentile(lat, 0.5).Round(time.Microsecond),
			percentile(lat, 0.99).Round(time.Microsecond), loadAverage())
		t.Logf("  CPU: citypulse %v (%.0f readings per CPU-second), nats-server %v (%.0f readings per CPU-second)",
			cp.Round(10*time.Millisecond), float64(n)/cp.Seconds(), nc.Round(10*time.Millisecond), float64(n)/max(nc.Seconds(), 0.01))
		for _, nd := range nodes {
			if run.cluster {
				logClusterStatus(t, nd)
			}
			nd.Stop()
		}
	}
}

// cpuOf is the CPU time the processes used so far.
func cpuOf(t *testing.T, pids []int) time.Duration {
	t.Helper()
	var sum time.Duration
	for _, pid := range pids {
		d, err := servers.CPUTime(pid)
		require.NoError(t, err)
		sum += d
	}
	return sum
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	require.NoError(t, err, name)
	return n
}

// publishFor runs a device per id against brokers for d: the readings
// acknowledged, the time it took, the PUBACK latencies.
func publishFor(ids, brokers []string, d time.Duration) (int, time.Duration, []time.Duration) {
	t0 := time.Now().Truncate(time.Second).UnixMilli() // after the previous run's times (at most 10,000 ms from its start)
	stop := make(chan struct{})
	var pubs sync.WaitGroup
	start := time.Now()
	devs := startDevices(ids, brokers, t0, stop, &pubs)
	time.Sleep(d)
	close(stop)
	pubs.Wait()
	elapsed := time.Since(start)
	var n int
	var lat []time.Duration
	for _, dv := range devs {
		n += len(dv.acked)
		lat = append(lat, dv.lat...)
	}
	return n, elapsed, lat
}

func logClusterStatus(t *testing.T, nd *servertest.Server) {
	t.Helper()
	resp, err := http.Get("http://" + nd.HTTP + "/api/v1/cluster")
	require.NoError(t, err)
	defer resp.Body.Close()
	var st struct {
		Data clusterStatus `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	t.Logf("  node %s: owned %v; JetStream publish ack p50 %.2fms p90 %.2fms p99 %.2fms over %d batches",
		st.Data.Node, st.Data.Owned, st.Data.Publish.P50*1000, st.Data.Publish.P90*1000, st.Data.Publish.P99*1000, st.Data.Publish.Count)
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
