package cluster

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestANodePullsAnotherNodesPartitionOnlyWhileThoseBeforeItAreGone(t *testing.T) {
	now := time.Unix(1000, 0)
	m := newMembers(2, 3, 2*time.Second) // node 2 of 3
	m.now = func() time.Time { return now }
	m.start()
	pulls := func() []bool {
		var out []bool
		for p := range 3 {
			out = append(out, m.shouldPull(p))
		}
		return out
	}
	// Partition 2 is node 2's own; 1 comes to it after node 1; 0 after nodes 0 and 1.
	require.Equal(t, []bool{false, false, true}, pulls(), "before one alive timeout: only its own")
	m.heard(0, false)
	m.heard(1, false)
	now = now.Add(3 * time.Second)
	require.Equal(t, []bool{true, true, true}, pulls(), "nodes 0 and 1 not heard of for 3s: gone")
	m.heard(0, false)
	require.Equal(t, []bool{false, true, true}, pulls(), "node 0 back: partition 0 is its again")
	m.heard(1, false)
	require.Equal(t, []bool{false, false, true}, pulls())
	m.heard(1, true)
	require.Equal(t, []bool{false, true, true}, pulls(), "node 1 left: its partition at once")
	m.heard(0, true)
	require.Equal(t, []bool{true, true, true}, pulls())
	m.heard(7, false) // not a node of this cluster: ignored
	require.Equal(t, []bool{true, true, true}, pulls())
}
