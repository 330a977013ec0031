package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
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

// alertReceiver is a real webhook receiver on loopback: it counts the
// deliveries of each (alert, transition) of the rule named alert by its
// Idempotency-Key.
type alertReceiver struct {
	srv  *httptest.Server
	mu   sync.Mutex
	keys map[string]int    // Idempotency-Key → deliveries
	kind map[string]string // Idempotency-Key → firing/resolved
}

func newAlertReceiver(t *testing.T, alert string) *alertReceiver {
	r := &alertReceiver{keys: map[string]int{}, kind: map[string]string{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var m struct {
			Status string `json:"status"`
			Alerts []struct {
				Labels map[string]string `json:"labels"`
			} `json:"alerts"`
		}
		b, _ := io.ReadAll(io.LimitReader(req.Body, 1<<20))
		if json.Unmarshal(b, &m) != nil || len(m.Alerts) == 0 || m.Alerts[0].Labels["alertname"] != alert {
			return
		}
		k := req.Header.Get("Idempotency-Key")
		r.mu.Lock()
		r.keys[k]++
		r.kind[k] = m.Status
		r.mu.Unlock()
	}))
	t.Cleanup(r.srv.Close)
	return r
}

// transitions counts the distinct transitions of a status received.
func (r *alertReceiver) transitions(status string) int {
	n, _ := r.distinct(status)
	return n
}

// distinct counts the distinct transitions of a status received, and all
// their deliveries.
func (r *alertReceiver) distinct(status string) (transitions, deliveries int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, n := range r.keys {
		if r.kind[k] == status {
			transitions++
			deliveries += n
		}
	}
	return transitions, deliveries
}

// alertNode prepares CityPulse node i (of 3) with the burst_main rule (a
// 5 s window) notifying hook.
func (e *clusterEnv) alertNode(i, partitions int, rulesFile, hook string) *servertest.Server {
	vitals, _ := filepath.Abs("../../configs/vitals.yaml")
	s := servertest.New(e.t, binPath, "CITYPULSE_VITALS_FILE="+vitals, "CITYPULSE_RULES_FILE="+rulesFile)
	s.SetConfig(fmt.Sprintf(`data_dir: {{data}}
devices:
  file: %s
log:
  format: json
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
cluster:
  enabled: true
  urls: [%s]
  node_id: %s
  partitions: %d
  state:
    checkpoint: 1s
`, e.devices, hook, e.vm, strings.ReplaceAll(e.nats.URL(), ",", ", "), nodeID(i), partitions))
	return s
}

// TestClusterAlertFiresOnceAcrossANodeKill: a burst main on a pipe whose
// partition node 1 owns fires there; the owner is SIGKILLed; the survivor that
// takes the partition over restores its alert state before it evaluates
// anything, and resolves the alert when the pressure stays low. The webhook
// receiver gets one firing and one resolved notification (by
// Idempotency-Key): the new owner neither fires it again nor forgets it.
func TestClusterAlertFiresOnceAcrossANodeKill(t *testing.T) {
	skipUnlessCluster(t)
	const partitions = 12
	e := startClusterEnv(t, 24)
	var pipe string
	pref := preferredBy(partitions, 1, 0, 1, 2)
	for _, id := range e.ids {
		if pref[cluster.PartitionOf(id, partitions)] {
			pipe = id
			break
		}
	}
	rulesFile := filepath.Join(t.TempDir(), "rules.yaml")
	require.NoError(t, os.WriteFile(rulesFile, []byte(
		"rules:\n  - {name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 5s}\n"), 0o600))
	hook := newAlertReceiver(t, "burst_main")
	nodes := make([]*servertest.Server, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		nodes[i] = e.alertNode(i, partitions, rulesFile, hook.srv.URL)
		wg.Add(1)
		go func() { defer wg.Done(); nodes[i].Start() }()
	}
	wg.Wait()

	// The device talks to node 0's broker; node 1 prefers its partition.
	c, err := mqttConnect(nodes[0].MQTT, pipe, "secret-"+pipe, false)
	require.NoError(t, err)
	defer func() { c.Disconnect(0) }()
	send := func(v int) {
		t.Helper()
		body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, time.Now().UnixMilli(), v)
		tok := c.Publish("devices/"+pipe+"/readings", 1, false, []byte(body))
		require.True(t, tok.WaitTimeout(20*time.Second) && tok.Error() == nil, "PUBACK: %v", tok.Error())
	}
	for range 6 {
		send(400)
		time.Sleep(300 * time.Millisecond)
	}
	send(300) // the burst
	eventually(t, 60*time.Second, func() error {
		if n, _ := hook.distinct("firing"); n != 1 {
			return fmt.Errorf("%d firing notifications", n)
		}
		return nil
	})
	// The owner: the node that gained the partition last (node 1 prefers
	// it, but on a slow start another node may have taken it first).
	part := cluster.PartitionOf(pipe, partitions)
	owner, gainedAt := -1, time.Time{}
	for i, n := range nodes {
		for _, l := range logTimes(n.Logs(), "partition gained") {
			if l.partition == part && l.at.After(gainedAt) {
				owner, gainedAt = i, l.at
			}
		}
	}
	require.NotEqual(t, -1, owner, "a node gained partition %d", part)
	if owner == 0 { // the device's broker: it moves to another node's
		c.Disconnect(0)
		c, err = mqttConnect(nodes[2].MQTT, pipe, "secret-"+pipe, false)
		require.NoError(t, err)
	}
	killedAt := time.Now()
	nodes[owner].Kill()
	t.Logf("SIGKILLed CityPulse node %d, the owner of %s's partition %d", owner, pipe, part)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // the pressure stays low: the burst leaves the window
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(500 * time.Millisecond):
				sendQuiet(c, pipe, 300)
			}
		}
	}()
	eventually(t, 90*time.Second, func() error {
		if n, _ := hook.distinct("resolved"); n != 1 {
			return fmt.Errorf("%d resolved notifications", n)
		}
		return nil
	})
	resolvedAfter := time.Since(killedAt)
	time.Sleep(3 * time.Second) // a repeat would come by now
	close(stop)
	<-done
	firing, firingDeliveries := hook.distinct("firing")
	resolved, resolvedDeliveries := hook.distinct("resolved")
	t.Logf("firing: %d (%d deliveries), resolved: %d (%d deliveries), resolved %v after the SIGKILL",
		firing, firingDeliveries, resolved, resolvedDeliveries, resolvedAfter.Round(time.Millisecond))
	require.Equal(t, 1, firing, "fired once")
	require.Equal(t, 1, resolved, "resolved once")
	restored := false
	for i, n := range nodes {
		if i == owner {
			continue
		}
		restored = restored || strings.Contains(n.Logs(), fmt.Sprintf(`"msg":"partition state restored","component":"cluster-state","partition":%d,`, part))
	}
	require.True(t, restored, "a survivor restored the partition's state")
	for i, n := range nodes {
		if i != owner {
			n.Stop()
		}
	}
}

// sendQuiet publishes one pressure reading, ignoring a missing PUBACK (the
// next one is sent anyway).
func sendQuiet(c mqtt.Client, id string, v int) {
	body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, time.Now().UnixMilli(), v)
	c.Publish("devices/"+id+"/readings", 1, false, []byte(body)).WaitTimeout(10 * time.Second)
}
