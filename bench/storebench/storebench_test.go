package storebench

import (
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// TestQuickRun runs every workload on both engines at a tiny size.
func TestQuickRun(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), Keys: 2000, ValueSizes: []int{100}, FsyncOps: 20, GroupOps: 200, Writers: 8,
		ReadFor: 20 * time.Millisecond}
	res, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 {
		t.Fatalf("%d results", len(res))
	}
	for _, r := range res {
		for _, w := range Workloads {
			if r.Rate[w] <= 0 {
				t.Fatalf("%s: no figure for %s", r.Engine, w)
			}
		}
		if r.SizeBytes < int64(cfg.Keys*100) {
			t.Fatalf("%s: %d bytes on disk for %d keys of 100 B", r.Engine, r.SizeBytes, cfg.Keys)
		}
	}
	var b strings.Builder
	Report(&b, Median([][]Result{res, res, res}))
	if !strings.Contains(b.String(), "read-prefix-1000") {
		t.Fatal(b.String())
	}
}

func TestReadOrder(t *testing.T) {
	for _, n := range []int{1, 1000, 1_000_001} { // the last: widths differ
		o := newReadOrder(n, 100, rand.New(rand.NewPCG(1, 2)))
		seen := map[int]bool{}
		for range 250 { // past the end: it starts over
			i, key := o.next()
			if i < 0 || i >= n || key != Key(i) {
				t.Fatalf("n %d: key %d = %q, want %q", n, i, key, Key(i))
			}
			seen[i] = true
		}
		if n > 1000 && len(seen) < 50 {
			t.Fatalf("n %d: %d distinct keys in 100", n, len(seen))
		}
	}
}
