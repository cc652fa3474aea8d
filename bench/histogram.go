package bench

import (
	"math/bits"
	"time"
)

// latencyHistogram counts durations in log-linear buckets, as HdrHistogram
// does: exact below 64ns, then 32 buckets per power of two, so a percentile
// it reports is within about 1.6% of the true one (it reports the middle of
// the bucket). Recording never allocates, and its zero value is empty. It is
// not safe for concurrent use: each caller keeps its own and they are merged.
type latencyHistogram struct {
	counts [latencyBuckets]uint64
	n      uint64
	max    time.Duration
}

const (
	latencySubBits = 5 // 32 buckets per power of two
	latencySub     = 1 << latencySubBits
	latencyBuckets = (64 - latencySubBits) * latencySub
)

// latencyIndex returns the bucket of v nanoseconds.
func latencyIndex(v uint64) int {
	if v < 2*latencySub {
		return int(v)
	}
	shift := bits.Len64(v) - latencySubBits - 1
	return shift*latencySub + int(v>>shift)
}

// latencyBounds returns the smallest and largest value of bucket i.
func latencyBounds(i int) (lo, hi uint64) {
	if i < 2*latencySub {
		return uint64(i), uint64(i)
	}
	shift := i/latencySub - 1
	m := uint64(i%latencySub + latencySub)
	return m << shift, (m+1)<<shift - 1
}

// record adds one duration; negative ones count as zero.
func (h *latencyHistogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[latencyIndex(uint64(d))]++
	h.n++
	if d > h.max {
		h.max = d
	}
}

// merge adds o's counts to h.
func (h *latencyHistogram) merge(o *latencyHistogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the duration below which a fraction q (0 < q <= 1) of the
// recorded ones fall, or 0 when h is empty.
func (h *latencyHistogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			lo, hi := latencyBounds(i)
			return min(time.Duration(lo+(hi-lo)/2), h.max)
		}
	}
	return h.max
}
