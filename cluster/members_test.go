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
	m.heard(0, false, nil)
	m.heard(1, false, nil)
	now = now.Add(3 * time.Second)
	require.Equal(t, []bool{true, true, true}, pulls(), "nodes 0 and 1 not heard of for 3s: gone")
	m.heard(0, false, nil)
	require.Equal(t, []bool{false, true, true}, pulls(), "node 0 back: partition 0 is its again")
	m.heard(1, false, nil)
	require.Equal(t, []bool{false, false, true}, pulls())
	m.heard(1, true, nil)
	require.Equal(t, []bool{false, true, true}, pulls(), "node 1 left: its partition at once")
	m.heard(0, true, nil)
	require.Equal(t, []bool{true, true, true}, pulls())
	m.heard(7, false, nil) // not a node of this cluster: ignored
	require.Equal(t, []bool{true, true, true}, pulls())
}

func TestHeartbeatCarriesTheOwnedPartitions(t *testing.T) {
	tests := []struct {
		name  string
		in    []byte
		leave bool
		owns  []int
	}{
		{"owning some", heartbeat([]int{0, 3, 6}), false, []int{0, 3, 6}},
		{"owning none", heartbeat(nil), false, nil},
		{"an old node's heartbeat", []byte("alive"), false, nil},
		{"leaving", []byte("leave"), true, nil},
		{"partitions out of range and garbage ignored", []byte("alive 1,64,-1,x,63"), false, []int{1, 63}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leave, owns := parseHeartbeat(tc.in, 64)
			require.Equal(t, tc.leave, leave)
			require.Equal(t, tc.owns, owns)
		})
	}
}

func FuzzParseHeartbeat(f *testing.F) {
	for _, s := range []string{"alive", "leave", "alive 0,3,6", "alive ", "alive 1,,2", "alive 99999999999999999999"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		leave, owns := parseHeartbeat(b, 64)
		require.LessOrEqual(t, len(owns), 64)
		for _, p := range owns {
			require.True(t, p >= 0 && p < 64)
		}
		if leave {
			require.Empty(t, owns)
		}
	})
}
