package micro

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

func balancerTestNodes(addrs ...string) []*Node {
	nodes := make([]*Node, len(addrs))
	for i, a := range addrs {
		nodes[i] = &Node{ID: a, Address: a}
	}
	return nodes
}

func TestBalancerStrategiesSpread(t *testing.T) {
	nodes := balancerTestNodes("a", "b", "c")
	for _, s := range []Strategy{LeastInFlight, RoundRobin, Random} {
		b := NewBalancer(s)
		counts := map[string]int{}
		for i := 0; i < 3000; i++ {
			n, done, err := b.Pick(context.Background(), nodes)
			assertNoError(t, err)
			counts[n.Address]++
			done(nil)
		}
		for _, n := range nodes {
			if c := counts[n.Address]; c < 700 || c > 1300 {
				t.Errorf("strategy %d: node %s got %d of 3000", s, n.Address, c)
			}
		}
		if s == RoundRobin && (counts["a"] != 1000 || counts["b"] != 1000) {
			t.Errorf("round robin uneven: %v", counts)
		}
	}
	if _, _, err := NewBalancer(Random).Pick(context.Background(), nil); !errors.Is(err, ErrNoNodes) {
		t.Fatalf("no nodes: %v", err)
	}
}

func TestLeastInFlightAvoidsBusyNode(t *testing.T) {
	b := NewBalancer(LeastInFlight)
	nodes := balancerTestNodes("busy", "idle")
	var pending []func(error)
	for i := 0; i < 10; i++ { // load "busy" with calls that never finish
		n, done, _ := b.Pick(context.Background(), nodes[:1])
		assertEqual(t, n.Address, "busy")
		pending = append(pending, done)
	}
	for i := 0; i < 100; i++ {
		n, done, _ := b.Pick(context.Background(), nodes)
		assertEqual(t, n.Address, "idle") // two choices, both nodes: always the idle one
		done(nil)
	}
	for _, d := range pending {
		d(nil)
	}
	assertEqual(t, balancerInflight(b, "busy"), 0)
}

// balancerInflight returns the calls in flight at addr.
func balancerInflight(b *NodeBalancer, addr string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nodes[addr].inflight
}

// balancerAddrs returns the addresses b keeps a record of, sorted.
func balancerAddrs(b *NodeBalancer) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Sorted(maps.Keys(b.nodes))
}

// balancerPicks makes n picks over nodes, reporting err for addr and nil for
// the others, and returns how many went to addr.
func balancerPicks(t *testing.T, b *NodeBalancer, nodes []*Node, n int, addr string, err error) int {
	t.Helper()
	picked := 0
	for i := 0; i < n; i++ {
		node, done, perr := b.Pick(context.Background(), nodes)
		assertNoError(t, perr)
		if node.Address == addr {
			picked++
			done(err)
		} else {
			done(nil)
		}
	}
	return picked
}

func TestBalancerEjectsAndProbesBack(t *testing.T) {
	now := time.Unix(1000, 0)
	b := NewBalancer(RoundRobin, EjectAfter(2), EjectFor(10*time.Second))
	b.now = func() time.Time { return now }
	nodes := balancerTestNodes("bad", "good")
	down := NewError(CodeUnavailable, "down")
	pick := func() string {
		n, done, err := b.Pick(context.Background(), nodes)
		assertNoError(t, err)
		if n.Address == "bad" {
			done(down)
		} else {
			done(nil)
		}
		return n.Address
	}
	// Application errors do not count against a node.
	n, done, _ := b.Pick(context.Background(), nodes[:1])
	done(NewError(CodeNotFound, "no such user"))
	assertEqual(t, n.Address, "bad")

	bad := 0
	for i := 0; i < 10; i++ {
		if pick() == "bad" {
			bad++
		}
	}
	assertEqual(t, bad, 2) // ejected after two failures in a row
	now = now.Add(11 * time.Second)
	bad = 0
	for i := 0; i < 10; i++ {
		if pick() == "bad" {
			bad++
		}
	}
	assertEqual(t, bad, 1) // probed once, failed, ejected again at once
	now = now.Add(15 * time.Second)
	for i := 0; i < 4; i++ {
		if pick() == "bad" {
			t.Fatal("second ejection should last twice as long")
		}
	}
	now = now.Add(10 * time.Second)
	// Back, and healthy now.
	nodesOK := 0
	for i := 0; i < 10; i++ {
		n, done, _ := b.Pick(context.Background(), nodes)
		done(nil)
		if n.Address == "bad" {
			nodesOK++
		}
	}
	assertEqual(t, nodesOK, 5)

	// With every node ejected, all are offered rather than none.
	all := NewBalancer(Random, EjectAfter(1))
	for _, n := range nodes {
		_, done, _ := all.Pick(context.Background(), []*Node{n})
		done(down)
	}
	if _, _, err := all.Pick(context.Background(), nodes); err != nil {
		t.Fatalf("all ejected: %v", err)
	}
}

