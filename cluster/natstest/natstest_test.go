package natstest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

func TestAThreeNodeClusterSurvivesTheLossOfItsMetaLeader(t *testing.T) {
	c := Start(t, 3)
	nc, err := nats.Connect(c.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}, Replicas: 3})
	require.NoError(t, err)
	_, err = js.Publish(ctx, "t.a", []byte("before"))
	require.NoError(t, err)

	leader := c.MetaLeader()
	require.NotEmpty(t, leader)
	c.Node(leader).Kill()
	require.False(t, c.Node(leader).Running())
	c.WaitReady(60 * time.Second)
	require.NotEqual(t, leader, c.MetaLeader(), "the two survivors elect a new meta leader")
	require.Eventually(t, func() bool {
		_, err := js.Publish(ctx, "t.a", []byte("during"))
		return err == nil
	}, 30*time.Second, 100*time.Millisecond, "an R3 stream takes writes with one node of three down")

	c.Node(leader).Restart()
	c.WaitReady(60 * time.Second)
	s, err := js.Stream(ctx, "T")
	require.NoError(t, err)
	require.GreaterOrEqual(t, s.CachedInfo().State.Msgs, uint64(2))
}
