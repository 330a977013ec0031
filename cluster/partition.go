package cluster

import "strconv"

// SubjectPrefix is the prefix of the partition subjects: a batch for partition
// p is published to SubjectPrefix + "." + p.
const SubjectPrefix = "citypulse.readings"

// PartitionOf returns the partition of a device: the 32-bit FNV-1a hash of its
// id modulo partitions. Every gateway and node must use the same partitions
// count (cluster.partitions): changing it moves devices between partitions.
func PartitionOf(device string, partitions int) int {
	const (
		offset32 = 2166136261
		prime32  = 16777619
	)
	h := uint32(offset32)
	for i := 0; i < len(device); i++ {
		h ^= uint32(device[i])
		h *= prime32
	}
	return int(h % uint32(partitions))
}

// Subject is the subject of partition p.
func Subject(p int) string { return SubjectPrefix + "." + strconv.Itoa(p) }

// consumerName is the durable consumer of partition p.
func consumerName(p int) string { return "citypulse-p" + strconv.Itoa(p) }
