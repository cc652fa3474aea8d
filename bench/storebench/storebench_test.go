package storebench

import (
	"context"
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

func TestKeyBlock(t *testing.T) {
	for _, n := range []int{1, 1000, 1_000_000, 1_000_001} { // the last: widths differ
		key := keyBlock(n)
		for _, i := range []int{0, 1, n / 2, n - 1} {
			if i < n && key(i) != Key(i) {
				t.Fatalf("n %d: key(%d) = %q, want %q", n, i, key(i), Key(i))
			}
		}
	}
}
