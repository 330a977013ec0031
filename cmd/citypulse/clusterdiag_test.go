package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/citypulse/citypulse/cluster"
	"github.com/citypulse/citypulse/cmd/internal/servertest"
)

// lossDiagnostics explains a failed loss test: the lost readings by
// partition, who owned each such partition when (from every node's log), the
// partition consumers' state in JetStream (still pending there, or
// acknowledged), each node's cluster and sink counters, and a goroutine dump
// of every node (SIGQUIT; it ends the node).
func lossDiagnostics(t *testing.T, e *clusterEnv, nodes []*servertest.Server, devs []*device, a audit, partitions int) {
	t.Helper()
	got := exportPressure(t, e.vm)
	lostBy := map[int][]string{}
	for _, d := range devs {
		have := map[int64]bool{}
		for _, s := range got[d.id] {
			have[s.ms] = true
		}
		var first, last, n int
		for _, seq := range d.acked {
			if !have[d.t0+int64(seq)] {
				if n == 0 {
					first = seq
				}
				last = seq
				n++
			}
		}
		if n > 0 {
			p := cluster.PartitionOf(d.id, partitions)
			lostBy[p] = append(lostBy[p], fmt.Sprintf("%s: %d lost of %d acked, seq %d..%d (times +%dms..+%dms after t0 %s)",
				d.id, n, len(d.acked), first, last, first, last, time.UnixMilli(d.t0).UTC().Format(time.RFC3339Nano)))
		}
	}
	events := []string{"partition gained", "partition lost to another node", "partition released", "partition settled",
		"partition taken over: first batches handled", "partition state restored", "partition handler failed; retrying",
		"partition gained with batches outstanding elsewhere; handling on, out of order if they come",
		"pulling a partition stopped; starting again", "cannot pull partition; retrying", "partition state handed over"}
	for p, lines := range lostBy {
		t.Logf("DIAG partition %d (preferred node %d): %s", p, p%len(nodes), strings.Join(lines, "; "))
		var tl []string
		for i, n := range nodes {
			for line := range strings.SplitSeq(n.Logs(), "\n") {
				var l struct {
					Time      time.Time `json:"time"`
					Msg       string    `json:"msg"`
					Partition *int      `json:"partition"`
				}
				if json.Unmarshal([]byte(line), &l) != nil || l.Partition == nil || *l.Partition != p || !slices.Contains(events, l.Msg) {
					continue
				}
				tl = append(tl, fmt.Sprintf("%s node %d: %s", l.Time.UTC().Format("15:04:05.000"), i, l.Msg))
			}
		}
		slices.Sort(tl)
		t.Logf("DIAG partition %d ownership:\n  %s", p, strings.Join(tl, "\n  "))
		consumerDiag(t, e.nats.URL(), p)
	}
	for i, n := range nodes {
		t.Logf("DIAG node %d counters:\n%s", i, nodeCounters(n))
	}
	for i, n := range nodes {
		if err := syscall.Kill(n.Pid(), syscall.SIGQUIT); err != nil {
			t.Logf("DIAG node %d: SIGQUIT: %v", i, err)
		}
	}
	time.Sleep(3 * time.Second)
	for i, n := range nodes {
		logs := n.Logs()
		if k := strings.Index(logs, "SIGQUIT"); k >= 0 {
			t.Logf("DIAG node %d goroutines (cluster package only):\n%s", i, clusterGoroutines(logs[k:]))
		}
	}
}

// consumerDiag logs partition p's consumer as JetStream sees it.
func consumerDiag(t *testing.T, urls string, p int) {
	t.Helper()
	nc, err := nats.Connect(urls)
	if err != nil {
		t.Logf("DIAG consumer: %v", err)
		return
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := js.Consumer(ctx, cluster.Default().Stream, fmt.Sprintf("citypulse-p%d", p))
	if err != nil {
		t.Logf("DIAG consumer of partition %d: %v", p, err)
		return
	}
	ci := c.CachedInfo()
	t.Logf("DIAG consumer of partition %d: pending %d, ack_pending %d, redelivered %d, waiting %d, delivered %+v, ack_floor %+v, priority %+v",
		p, ci.NumPending, ci.NumAckPending, ci.NumRedelivered, ci.NumWaiting, ci.Delivered, ci.AckFloor, ci.PriorityGroups)
}

// nodeCounters is a node's cluster, sink and journal counters.
func nodeCounters(n *servertest.Server) string {
	resp, err := http.Get("http://" + n.HTTP + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.HasPrefix(line, "#") || strings.Contains(line, "_bucket{") {
			continue
		}
		for _, pre := range []string{"citypulse_cluster_", "citypulse_sink", "citypulse_journal", "citypulse_readings_", "citypulse_pipeline"} {
			if strings.HasPrefix(line, pre) {
				out = append(out, "  "+line)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// clusterGoroutines keeps the goroutines of a Go dump whose stack is in the
// cluster package.
func clusterGoroutines(dump string) string {
	var out []string
	for g := range strings.SplitSeq(dump, "\n\n") {
		if strings.Contains(g, "citypulse/cluster.") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
