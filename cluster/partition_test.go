package cluster

import (
	"hash/fnv"
	"os"
	"strings"
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

func TestConfigValidateNamesTheKey(t *testing.T) {
	require.NoError(t, Default().Validate())
	tests := []struct {
		name string
		edit func(*Config)
		key  string
	}{
		{"ack wait at the pin ttl", func(c *Config) { c.AckWait = c.PinnedTTL }, "cluster.ack_wait"},
		{"no node id", func(c *Config) { c.NodeID = "" }, "cluster.node_id"},
		{"a node id with a dot", func(c *Config) { c.NodeID = "node1.example.org" }, "cluster.node_id"},
		{"a node id with a wildcard", func(c *Config) { c.NodeID = "node>" }, "cluster.node_id"},
		{"a node id too long", func(c *Config) { c.NodeID = strings.Repeat("n", 65) }, "cluster.node_id"},
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

func TestTheDefaultNodeIDIsTheHostNameAsAToken(t *testing.T) {
	h, err := os.Hostname()
	require.NoError(t, err)
	id := DefaultNodeID()
	require.NoError(t, checkNodeID(id))
	require.Equal(t, strings.NewReplacer(".", "_", " ", "_").Replace(h), id)
}
