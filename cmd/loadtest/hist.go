package main

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Histogram is a lock-free log-linear (HDR-style) histogram of durations in
// microseconds: exact below 256 µs, then 128 sub-buckets per power of two, so
// any recorded value is reported within 0.8 %.
type Histogram struct {
	counts [histBuckets]atomic.Int64
	total  atomic.Int64
	max    atomic.Int64
}

const (
	histSub     = 128
	histBuckets = 2*histSub + 56*histSub
)

func bucketOf(us int64) int {
	if us < 0 {
		us = 0
	}
	if us < 2*histSub {
		return int(us)
	}
	shift := bits.Len64(uint64(us)) - 8 // us>>shift is in [128, 255]
	return 2*histSub + (shift-1)*histSub + int(us>>shift) - histSub
}

// bucketTop is the largest value that falls in bucket i.
func bucketTop(i int) int64 {
	if i < 2*histSub {
		return int64(i)
	}
	j := i - 2*histSub
	shift := j/histSub + 1
	return (int64(j%histSub+histSub+1) << shift) - 1
}

// Record adds one duration.
func (h *Histogram) Record(d time.Duration) {
	us := d.Microseconds()
	h.counts[bucketOf(us)].Add(1)
	h.total.Add(1)
	for {
		m := h.max.Load()
		if us <= m || h.max.CompareAndSwap(m, us) {
			return
		}
	}
}

// Count is the number of recorded values.
func (h *Histogram) Count() int64 { return h.total.Load() }

// Quantile returns the value at quantile q (0..1) in µs: the top of the bucket
// holding it, capped at the maximum.
func (h *Histogram) Quantile(q float64) int64 {
	n := h.total.Load()
	if n == 0 {
		return 0
	}
	rank := int64(q*float64(n) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var seen int64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			return min(bucketTop(i), h.max.Load())
		}
	}
	return h.max.Load()
}

// Summary is a histogram as reported: microseconds.
type Summary struct {
	Count int64 `json:"count"`
	P50   int64 `json:"p50_us"`
	P90   int64 `json:"p90_us"`
	P99   int64 `json:"p99_us"`
	P999  int64 `json:"p999_us"`
	Max   int64 `json:"max_us"`
	// Buckets are the non-empty buckets: [top µs, count].
	Buckets [][2]int64 `json:"buckets"`
}

// Summary snapshots h.
func (h *Histogram) Summary() Summary {
	s := Summary{Count: h.Count(), P50: h.Quantile(0.5), P90: h.Quantile(0.9), P99: h.Quantile(0.99),
		P999: h.Quantile(0.999), Max: h.max.Load(), Buckets: [][2]int64{}}
	for i := range h.counts {
		if c := h.counts[i].Load(); c > 0 {
			s.Buckets = append(s.Buckets, [2]int64{bucketTop(i), c})
		}
	}
	return s
}

// Reset empties h (not atomic with respect to concurrent Records: a value
// recorded during Reset may be lost, which the per-second timeline tolerates).
func (h *Histogram) Reset() {
	for i := range h.counts {
		h.counts[i].Store(0)
	}
	h.total.Store(0)
	h.max.Store(0)
}
