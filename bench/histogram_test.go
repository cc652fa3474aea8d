package bench

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestLatencyIndexBounds(t *testing.T) {
	// Every value falls in a bucket whose bounds hold it, and buckets are
	// contiguous and increasing.
	for _, v := range []uint64{0, 1, 63, 64, 65, 127, 128, 1000, 4095, 4096, 1 << 40, math.MaxInt64} {
		i := latencyIndex(v)
		if i < 0 || i >= latencyBuckets {
			t.Fatalf("latencyIndex(%d) = %d, out of range", v, i)
		}
		lo, hi := latencyBounds(i)
		if v < lo || v > hi {
			t.Errorf("latencyIndex(%d) = %d with bounds [%d, %d]", v, i, lo, hi)
		}
	}
	for i := 1; i < latencyIndex(math.MaxInt64); i++ {
		_, prevHi := latencyBounds(i - 1)
		lo, hi := latencyBounds(i)
		if lo != prevHi+1 || hi < lo {
			t.Fatalf("bucket %d is [%d, %d], previous ends at %d", i, lo, hi, prevHi)
		}
	}
}

func TestLatencyQuantile(t *testing.T) {
	var empty latencyHistogram
	if got := empty.quantile(0.5); got != 0 {
		t.Errorf("empty quantile = %v, want 0", got)
	}
	r := rand.New(rand.NewPCG(1, 2))
	vals := make([]time.Duration, 10000)
	var a, b latencyHistogram
	for i := range vals {
		vals[i] = time.Duration(r.ExpFloat64() * float64(50*time.Microsecond))
		if i%2 == 0 {
			a.record(vals[i])
		} else {
			b.record(vals[i])
		}
	}
	a.merge(&b)
	slices.Sort(vals)
	for _, q := range []float64{0.5, 0.9, 0.99, 1} {
		want := vals[int(math.Ceil(q*float64(len(vals))))-1]
		got := a.quantile(q)
		if diff := math.Abs(float64(got-want)) / float64(want); diff > 0.02 {
			t.Errorf("quantile(%v) = %v, want %v within 2%%", q, got, want)
		}
	}
}

func TestLatencyRecordDoesNotAllocate(t *testing.T) {
	h := new(latencyHistogram)
	if n := testing.AllocsPerRun(100, func() { h.record(1234 * time.Nanosecond) }); n != 0 {
		t.Errorf("record allocates %v times", n)
	}
}