func TestBalancerSuccessRestoresNodeFully(t *testing.T) {
	now := time.Unix(1000, 0)
	b := NewBalancer(RoundRobin, EjectAfter(2), EjectFor(10*time.Second))
	b.now = func() time.Time { return now }
	nodes := balancerTestNodes("bad", "good")
	down := NewError(CodeUnavailable, "down")

	// Ejected twice, so a third ejection would last 40s.
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", down), 2)
	now = now.Add(11 * time.Second)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", down), 1)
	now = now.Add(21 * time.Second)
	// The probe succeeds: the node is back in full, with no failures or
	// ejections on its record.
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", nil), 5)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", down), 2) // two failures again, not one
	// A first ejection again: 10s, not 40s.
	now = now.Add(10 * time.Second)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", nil), 5)

	// A call that was in flight when the node was ejected and then succeeds
	// ends the ejection at once.
	slow, slowDone, _ := b.Pick(context.Background(), nodes[:1])
	assertEqual(t, slow.Address, "bad")
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", down), 2)
	assertEqual(t, balancerPicks(t, b, nodes, 4, "bad", down), 0) // ejected
	slowDone(nil)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "bad", nil), 5)
}

func TestBalancerContextErrorsAreNeutral(t *testing.T) {
	now := time.Unix(1000, 0)
	b := NewBalancer(RoundRobin, EjectAfter(2), EjectFor(10*time.Second))
	b.now = func() time.Time { return now }
	nodes := balancerTestNodes("slow", "good")
	down := NewError(CodeUnavailable, "down")
	neutral := []error{
		context.Canceled,
		context.DeadlineExceeded,
		fmt.Errorf("call: %w", context.DeadlineExceeded),
		NewError(CodeCanceled, "canceled"),
		NewError(CodeDeadlineExceeded, "deadline passed calling node slow"),
	}
	report := func(err error) {
		_, done, _ := b.Pick(context.Background(), nodes[:1])
		done(err)
	}

	// Never a failure: any number of them does not eject.
	for _, err := range neutral {
		report(err)
		report(err)
	}
	assertEqual(t, balancerPicks(t, b, nodes, 10, "slow", nil), 5)

	// Never a success: they do not clear a run of failures ...
	report(down)
	for _, err := range neutral {
		report(err)
	}
	report(down)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "slow", nil), 0) // ejected

	// ... nor the record of an ejected node: after its cool-down, a neutral
	// result and then one failure eject it again, for twice as long.
	now = now.Add(11 * time.Second)
	report(context.Canceled)
	report(down)
	now = now.Add(19 * time.Second)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "slow", nil), 0)
	now = now.Add(time.Second)
	assertEqual(t, balancerPicks(t, b, nodes, 10, "slow", nil), 5)
	assertEqual(t, balancerInflight(b, "slow"), 0)
}

