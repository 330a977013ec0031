package cluster

import (
	"hash/fnv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPartitionOfIsFNV1aModP(t *testing.T) {
	for _, dev := range []string{"", "pipe-0001", "tl-0042", "weather-ü-7"} {
		h := fnv.New32a()
		h.Write([]byte(dev))
		for _, p := range []int{1, 7, 64, 4096} {
			require.Equal(t, int(h.Sum32()%uint32(p)), PartitionOf(dev, p), "%q mod %d", dev, p)
		}
	}
	// Pinned values: changing the hash moves every device to another node.
	require.Equal(t, 15, PartitionOf("pipe-0001", 64))
	require.Equal(t, "citypulse.readings.15", Subject(15))
}

func TestPreferredRankOrdersTheNodesFromPModN(t *testing.T) {
	// 3 nodes: partition 4 prefers node 1, then 2, then 0.
	require.Equal(t, []int{2, 0, 1}, []int{preferredRank(4, 0, 3), preferredRank(4, 1, 3), preferredRank(4, 2, 3)})
	require.Equal(t, 0, preferredRank(5, 0, 1))
}

func TestConfigValidateNamesTheKey(t *testing.T) {
	require.NoError(t, Default().Validate())
	tests := []struct {
		name string
		edit func(*Config)
		key  string
	}{
		{"ack wait at the pin ttl", func(c *Config) { c.AckWait = c.PinnedTTL }, "cluster.ack_wait"},
		{"index out of range", func(c *Config) { c.Nodes, c.Index = 3, 3 }, "cluster.index"},
		{"two replicas", func(c *Config) { c.Replicas = 2 }, "cluster.replicas"},
		{"no partitions", func(c *Config) { c.Partitions = 0 }, "cluster.partitions"},
		{"short pin", func(c *Config) { c.PinnedTTL, c.AckWait, c.Settle = time.Second, 500*time.Millisecond, 0 }, "cluster.pinned_ttl"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.edit(&c)
			require.ErrorContains(t, c.Validate(), tc.key)
		})
	}
}
