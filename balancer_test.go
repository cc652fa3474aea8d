package micro

import (
	"context"
	"errors"
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
		d(nil) // a second report is ignored
	}
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
