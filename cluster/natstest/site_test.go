package natstest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

func TestTwoSitesLinkedByALeafNodeThatCanBeCut(t *testing.T) {
	s := StartSites(t, 1, 1)
	require.True(t, s.Linked())
	nc, err := nats.Connect(s.Standby.URL(), nats.MaxReconnects(-1))
	require.NoError(t, err)
	defer nc.Close()
	// The primary's JetStream, reached from the standby through the link.
	pjs, err := jetstream.NewWithDomain(nc, PrimaryDomain)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = pjs.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}})
	require.NoError(t, err)

	s.Link.Cut()
	require.Eventually(t, func() bool { return !s.Linked() }, 30*time.Second, 50*time.Millisecond)
	// It stays cut: the standby retries every second and is refused.
	time.Sleep(2 * time.Second)
	require.False(t, s.Linked())
	_, err = pjs.Stream(ctx, "T")
	require.Error(t, err, "the primary's domain is unreachable while the link is cut")

	s.Link.Restore()
	s.WaitLinked(30 * time.Second)
	require.Eventually(t, func() bool { _, err := pjs.Stream(ctx, "T"); return err == nil }, 30*time.Second, 50*time.Millisecond)
}
