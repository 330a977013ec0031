package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// fleetSenders keeps one MQTT client per device on one node's broker.
type fleetSenders struct {
	t  *testing.T
	mu sync.Mutex
	cs map[string]mqtt.Client
}

// connect (re)connects every device of ids to the broker at addr.
func (f *fleetSenders) connect(addr string, ids []string) {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range ids {
		if c := f.cs[id]; c != nil {
			c.Disconnect(0)
		}
		c, err := mqttConnect(addr, id, "secret-"+id, false)
		require.NoError(f.t, err)
		f.cs[id] = c
	}
}

// send publishes one reading of every device of ids.
func (f *fleetSenders) send(ids []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range ids {
		sendQuiet(f.cs[id], id, 400)
	}
}

func (f *fleetSenders) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.cs {
		c.Disconnect(0)
	}
}

// fleetLeader is the node that took the fleet lease last.
func fleetLeader(nodes []*servertest.Server, dead map[int]bool) (int, time.Time) {
	leader, at := -1, time.Time{}
	for i, n := range nodes {
		if dead[i] {
			continue
		}
		for line := range strings.SplitSeq(n.Logs(), "\n") {
			if !strings.Contains(line, `"msg":"lease taken: this node leads","component":"cluster-fleet"`) {
				continue
			}
			for _, l := range logTimes(line, "lease taken: this node leads") {
				if l.at.After(at) {
					leader, at = i, l.at
				}
			}
		}
	}
	return leader, at
}

// TestClusterFleetRuleJudgedCityWide: district d0's pipes are spread over
// partitions owned by the three nodes. The pipes of the partitions that the
// district's own partition's node prefers keep reporting; the others are
// silent: more than silent_ratio of the district, counted together, but
// none of the devices that node sees (the old code judged the district
// there, on that sample, and never fired). The holder of the fleet lease
// combines every node's counts and fires once; it is SIGKILLed; the next
// holder restores the firing alert, judges it again while the pipes are
// still silent (no second firing) and resolves it once when they report.
func TestClusterFleetRuleJudgedCityWide(t *testing.T) {
	skipUnlessCluster(t)
	const partitions = 12
	e := startClusterEnv(t, 48) // d0: 16 pipes, some on partitions that d0's own partition's node prefers
	home := -1                  // the node that prefers d0's partition
	for i := range 3 {
		if preferredBy(partitions, i, 0, 1, 2)[cluster.PartitionOf("d0", partitions)] {
			home = i
		}
	}
	require.NotEqual(t, -1, home)
	homes := preferredBy(partitions, home, 0, 1, 2)
	var reporting, silent []string
	for i, id := range e.ids {
		switch {
		case i%3 != 0: // districts d1, d2
		case homes[cluster.PartitionOf(id, partitions)]:
			reporting = append(reporting, id)
		default:
			silent = append(silent, id)
		}
	}
	require.NotEmpty(t, reporting, "d0 has a pipe on its own partition's node")
	require.NotEmpty(t, silent)
	d0 := len(reporting) + len(silent)
	ratio := (float64(len(silent)) - 0.5) / float64(d0) // silent/d0 is above it, (silent-1)/d0 below
	t.Logf("district d0: %d pipes, %d silent (ratio %.2f > silent_ratio %.3f); node %d's own d0 pipes all report",
		d0, len(silent), float64(len(silent))/float64(d0), ratio, home)
	rulesFile := filepath.Join(t.TempDir(), "rules.yaml")
	require.NoError(t, os.WriteFile(rulesFile, []byte(fmt.Sprintf(
		"rules:\n  - {name: d0_pipes_out, type: fleet, select: {kind: pipe, district: d0}, silent_ratio: %.3f, factor: 1}\n", ratio)), 0o600))
	hook := newAlertReceiver(t, "d0_pipes_out")
	nodes := make([]*servertest.Server, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		nodes[i] = e.alertNode(i, partitions, rulesFile, hook.srv.URL)
		nodes[i].Env = append(nodes[i].Env, "CITYPULSE_VITALS_INTERVAL=1s") // the fleet counts' interval
		wg.Add(1)
		go func() { defer wg.Done(); nodes[i].Start() }()
	}
	wg.Wait()

	senders := &fleetSenders{t: t, cs: map[string]mqtt.Client{}}
	defer senders.close()
	senders.connect(nodes[0].MQTT, append(append([]string(nil), reporting...), silent...))
	var mu sync.Mutex
	talking := reporting // the devices that report, every 2 s (their interval is 10 s, factor 1)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			mu.Lock()
			ids := talking
			mu.Unlock()
			senders.send(ids)
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Second):
			}
		}
	}()
	defer func() { close(stop); <-done }()

	eventually(t, 120*time.Second, func() error {
		if n, _ := hook.distinct("firing"); n != 1 {
			return fmt.Errorf("%d firing notifications", n)
		}
		return nil
	})
	leader, _ := fleetLeader(nodes, nil)
	require.NotEqual(t, -1, leader, "a node took the fleet lease")
	judged := func(i int) float64 {
		return metricSum(t, nodes[i:i+1], `citypulse_cluster_fleet_rounds_total{result="judged"}`)
	}
	before := map[int]float64{}
	for i := range nodes {
		before[i] = judged(i)
	}
	if leader == 0 { // the devices' broker: they move to another node's
		senders.connect(nodes[1].MQTT, append(append([]string(nil), reporting...), silent...))
	}
	killedAt := time.Now()
	nodes[leader].Kill()
	t.Logf("SIGKILLed CityPulse node %d, the fleet lease holder", leader)

	// The next holder restores the firing alert and judges it on every
	// partition's counts while the pipes are still silent.
	next := -1
	eventually(t, 90*time.Second, func() error {
		i, at := fleetLeader(nodes, map[int]bool{leader: true})
		if i == -1 || at.Before(killedAt) {
			return fmt.Errorf("no node took the fleet lease since the SIGKILL")
		}
		if judged(i) <= before[i] {
			return fmt.Errorf("node %d leads but has not judged the fleet rules on every partition yet", i)
		}
		next = i
		return nil
	})
	t.Logf("node %d took the fleet lease and judged %v after the SIGKILL", next, time.Since(killedAt).Round(time.Millisecond))
	mu.Lock()
	talking = append(append([]string(nil), reporting...), silent...)
	mu.Unlock()
	eventually(t, 90*time.Second, func() error {
		if n, _ := hook.distinct("resolved"); n != 1 {
			return fmt.Errorf("%d resolved notifications", n)
		}
		return nil
	})
	resolvedAfter := time.Since(killedAt)
	time.Sleep(3 * time.Second) // a repeat would come by now
	firing, firingDeliveries := hook.distinct("firing")
	resolved, resolvedDeliveries := hook.distinct("resolved")
	t.Logf("firing: %d (%d deliveries), resolved: %d (%d deliveries), resolved %v after the SIGKILL",
		firing, firingDeliveries, resolved, resolvedDeliveries, resolvedAfter.Round(time.Millisecond))
	require.Equal(t, 1, firing, "fired once")
	require.Equal(t, 1, resolved, "resolved once")
	require.Contains(t, nodes[next].Logs(), `"msg":"partition state restored","component":"cluster-state","partition":-1,`,
		"the next holder restored the fleet alerts' state")
	for i, n := range nodes {
		if i != leader {
			n.Stop()
		}
	}
}
