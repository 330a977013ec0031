package cluster

import (
	"cmp"
	"slices"
)

// Assign returns the preferred node of each partition (index p: a node id)
// among the live nodes, by rendezvous (highest-random-weight) hashing with
// bounded loads: every pair (partition, node) has a weight hashed from both;
// pairs are taken in decreasing weight, and a partition goes to the node of
// its heaviest pair that still has room. Room is P/N partitions per node,
// one more for the first P mod N nodes to fill up, so every node prefers
// ⌊P/N⌋ or ⌈P/N⌉ partitions. The result depends only on the set of ids, so
// every node that hears the same nodes computes the same preferences; a
// node joining or leaving moves about P/N partitions (the weights of the
// other pairs do not change; the bound moves a few more: see the tests).
// Duplicate ids count once; no ids: nil.
func Assign(partitions int, nodes []string) []string {
	ids := slices.Clone(nodes)
	slices.Sort(ids)
	ids = slices.Compact(ids)
	if len(ids) == 0 || partitions < 1 {
		return nil
	}
	type pair struct {
		w    uint64
		p, n int
	}
	pairs := make([]pair, 0, partitions*len(ids))
	for n, id := range ids {
		h := hashID(id)
		for p := range partitions {
			pairs = append(pairs, pair{weight(p, h), p, n})
		}
	}
	slices.SortFunc(pairs, func(a, b pair) int {
		if c := cmp.Compare(b.w, a.w); c != 0 {
			return c
		}
		if c := cmp.Compare(a.p, b.p); c != 0 {
			return c
		}
		return cmp.Compare(a.n, b.n)
	})
	room, extra := partitions/len(ids), partitions%len(ids)
	out := make([]string, partitions)
	count := make([]int, len(ids))
	left := partitions
	for _, pr := range pairs {
		if out[pr.p] != "" {
			continue
		}
		switch {
		case count[pr.n] < room:
		case count[pr.n] == room && extra > 0:
			extra--
		default:
			continue
		}
		out[pr.p] = ids[pr.n]
		count[pr.n]++
		if left--; left == 0 {
			break
		}
	}
	return out
}

// hashID is the 64-bit FNV-1a hash of a node id.
func hashID(id string) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for i := 0; i < len(id); i++ {
		h ^= uint64(id[i])
		h *= prime64
	}
	return h
}

// weight is the weight of (partition p, the node whose id hashes to h):
// SplitMix64's finalizer over both, so that neighbouring partitions and
// similar ids ("node-1", "node-2") get unrelated weights.
func weight(p int, h uint64) uint64 {
	return mix64(h ^ mix64(uint64(p)+0x9e3779b97f4a7c15))
}

func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
