package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// getCluster reads GET /api/v1/cluster.
func getCluster(t *testing.T, httpAddr string) clusterStatus {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/api/v1/cluster")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var st struct {
		Data clusterStatus `json:"data"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	return st.Data
}

func readyz(httpAddr string) int {
	resp, err := http.Get("http://" + httpAddr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestClusterQuorumLossIsNotAcknowledged: with two of the three NATS
// servers down, a CityPulse node acknowledges nothing (CoAP 5.03, counted)
// and /readyz turns 503; with the servers back it acknowledges again, and
// every reading it acknowledged is in the shared store. /api/v1/cluster
// shows the node, its partitions and their lag.
func TestClusterQuorumLossIsNotAcknowledged(t *testing.T) {
	skipUnlessCluster(t)
	const partitions = 4
	e := startClusterEnv(t, 4)
	n := e.node(0, partitions)
	n.Start()
	dev := e.ids[0]
	co, err := udp.Dial(n.CoAP)
	require.NoError(t, err)
	defer co.Close()
	t0 := time.Now().Truncate(time.Second).UnixMilli()
	post := func(seq int) codes.Code {
		body := fmt.Appendf(nil, `[{"n":"pressure","v":%d,"t":%.3f}]`, seq, float64(t0+int64(seq))/1000)
		resp, err := co.Post(ctxT(t, 30*time.Second), "/devices/"+dev+"/readings", message.AppSenmlJSON, bytes.NewReader(body),
			message.Option{ID: message.URIQuery, Value: []byte("key=secret-" + dev)})
		require.NoError(t, err)
		return resp.Code()
	}
	var acked []int
	seq := 1
	for ; seq <= 20; seq++ {
		require.Equal(t, codes.Changed, post(seq))
		acked = append(acked, seq)
	}
	require.Equal(t, http.StatusOK, readyz(n.HTTP))
	p := cluster.PartitionOf(dev, partitions)
	eventually(t, 20*time.Second, func() error {
		st := getCluster(t, n.HTTP)
		if !slices.Contains(st.Owned, p) || st.Partitions[p].Owner != nodeID(0) || st.Partitions[p].Pending != 0 || !st.Connected || !st.Ready {
			return fmt.Errorf("partition %d not yet shown owned by node 0 with no lag: %+v", p, st)
		}
		return nil
	})

	// Quorum lost: two of three servers SIGKILLed.
	e.nats.Nodes[1].Kill()
	e.nats.Nodes[2].Kill()
	start := time.Now()
	code := post(seq)
	t.Logf("without quorum: %v after %v", code, time.Since(start).Round(time.Millisecond))
	require.Equal(t, codes.ServiceUnavailable, code, "not acknowledged")
	seq++
	eventually(t, 30*time.Second, func() error {
		if c := readyz(n.HTTP); c != http.StatusServiceUnavailable {
			return fmt.Errorf("/readyz %d", c)
		}
		return nil
	})
	require.Positive(t, metricSum(t, []*servertest.Server{n}, `citypulse_readings_rejected_total{reason="backpressure"}`))

	// Quorum back: acknowledged again, ready again.
	e.nats.Nodes[1].Restart()
	e.nats.Nodes[2].Restart()
	restarted := time.Now()
	eventually(t, 60*time.Second, func() error {
		if c := post(seq); c != codes.Changed {
			seq++
			return fmt.Errorf("got %v", c)
		}
		acked = append(acked, seq)
		seq++
		return nil
	})
	t.Logf("acknowledged again %v after the servers were restarted (%d readings refused meanwhile)",
		time.Since(restarted).Round(time.Millisecond), seq-1-len(acked))
	eventually(t, 30*time.Second, func() error {
		if c := readyz(n.HTTP); c != http.StatusOK {
			return fmt.Errorf("/readyz %d", c)
		}
		return nil
	})
	d := &device{id: dev, t0: t0, acked: acked}
	eventually(t, 60*time.Second, func() error {
		a := auditStore([]*device{d}, exportPressure(t, e.vm))
		if a.lost > 0 || a.duplicated > 0 || a.wrong > 0 {
			return fmt.Errorf("%+v", a)
		}
		return nil
	})
	n.Stop()
}