func TestBalancerForgetsIdleNodes(t *testing.T) {
	start := time.Unix(1000, 0)
	now := start
	b := NewBalancer(Random, EjectAfter(1), EjectFor(time.Hour))
	b.now = func() time.Time { return now }
	pick := func(addr string) func(error) {
		n, done, err := b.Pick(context.Background(), balancerTestNodes(addr))
		assertNoError(t, err)
		assertEqual(t, n.Address, addr)
		return done
	}
	at := func(d time.Duration) { now = start.Add(d) }

	pick("idle")(nil)
	busyDone := pick("busy") // in flight throughout
	pick("ejected")(NewError(CodeUnavailable, "down"))
	at(90 * time.Second)
	pick("recent")(nil)
	at(6 * time.Minute) // "idle" has not been picked for 6 minutes, "recent" for 4.5
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "busy ejected probe recent")
	at(6*time.Minute + 45*time.Second) // "recent" is idle now, but pruning waits a minute
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "busy ejected probe recent")
	at(7 * time.Minute)
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "busy ejected probe")
	busyDone(nil) // picked at the start, so idle once nothing is in flight
	at(8 * time.Minute)
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "ejected probe")
	at(time.Hour + 4*time.Minute) // ejected until 1h; idle counts from then
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "ejected probe")
	at(time.Hour + 5*time.Minute)
	pick("probe")(nil)
	assertEqual(t, strings.Join(balancerAddrs(b), " "), "probe")
}

func TestFilters(t *testing.T) {
	services := []*ServiceInfo{
		{Name: "s", Version: "1", Metadata: map[string]string{"zone": "eu"}, Nodes: []*Node{
			{ID: "a", Address: "a", Metadata: map[string]string{"track": "canary"}},
			{ID: "b", Address: "b"},
		}},
		{Name: "s", Version: "2", Nodes: []*Node{{ID: "c", Address: "c", Metadata: map[string]string{"zone": "us"}}}},
	}
	got := FilterVersion("2")(services)
	assertEqual(t, len(got), 1)
	assertEqual(t, got[0].Nodes[0].ID, "c")
	got = FilterMetadata("track", "canary")(services)
	assertEqual(t, len(got), 1)
	assertEqual(t, len(got[0].Nodes), 1)
	assertEqual(t, got[0].Nodes[0].ID, "a")
	got = FilterMetadata("zone", "eu")(services) // from the record's metadata
	assertEqual(t, len(got[0].Nodes), 2)
	assertEqual(t, len(services[0].Nodes), 2) // input untouched
	assertEqual(t, len(FilterVersion("3")(services)), 0)
}

func TestRetryBudget(t *testing.T) {
	now := time.Unix(0, 0)
	b := newBalancerRetryBudget()
	b.now = func() time.Time { return now }
	n := 0
	for b.withdraw() {
		n++
	}
	assertEqual(t, n, balancerRetryPerSec) // the reserve
	for i := 0; i < 50; i++ {
		b.deposit()
	}
	n = 0
	for b.withdraw() {
		n++
	}
	assertEqual(t, n, 10) // a fifth of 50 calls
	now = now.Add(500 * time.Millisecond)
	n = 0
	for b.withdraw() {
		n++
	}
	assertEqual(t, n, 5) // half a second of reserve
}

func BenchmarkBalancerPick(b *testing.B) {
	addrs := []string{"10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080",
		"10.0.0.5:8080", "10.0.0.6:8080", "10.0.0.7:8080", "10.0.0.8:8080"}
	for _, bc := range []struct {
		name     string
		strategy Strategy
		nodes    int
	}{
		{"LeastInFlight/3", LeastInFlight, 3},
		{"RoundRobin/3", RoundRobin, 3},
		{"Random/3", Random, 3},
		{"LeastInFlight/8", LeastInFlight, 8},
	} {
		b.Run(bc.name, func(b *testing.B) {
			bal := NewBalancer(bc.strategy)
			nodes := balancerTestNodes(addrs[:bc.nodes]...)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				_, done, err := bal.Pick(ctx, nodes)
				if err != nil {
					b.Fatal(err)
				}
				done(nil)
			}
		})
	}
}
