package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// silenceOperator is the operator token of the nodes of the silence test.
const silenceOperator = "operator-token-of-the-silence-test"

// apiDo sends a request with the operator token and returns the status and
// body.
func apiDo(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	return doAs(t, silenceOperator, method, url, body)
}

// doAs sends a request with token as its bearer and returns the status and
// body.
func doAs(t *testing.T, token, method, url, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// silenceSeen makes a silence of alertname through the API at node from
// (with token) and waits until node at lists it; it returns its id and how
// long that took.
func silenceSeen(t *testing.T, token, alertname, from, at string) (string, time.Duration) {
	t.Helper()
	code, body := doAs(t, token, "POST", "http://"+from+"/api/v1/silences", silenceBody(alertname, "ops-anna"))
	require.Equal(t, http.StatusOK, code, body)
	var made struct {
		Data struct{ ID string } `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &made))
	start := time.Now()
	eventually(t, 30*time.Second, func() error {
		if _, body := doAs(t, token, "GET", "http://"+at+"/api/v1/silences", ""); !strings.Contains(body, made.Data.ID) {
			return fmt.Errorf("the silences at %s: %s", at, body)
		}
		return nil
	})
	return made.Data.ID, time.Since(start)
}

// TestClusterSilenceAtOneNodeHoldsBackTheOwnersNotification: three
// CityPulse nodes on a 3-server NATS cluster. A silence on burst_main is
// made through node A's API; the burst main's alert fires at node B, the
// owner of its partition (shown firing and silenced by A's silence in B's
// /api/v1/alerts), and the loopback webhook hears nothing; the silence ended
// through node C releases the firing at once, from B. With node-local
// silences B would have notified at once.
func TestClusterSilenceAtOneNodeHoldsBackTheOwnersNotification(t *testing.T) {
	skipUnlessCluster(t)
	const partitions = 12
	e := startClusterEnv(t, 24)
	rulesFile := filepath.Join(t.TempDir(), "rules.yaml")
	require.NoError(t, os.WriteFile(rulesFile, []byte(
		"rules:\n  - {name: burst_main, type: rate, select: {kind: pipe, metric: pressure}, drop: 80, window: 5s}\n"), 0o600))
	hook := newAlertReceiver(t, "burst_main")
	nodes := make([]*servertest.Server, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		nodes[i] = e.alertNode(i, partitions, rulesFile, hook.srv.URL)
		nodes[i].Env = append(nodes[i].Env, "CITYPULSE_HTTP_OPERATOR_TOKEN="+silenceOperator)
		wg.Add(1)
		go func() { defer wg.Done(); nodes[i].Start() }()
	}
	wg.Wait()

	pipe := e.ids[0]
	part := cluster.PartitionOf(pipe, partitions)
	cl, err := mqttConnect(nodes[0].MQTT, pipe, "secret-"+pipe, false)
	require.NoError(t, err)
	defer func() { cl.Disconnect(0) }()
	send := func(v int) {
		t.Helper()
		body := fmt.Sprintf(`{"time":%d,"pressure":%d}`, time.Now().UnixMilli(), v)
		tok := cl.Publish("devices/"+pipe+"/readings", 1, false, []byte(body))
		require.True(t, tok.WaitTimeout(20*time.Second) && tok.Error() == nil, "PUBACK: %v", tok.Error())
	}
	// A node says it owns a partition once it has consumed from it.
	owner := -1
	eventually(t, 60*time.Second, func() error {
		send(400)
		for i, n := range nodes {
			if ownedBy(t, n)[part] {
				owner = i
				return nil
			}
		}
		return fmt.Errorf("nobody owns partition %d yet", part)
	})
	a, b, c := nodes[(owner+1)%3], nodes[owner], nodes[(owner+2)%3]
	t.Logf("%s's partition %d is owned by node %d; the silence is made at node %d and ended at node %d",
		pipe, part, owner, (owner+1)%3, (owner+2)%3)

	silenced, took := silenceSeen(t, silenceOperator, "burst_main", a.HTTP, b.HTTP)
	t.Logf("the silence made at node A was listed at the owner after %v", took.Round(time.Millisecond))

	for range 4 { // the level before the burst, within the rule's window
		send(400)
		time.Sleep(300 * time.Millisecond)
	}
	send(300) // the burst
	eventually(t, 60*time.Second, func() error {
		_, body := apiDo(t, "GET", "http://"+b.HTTP+"/api/v1/alerts", "")
		var got struct {
			Data struct {
				Alerts []struct {
					State      string            `json:"state"`
					Labels     map[string]string `json:"labels"`
					SilencedBy string            `json:"silencedBy"`
				} `json:"alerts"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(body), &got); err != nil {
			return err
		}
		for _, al := range got.Data.Alerts {
			if al.Labels["alertname"] == "burst_main" && al.State == "firing" && al.SilencedBy == silenced {
				return nil
			}
		}
		return fmt.Errorf("the owner's alerts: %s", body)
	})
	time.Sleep(3 * time.Second) // a notification not held back would have arrived by now
	n, _ := hook.distinct("firing")
	require.Zero(t, n, "the owner held the silenced firing back")

	code, body := apiDo(t, "DELETE", "http://"+c.HTTP+"/api/v1/silences/"+silenced, "")
	require.Equal(t, http.StatusOK, code, body)
	ended := time.Now()
	eventually(t, 30*time.Second, func() error {
		if n, _ := hook.distinct("firing"); n != 1 {
			return fmt.Errorf("%d firing notifications", n)
		}
		return nil
	})
	t.Logf("the silence ended at node C: the owner sent the held firing %v later", time.Since(ended).Round(time.Millisecond))
	for _, n := range nodes {
		n.Stop()
	}
}
