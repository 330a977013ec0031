package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

func connect(t testing.TB, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	return nc
}

func testConfig(replicas, partitions int) Config {
	c := Default()
	c.Replicas = replicas
	c.Partitions = partitions
	c.PublishTimeout = 3 * time.Second
	return c
}

func TestLogAppendReturnsOnceJetStreamStoredTheBatch(t *testing.T) {
	c := natstest.Start(t, 3)
	nc := connect(t, c.URL())
	m := NewMetrics(nil)
	l, err := NewLog(nc, testConfig(3, 8), m)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := l.EnsureStream(ctx)
	require.NoError(t, err)
	require.Equal(t, 3, s.CachedInfo().Config.Replicas)

	const n = 500
	waits := make([]func(context.Context) error, 0, n)
	for i := range n {
		w, err := l.Append(ctx, i%8, fmt.Sprintf("gw-1/%d", i), fmt.Appendf(nil, "batch %d", i))
		require.NoError(t, err)
		waits = append(waits, w)
	}
	for i, w := range waits {
		require.NoError(t, w(ctx), "batch %d", i)
	}
	info, err := s.Info(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(n), info.State.Msgs)
	// A batch resent after "no responders" may be stored after later ones:
	// look batch 9 up by its content.
	var got *jetstream.RawStreamMsg
	for seq := uint64(1); seq <= n && got == nil; seq++ {
		m, err := s.GetMsg(ctx, seq)
		require.NoError(t, err)
		if string(m.Data) == "batch 9" {
			got = m
		}
	}
	require.NotNil(t, got, "batch 9 is stored")
	require.Equal(t, "citypulse.readings.1", got.Subject, "batch 9 went to partition 9 mod 8")

	// A gateway resending a batch whose ack it lost: JetStream drops the copy.
	w, err := l.Append(ctx, 1, "gw-1/9", []byte("batch 9"))
	require.NoError(t, err)
	require.NoError(t, w(ctx))
	info, err = s.Info(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(n), info.State.Msgs)
	require.Equal(t, float64(n), testutil.ToFloat64(m.published.WithLabelValues("ok")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.published.WithLabelValues("duplicate")))

	_, err = l.Append(ctx, 8, "", nil)
	require.ErrorContains(t, err, "partition 8")
}

func TestLogAppendFailsWithoutQuorumAndNothingIsSilentlyDropped(t *testing.T) {
	c := natstest.Start(t, 3)
	survivor := c.Nodes[0]
	nc := connect(t, survivor.URL())
	m := NewMetrics(nil)
	cfg := testConfig(3, 4)
	cfg.MaxInFlight = 4
	cfg.PublishTimeout = 2 * time.Second
	l, err := NewLog(nc, cfg, m)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err = l.EnsureStream(ctx)
	require.NoError(t, err)
	w, err := l.Append(ctx, 0, "", []byte("before"))
	require.NoError(t, err)
	require.NoError(t, w(ctx))

	c.Nodes[1].Kill()
	c.Nodes[2].Kill()
	// More appends than the in-flight window: each one fails, at Append
	// (window full) or at its wait (no acknowledgement), none succeeds.
	failed := 0
	for i := range cfg.MaxInFlight + 2 {
		w, err := l.Append(ctx, i%4, "", []byte("during"))
		if err != nil {
			require.ErrorIs(t, err, ErrNotDurable)
			failed++
			continue
		}
		err = w(ctx)
		require.ErrorIs(t, err, ErrNotDurable, "append %d without a quorum", i)
		failed++
	}
	require.Equal(t, cfg.MaxInFlight+2, failed)
	require.Zero(t, testutil.ToFloat64(m.published.WithLabelValues("ok"))-1, "only the append before the outage succeeded")

	c.Nodes[1].Restart()
	c.Nodes[2].Restart()
	c.WaitReady(time.Minute)
	require.Eventually(t, func() bool {
		w, err := l.Append(ctx, 0, "after", []byte("after"))
		return err == nil && w(ctx) == nil
	}, time.Minute, 200*time.Millisecond, "appends succeed again once the quorum is back")
}

func connectURL(url string) (*nats.Conn, error) {
	return nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
}
