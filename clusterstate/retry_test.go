package clusterstate

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
)

func TestRetryWrite(t *testing.T) {
	other := errors.New("wrong last sequence")
	unheard, unanswered := jetstream.ErrNoStreamResponse, context.DeadlineExceeded
	for _, tc := range []struct {
		name    string
		errs    []error // op's results in turn (then nil)
		timeout time.Duration
		retried []bool // what each attempt was told (nil: do not check)
		want    error
	}{
		{"at once", nil, time.Minute, []bool{false}, nil},
		{"unheard twice, then stored", []error{unheard, unheard}, time.Minute, []bool{false, true, true}, nil},
		{"unanswered, then stored", []error{unanswered}, time.Minute, []bool{false, true}, nil},
		{"another error is not retried", []error{other}, time.Minute, []bool{false}, other},
		{"unheard until the deadline", []error{unheard, unheard, unheard, unheard}, 150 * time.Millisecond, nil, unheard},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tc.timeout)
			defer cancel()
			var told []bool
			err := retryWrite(ctx, func(actx context.Context, retried bool) error {
				deadline, ok := actx.Deadline()
				require.True(t, ok)
				require.LessOrEqual(t, time.Until(deadline), attemptTimeout, "each attempt is bounded")
				told = append(told, retried)
				if len(told) <= len(tc.errs) {
					return tc.errs[len(told)-1]
				}
				return nil
			})
			require.ErrorIs(t, err, tc.want)
			if tc.retried != nil {
				require.Equal(t, tc.retried, told)
			} else {
				require.Less(t, len(told), len(tc.errs)+1, "it gave up at the deadline")
			}
		})
	}
}

// A device added while the bucket's stream leader is gone (its server
// killed, a new leader not yet elected) is stored once the remaining two
// servers have elected one: the change waits out the election instead of
// failing with "no response from stream" (seen in CI right after a bucket
// was created) or hanging on a message the dead leader never answered.
func TestADeviceAddedDuringALeaderElectionIsStored(t *testing.T) {
	c := natstest.Start(t, 3)
	a := startRegistry(t, connect(t, c.Nodes[0].URL()))
	js, err := jetstream.New(connect(t, c.Nodes[0].URL()))
	require.NoError(t, err)
	stream, err := js.Stream(context.Background(), "KV_CITYPULSE_DEVICES")
	require.NoError(t, err)
	info, err := stream.Info(context.Background())
	require.NoError(t, err)
	leader := info.Cluster.Leader
	r := a
	if leader == c.Nodes[0].Name {
		r = startRegistry(t, connect(t, c.Nodes[1].URL()))
	}
	c.Node(leader).Kill()
	start := time.Now()
	require.NoError(t, r.Add(dev("pipe-0300")))
	t.Logf("stored %v after the stream leader %s was killed", time.Since(start).Round(time.Millisecond), leader)
	_, ok := r.Get("pipe-0300")
	require.True(t, ok)
}
