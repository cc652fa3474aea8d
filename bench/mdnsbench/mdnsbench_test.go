package mdnsbench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"
)

// The service process of the start→resolved tests is this test binary
// again, with ChildEnv set.
func TestMain(m *testing.M) {
	if IsChild() {
		if err := RunChild(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testChildCmd() *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// A race-enabled binary sleeps a second at exit unless told not to.
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	return cmd
}

// Everything that multicasts runs only inside a private network namespace
// (shared/bin/netns-run sets MICRO_NETNS=1), never on CI's real links.
func needNetns(tb testing.TB) {
	tb.Helper()
	if os.Getenv("MICRO_NETNS") != "1" {
		tb.Skip("multicasts: run under shared/bin/netns-run (MICRO_NETNS=1)")
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestSummarize(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	s := Summarize(ms(5, 1, 4, 2, 3))
	if s.N != 5 || s.Median != 3*time.Millisecond || s.Min != time.Millisecond || s.Max != 5*time.Millisecond || s.P90 != 5*time.Millisecond {
		t.Fatalf("odd count: %+v", s)
	}
	s = Summarize(ms(10, 1, 2, 3, 4, 5, 6, 7, 8, 9))
	if s.Median != 5500*time.Microsecond || s.P90 != 9*time.Millisecond {
		t.Fatalf("even count: %+v", s)
	}
	if s := Summarize(nil); s.N != 0 {
		t.Fatalf("empty: %+v", s)
	}
}

func TestHelloWorld(t *testing.T) {
	s := HelloWorld("helloworld", NodeID("helloworld", 1), "[::]:8080", 5, 3)
	if s.Name != "helloworld" || s.Version != "1.0.0" || len(s.Nodes) != 1 || len(s.Nodes[0].Metadata) != 5 || len(s.Endpoints) != 3 {
		t.Fatalf("%+v", s)
	}
	if id := s.Nodes[0].ID; len(id) != len("helloworld-")+16 || id == NodeID("helloworld", 2) {
		t.Fatalf("node ID %q", id)
	}
	if md := Metadata(7); len(md) != 7 {
		t.Fatalf("metadata %v", md)
	}
}

// A tiny run of every measurement: two starts of each kind, two cold
// lookups, a warm Lookup loop and one announcement captured.
func TestQuickRun(t *testing.T) {
	needNetns(t)
	ctx, cfg := testCtx(t), DefaultConfig()
	for _, kind := range []string{KindRegistry, KindService} {
		res, err := Warm(ctx, cfg, kind, 2, testChildCmd)
		if err != nil {
			t.Fatalf("warm %s: %v", kind, err)
		}
		if res.FromExec.N != 2 || res.FromExec.Min <= 0 || res.FromRegister.Min <= 0 {
			t.Fatalf("warm %s: %+v", kind, res)
		}
		t.Logf("warm %s: exec→event median %v, register→event median %v", kind, res.FromExec.Median, res.FromRegister.Median)
	}
	cold, err := Cold(ctx, cfg, 2, testChildCmd)
	if err != nil {
		t.Fatalf("cold: %v", err)
	}
	t.Logf("cold: median %v", cold.NewAndLookup.Median)

	br, name, closeFn, err := WarmPair(ctx, cfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	err = LookupLoop(ctx, br, name, 100)
	closeFn()
	if err != nil {
		t.Fatal(err)
	}

	node := HelloWorld("helloworld", NodeID("helloworld", 7), cfg.Addr, 0, 0)
	wr, err := WireBytes(ctx, cfg, "helloworld", node, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	keys, by := PerLink(wr.Announce)
	if len(keys) != 1 || keys[0] != "lo/udp4" || len(by["lo/udp4"]) != 1 || len(wr.Goodbye) != 1 {
		t.Fatalf("announcement on %v (%d packets), goodbye %d packets", keys, len(wr.Announce), len(wr.Goodbye))
	}
	p := wr.Announce[0]
	if qd, an, _, _ := p.Counts(); !p.Response() || qd != 0 || an == 0 || p.Wire() != p.Payload()+28 {
		t.Fatalf("announcement packet: %d bytes, counts %d/%d", p.Payload(), qd, an)
	}
	t.Logf("helloworld announcement: %d bytes payload", p.Payload())
}

// BenchmarkMDNSWarmLookup is Lookup of a service the cache already holds,
// heard from another registry.
func BenchmarkMDNSWarmLookup(b *testing.B) {
	needNetns(b)
	ctx := context.Background()
	br, name, closeFn, err := WarmPair(ctx, DefaultConfig(), 0)
	if err != nil {
		b.Fatal(err)
	}
	defer closeFn()
	b.ReportAllocs()
	b.ResetTimer()
	if err := LookupLoop(ctx, br, name, b.N); err != nil {
		b.Fatal(err)
	}
}
