package cluster

import (
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// testMembers is node self's view with a clock the test moves.
func testMembers(self string, partitions int) (*members, *time.Time) {
	now := time.Unix(1000, 0)
	m := newMembers(self, partitions, 2*time.Second)
	m.now = func() time.Time { return now }
	m.start()
	return m, &now
}

// pulls lists the partitions m pulls, given those it owns.
func pulls(m *members, owned ...int) []int {
	out := []int{}
	for p := range m.bound {
		if m.shouldPull(p, slices.Contains(owned, p)) {
			out = append(out, p)
		}
	}
	return out
}

// preferredBy lists the partitions Assign gives node id among ids.
func preferredBy(partitions int, id string, ids ...string) []int {
	out := []int{}
	for p, n := range Assign(partitions, ids) {
		if n == id {
			out = append(out, p)
		}
	}
	return out
}

func TestANodePullsWhatItPrefersAmongTheLiveNodes(t *testing.T) {
	const P = 12
	m, now := testMembers("b", P)
	require.Empty(t, pulls(m), "during the first alive timeout: nothing (the others are not heard yet)")
	m.heard("a", heartbeat{Inc: "1"})
	m.heard("c", heartbeat{Inc: "2"})
	*now = now.Add(2 * time.Second)
	m.heard("a", heartbeat{Inc: "1"})
	m.heard("c", heartbeat{Inc: "2"})
	require.Equal(t, preferredBy(P, "b", "a", "b", "c"), pulls(m), "3 live nodes: its third")
	require.Len(t, pulls(m), 4)

	*now = now.Add(1500 * time.Millisecond)
	m.heard("a", heartbeat{Inc: "1"})
	*now = now.Add(time.Second) // c not heard for 2.5 s: gone
	require.Equal(t, preferredBy(P, "b", "a", "b"), pulls(m), "c gone: its partitions are shared by a and b")
	require.Len(t, pulls(m), 6)

	m.heard("a", heartbeat{Inc: "1", Leave: true})
	require.Equal(t, preferredBy(P, "b", "b"), pulls(m), "a left: all of them at once")

	m.heard("a", heartbeat{Inc: "3"}) // a restarted
	m.heard("a", heartbeat{Inc: "1", Leave: true})
	require.Equal(t, preferredBy(P, "b", "a", "b"), pulls(m), "a stale leave of a's previous run is ignored")
}

func TestAStandInKeepsAPartitionUntilItsPreferredNodePullsIt(t *testing.T) {
	const P = 8
	m, now := testMembers("a", P)
	*now = now.Add(3 * time.Second)
	all := pulls(m)
	require.Len(t, all, P, "alone: every partition")

	m.heard("b", heartbeat{Inc: "1"}) // b joins: it prefers about half
	toB := preferredBy(P, "b", "a", "b")
	require.Len(t, toB, P/2)
	require.Equal(t, preferredBy(P, "a", "a", "b"), pulls(m), "what a does not own, it stops pulling at once")
	require.Equal(t, all, pulls(m, all...), "what a owns, it keeps while b does not pull it")

	m.heard("b", heartbeat{Inc: "1", Pulls: toB[:1]}) // b pulls one of them
	require.Equal(t, all, pulls(m, all...), "b joined less than an alive timeout ago: a keeps them")
	*now = now.Add(2 * time.Second)
	m.heard("b", heartbeat{Inc: "1", Pulls: toB[:1]})
	want := slices.DeleteFunc(slices.Clone(all), func(p int) bool { return p == toB[0] })
	require.Equal(t, want, pulls(m, all...), "a releases the one b pulls")
	m.heard("b", heartbeat{Inc: "1", Pulls: toB})
	require.Equal(t, preferredBy(P, "a", "a", "b"), pulls(m, all...), "and the rest once b pulls them")
}

// TestALateHeartbeatMovesNothingBetweenNodesThatAreAlive: cp-1's
// heartbeats are late for a moment; cp-0 and cp-2 count it gone, which
// moves the preference of one of cp-0's partitions to cp-2 (Assign's
// bound). cp-0 keeps it: cp-1 is back before the live set was stable for
// an alive timeout.
func TestALateHeartbeatMovesNothingBetweenNodesThatAreAlive(t *testing.T) {
	const P = 12
	m, now := testMembers("cp-0", P)
	beat := func(ids ...string) {
		for _, id := range ids {
			m.heard(id, heartbeat{Inc: id, Pulls: preferredBy(P, id, "cp-0", "cp-2")}) // cp-2 pulls what it prefers without cp-1
		}
	}
	beat("cp-1", "cp-2")
	*now = now.Add(2 * time.Second)
	beat("cp-1", "cp-2")
	mine := preferredBy(P, "cp-0", "cp-0", "cp-1", "cp-2")
	require.Equal(t, mine, pulls(m, mine...))
	var shifted []int
	for _, p := range mine {
		if slices.Contains(preferredBy(P, "cp-2", "cp-0", "cp-2"), p) {
			shifted = append(shifted, p)
		}
	}
	require.NotEmpty(t, shifted, "the bound shifts some of cp-0's partitions to cp-2 when cp-1 is gone (else this test shows nothing)")

	*now = now.Add(1500 * time.Millisecond)
	beat("cp-2")
	*now = now.Add(time.Second) // cp-1 unheard for 2.5 s: gone
	require.Subset(t, pulls(m, mine...), mine, "cp-0 keeps %v though cp-2 now prefers and pulls them", shifted)
	*now = now.Add(time.Second)
	beat("cp-1", "cp-2") // cp-1 is back
	require.Equal(t, mine, pulls(m, mine...))
	*now = now.Add(3 * time.Second)
	beat("cp-1", "cp-2")
	require.Equal(t, mine, pulls(m, mine...), "nothing moved")

	*now = now.Add(1500 * time.Millisecond)
	beat("cp-2")
	*now = now.Add(time.Second) // cp-1 gone for good
	require.Subset(t, pulls(m, mine...), mine)
	*now = now.Add(2 * time.Second)
	beat("cp-2")
	require.Equal(t, preferredBy(P, "cp-0", "cp-0", "cp-2"), pulls(m, mine...), "once the change lasts, cp-0 releases %v", shifted)
	require.NotSubset(t, pulls(m, mine...), shifted)
}

func TestAHeartbeatOfThisNodesIDFromAnotherProcessIsAConflict(t *testing.T) {
	m, _ := testMembers("a", 4)
	require.False(t, m.heard("a", heartbeat{Inc: m.inc}), "its own heartbeat")
	require.True(t, m.heard("a", heartbeat{Inc: "other"}), "another process with the same cluster.node_id")
	live, _, _ := m.view()
	require.Equal(t, []string{"a"}, live)
}

func TestHeartbeatCarriesTheOwnedAndPulledPartitions(t *testing.T) {
	enc := func(hb heartbeat) []byte { b, _ := json.Marshal(hb); return b }
	tests := []struct {
		name string
		in   []byte
		ok   bool
		want heartbeat
	}{
		{"owning some", enc(heartbeat{Inc: "x", Owns: []int{0, 3}, Pulls: []int{0, 3, 6}}), true, heartbeat{Inc: "x", Owns: []int{0, 3}, Pulls: []int{0, 3, 6}}},
		{"owning none", enc(heartbeat{Inc: "x"}), true, heartbeat{Inc: "x"}},
		{"leaving", enc(heartbeat{Inc: "x", Leave: true, Owns: []int{1}}), true, heartbeat{Inc: "x", Leave: true}},
		{"partitions out of range dropped", []byte(`{"inc":"x","owns":[1,64,-1,63]}`), true, heartbeat{Inc: "x", Owns: []int{1, 63}}},
		{"no incarnation", []byte(`{"owns":[1]}`), false, heartbeat{}},
		{"a heartbeat of a node before cluster.node_id", []byte("alive 0,3,6"), false, heartbeat{}},
		{"garbage", []byte(`{"inc":"x","owns":"1"}`), false, heartbeat{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hb, ok := parseHeartbeat(tc.in, 64)
			require.Equal(t, tc.ok, ok)
			require.Equal(t, tc.want, hb)
		})
	}
}

func FuzzParseHeartbeat(f *testing.F) {
	for _, s := range []string{`{"inc":"a"}`, `{"inc":"a","leave":true}`, `{"inc":"a","owns":[0,3,6],"pulls":[1]}`, "alive 0,3,6", `{"inc":"a","owns":[99999999999999999999]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		hb, ok := parseHeartbeat(b, 64)
		if !ok {
			require.Equal(t, heartbeat{}, hb)
			return
		}
		require.NotEmpty(t, hb.Inc)
		for _, ps := range [][]int{hb.Owns, hb.Pulls} {
			require.LessOrEqual(t, len(ps), 64)
			for _, p := range ps {
				require.True(t, p >= 0 && p < 64)
			}
		}
		if hb.Leave {
			require.Empty(t, hb.Owns)
			require.Empty(t, hb.Pulls)
		}
	})
}
