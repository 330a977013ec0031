package cluster

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

// counts is how many partitions each node prefers.
func counts(assign []string) map[string]int {
	out := map[string]int{}
	for _, id := range assign {
		out[id]++
	}
	return out
}

// moved counts the partitions whose preferred node differs.
func moved(a, b []string) int {
	n := 0
	for p := range a {
		if a[p] != b[p] {
			n++
		}
	}
	return n
}

func TestAssignSpreadsThePartitionsEvenly(t *testing.T) {
	const P = 64
	for _, n := range []int{1, 2, 3, 4, 5} {
		t.Run(fmt.Sprintf("%d nodes each prefer P/N rounded down or up", n), func(t *testing.T) {
			for trial := range 200 {
				var ids []string
				for i := range n {
					ids = append(ids, fmt.Sprintf("host-%d-%d", trial, i))
				}
				a := Assign(P, ids)
				require.Len(t, a, P)
				c := counts(a)
				require.Len(t, c, n, "every node prefers some partitions")
				for id, k := range c {
					require.Contains(t, ids, id)
					require.True(t, k == P/n || k == (P+n-1)/n, "%s prefers %d of %d partitions with %d nodes", id, k, P, n)
				}
			}
		})
	}
}

func TestAssignDependsOnlyOnTheSetOfIDs(t *testing.T) {
	a := Assign(64, []string{"cp-b", "cp-a", "cp-c"})
	require.Equal(t, a, Assign(64, []string{"cp-c", "cp-b", "cp-a", "cp-b"}), "order and duplicates do not matter")
	require.Nil(t, Assign(64, nil))
	require.Equal(t, []string{"solo", "solo", "solo"}, Assign(3, []string{"solo"}))
	// Pinned: a change of the hash reshuffles every running cluster's
	// partitions during a rolling upgrade.
	require.Len(t, counts(a), 3)
	require.Equal(t, []string{"cp-a", "cp-c", "cp-b", "cp-a"}, a[:4])
}

// TestAJoinOrALeaveMovesAboutPOverNPartitions: over 500 sets of ids per
// size, a node joining N nodes (or leaving N+1) moves on average at most
// 1.4 × P/(N+1) partitions, at worst 2 × ⌈P/(N+1)⌉: the new node's share,
// and a few that the bound on each node's share shifts between the others
// (plain rendezvous hashing moves exactly the new node's share but spreads
// unevenly: with 5 nodes, one often prefers 18 of 64).
func TestAJoinOrALeaveMovesAboutPOverNPartitions(t *testing.T) {
	const P, trials = 64, 500
	for n := 1; n <= 4; n++ {
		t.Run(fmt.Sprintf("from %d to %d nodes", n, n+1), func(t *testing.T) {
			ideal := float64(P) / float64(n+1)
			worst := 2 * ((P + n) / (n + 1))
			var joins, leaves int
			for trial := range trials {
				var ids []string
				for i := range n + 1 {
					ids = append(ids, fmt.Sprintf("node-%d-%d", trial, i))
				}
				small, big := Assign(P, ids[:n]), Assign(P, ids)
				j := moved(small, big)
				for p := range big {
					if big[p] == ids[n] {
						require.NotEqual(t, ids[n], small[p])
					}
				}
				require.GreaterOrEqual(t, j, counts(big)[ids[n]], "at least the new node's share moves")
				require.LessOrEqual(t, j, worst, "join of %s", ids[n])
				l := moved(big, Assign(P, ids[1:]))
				require.LessOrEqual(t, l, worst, "leave of %s", ids[0])
				joins += j
				leaves += l
			}
			mj, ml := float64(joins)/trials, float64(leaves)/trials
			t.Logf("P=%d, %d→%d nodes: moved on a join %.1f, on a leave %.1f on average (P/N = %.1f)", P, n, n+1, mj, ml, ideal)
			require.LessOrEqual(t, mj, 1.4*ideal)
			require.LessOrEqual(t, ml, 1.4*ideal)
		})
	}
}
