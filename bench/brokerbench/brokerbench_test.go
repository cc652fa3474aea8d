package brokerbench

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestRunTiny runs every implementation and shape briefly: each must
// deliver, without errors, and the table must name them all.
func TestRunTiny(t *testing.T) {
	results, err := Run(context.Background(), Config{
		Payloads: []int{64},
		InFlight: []int{1, 4},
		Duration: 300 * time.Millisecond, // 50 ms saw NATS queue rows deliver nothing under -race
		Warmup:   -1,
		Rounds:   1,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2*(3*2+1) { // two shapes; three impls at two in-flight counts, nats at one
		t.Fatalf("%d results", len(results))
	}
	for _, r := range results {
		if r.Rate <= 0 || r.Errors != 0 || r.P50 <= 0 {
			t.Errorf("%s %s x%d: rate %.0f, p50 %v, %d errors", r.Impl, r.Shape, r.InFlight, r.Rate, r.P50, r.Errors)
		}
	}
	table := Markdown(results)
	for _, impl := range Impls() {
		if !strings.Contains(table, "| "+impl+" |") {
			t.Errorf("table lacks %s:\n%s", impl, table)
		}
	}
}

func TestOpenRefusesUnknown(t *testing.T) {
	if _, err := open("nope", OneToOne); err == nil {
		t.Error("unknown implementation accepted")
	}
	if _, err := open("memory", "fanout9"); err == nil {
		t.Error("unknown shape accepted")
	}
}
