package clusterstate

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
)

type testPartial struct {
	At time.Time `json:"at"`
	N  int       `json:"n"`
}

func newTestExchange(t *testing.T) *exchange[testPartial] {
	t.Helper()
	x, err := newExchange(nil, "test.partial", "me", time.Second, "test",
		func(p testPartial) time.Time { return p.At }, nil)
	require.NoError(t, err)
	return x
}

func partialMsg(t *testing.T, node string, p testPartial) *nats.Msg {
	t.Helper()
	b, err := json.Marshal(p)
	require.NoError(t, err)
	return &nats.Msg{Subject: "test.partial." + node, Data: b}
}

func heardN(hs []heard[testPartial]) map[int]bool {
	out := map[int]bool{}
	for _, h := range hs {
		out[h.p.N] = true
	}
	return out
}

func TestExchangeKeepsEachNodesLatestPartial(t *testing.T) {
	t0 := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		msgs []*nats.Msg
		want map[int]bool
	}{
		{"another node's partial is kept",
			[]*nats.Msg{partialMsg(t, "n1", testPartial{t0, 1})}, map[int]bool{1: true}},
		{"this node's own partial is not",
			[]*nats.Msg{partialMsg(t, "me", testPartial{t0, 1})}, map[int]bool{}},
		{"a later partial replaces an earlier one",
			[]*nats.Msg{partialMsg(t, "n1", testPartial{t0, 1}), partialMsg(t, "n1", testPartial{t0.Add(time.Second), 2})}, map[int]bool{2: true}},
		{"an earlier-sent partial arriving late does not",
			[]*nats.Msg{partialMsg(t, "n1", testPartial{t0.Add(time.Second), 2}), partialMsg(t, "n1", testPartial{t0, 1})}, map[int]bool{2: true}},
		{"an unreadable partial is left out",
			[]*nats.Msg{{Subject: "test.partial.n1", Data: []byte("{")}, partialMsg(t, "n2", testPartial{t0, 2})}, map[int]bool{2: true}},
		{"each node has its own",
			[]*nats.Msg{partialMsg(t, "n1", testPartial{t0, 1}), partialMsg(t, "n2", testPartial{t0, 2})}, map[int]bool{1: true, 2: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x := newTestExchange(t)
			for _, m := range tc.msgs {
				x.receive(m)
			}
			require.Equal(t, tc.want, heardN(x.heardSince(time.Now())))
		})
	}
}

func TestExchangeForgetsSilentNodesAndBoundsTheNodes(t *testing.T) {
	x := newTestExchange(t)
	for i := range maxNodes + 10 {
		x.receive(partialMsg(t, fmt.Sprintf("n%d", i), testPartial{time.Now(), i}))
	}
	require.Len(t, x.heardSince(time.Now()), maxNodes, "one partial per node, for at most maxNodes nodes")
	x.receive(partialMsg(t, "n0", testPartial{time.Now().Add(time.Second), -1}))
	require.True(t, heardN(x.heardSince(time.Now()))[-1], "a node already kept is updated at the bound")

	require.Empty(t, x.heardSince(time.Now().Add(2*x.interval+time.Millisecond)), "older than two intervals: left out")
	x.receive(partialMsg(t, "late", testPartial{time.Now(), 7}))
	require.Equal(t, map[int]bool{7: true}, heardN(x.heardSince(time.Now())), "the forgotten ones no longer take room")
}

func TestExchangeRefusesABadNodeIDOrInterval(t *testing.T) {
	at := func(p testPartial) time.Time { return p.At }
	for _, node := range []string{"", "a.b", "a*", "a>", "a b"} {
		_, err := newExchange(nil, "s", node, time.Second, "test", at, nil)
		require.Error(t, err, node)
	}
	_, err := newExchange(nil, "s", "a", 0, "test", at, nil)
	require.Error(t, err)
}
