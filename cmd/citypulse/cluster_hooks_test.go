package main

import (
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster"
)

// The ownership hooks run in registration order, and owns(device) is true
// from before the hooks of a gain until after the hooks of a loss.
func TestClusterNodeTellsItsHooksOfGainsAndLosses(t *testing.T) {
	cfg := DefaultCluster()
	cfg.Partitions = 8
	n := &clusterNode{cfg: cfg, parts: make([]atomic.Bool, cfg.Partitions)}
	const dev = "pipe-0001"
	p := cluster.PartitionOf(dev, cfg.Partitions)
	var calls []string
	for _, name := range []string{"first", "second"} {
		n.onOwned(func(part int, owned bool) {
			calls = append(calls, fmt.Sprintf("%s %d %v owns=%v", name, part, owned, n.owns(dev)))
		})
	}
	require.False(t, n.owns(dev))
	n.owned(p, true)
	require.True(t, n.owns(dev))
	n.owned(p, false)
	require.False(t, n.owns(dev))
	require.Equal(t, []string{
		fmt.Sprintf("first %d true owns=true", p), fmt.Sprintf("second %d true owns=true", p),
		fmt.Sprintf("first %d false owns=true", p), fmt.Sprintf("second %d false owns=true", p),
	}, calls)
	other := (p + 1) % cfg.Partitions
	n.owned(other, true)
	require.False(t, n.owns(dev), "another partition's gain is not this device's")
}
