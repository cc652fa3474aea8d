// Command mdnsbench measures micro's mDNS registry: start→resolved across
// processes (a browser already running, and a cold one), a Lookup from a
// warm cache, and the bytes one announcement puts on the wire.
//
// It multicasts: run it only in a private network namespace, one benchmark
// at a time:
//
//	go build -o /tmp/mdnsbench ./cmd/mdnsbench
//	flock /work/bench.lock /work/shared/bin/netns-run /tmp/mdnsbench -n 20
//
// It re-executes itself with -role=service as the service process.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/micro-kit/micro/bench/mdnsbench"
)

func main() {
	var (
		role    = flag.String("role", "", "internal: \"service\" runs the service process the parent describes in $"+mdnsbench.ChildEnv)
		n       = flag.Int("n", 20, "iterations of each start→resolved measurement")
		ifaces  = flag.String("ifaces", "lo", "interfaces, comma-separated (empty: every up, multicast one)")
		network = flag.String("network", "udp4", "udp, udp4 or udp6")
		addr    = flag.String("addr", "[::]:8080", "address the nodes register ([::]:port is what a Service on :0 registers)")
		kinds   = flag.String("kinds", mdnsbench.KindRegistry+","+mdnsbench.KindService, "warm start→resolved: service process kinds, comma-separated (registry: one Register call; service: micro.Service Start)")
		others  = flag.String("others", "0,50", "warm Lookup: other services in the cache, comma-separated")
		window  = flag.Duration("window", 300*time.Millisecond, "wire bytes: how long to capture after Register and after Close")
		skip    = flag.String("skip", "", "parts to skip, comma-separated: warm, cold, lookup, wire")
		out     = flag.String("out", "", "also write the report to this file")
		cpuprof = flag.String("cpuprofile", "", "write a CPU profile of the warm Lookup loops (every -others value) to this file")
	)
	flag.Parse()
	if *role == "service" || mdnsbench.IsChild() {
		if err := mdnsbench.RunChild(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "mdnsbench service:", err)
			os.Exit(1)
		}
		return
	}
	if os.Getenv("MICRO_NETNS") != "1" {
		fail(fmt.Errorf("not in a private network namespace (MICRO_NETNS=1): run me under shared/bin/netns-run"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cfg := mdnsbench.Config{Network: *network, Addr: *addr}
	if *ifaces != "" {
		cfg.Interfaces = strings.Split(*ifaces, ",")
	}
	exe, err := os.Executable()
	if err != nil {
		fail(err)
	}
	newCmd := func() *exec.Cmd { return exec.Command(exe, "-role=service") }
	skipped := map[string]bool{}
	for _, s := range strings.Split(*skip, ",") {
		skipped[s] = true
	}

	var w io.Writer = os.Stdout
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			fail(err)
		}
		defer f.Close()
		w = io.MultiWriter(os.Stdout, f)
	}
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("# mdnsbench %s\n\ninterfaces %q, network %s, node address %s, n=%d\n\n",
		time.Now().UTC().Format(time.RFC3339), cfg.Interfaces, cfg.Network, cfg.Addr, *n)

	if !skipped["warm"] {
		p("## start→resolved, browser already running (watch event; a Lookup already waiting)\n\n")
		p("| service process | measured | median ms | p90 ms | min ms | max ms |\n|---|---|---:|---:|---:|---:|\n")
		for _, kind := range strings.Split(*kinds, ",") {
			res, err := mdnsbench.Warm(ctx, cfg, kind, *n, newCmd)
			if err != nil {
				fail(fmt.Errorf("warm %s: %w", kind, err))
			}
			row := func(what string, s mdnsbench.Summary) {
				p("| %s | %s | %s | %s | %s | %s |\n", kind, what, ms(s.Median), ms(s.P90), ms(s.Min), ms(s.Max))
			}
			row("exec → watch event", res.FromExec)
			row("Register → watch event", res.FromRegister)
			row("Register → waiting Lookup returns", res.LookupFromRegister)
			row("Register call itself", res.RegisterCall)
		}
		p("\n")
	}
	if !skipped["cold"] {
		res, err := mdnsbench.Cold(ctx, cfg, *n, newCmd)
		if err != nil {
			fail(fmt.Errorf("cold: %w", err))
		}
		s := res.NewAndLookup
		p("## cold browser: NewMDNSRegistry + first Lookup of a service registered in another process\n\n")
		p("| median ms | p90 ms | min ms | max ms |\n|---:|---:|---:|---:|\n| %s | %s | %s | %s |\n\n",
			ms(s.Median), ms(s.P90), ms(s.Min), ms(s.Max))
	}
	if !skipped["lookup"] {
		p("## Lookup from a warm cache (service heard from another registry)\n\n")
		p("| other services cached | ns/op | B/op | allocs/op |\n|---:|---:|---:|---:|\n")
		if *cpuprof != "" {
			f, err := os.Create(*cpuprof)
			if err != nil {
				fail(err)
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				fail(err)
			}
			defer f.Close()
		}
		for _, o := range strings.Split(*others, ",") {
			k, err := strconv.Atoi(o)
			if err != nil {
				fail(fmt.Errorf("-others %q: %w", o, err))
			}
			br, name, closeFn, err := mdnsbench.WarmPair(ctx, cfg, k)
			if err != nil {
				fail(fmt.Errorf("warm lookup: %w", err))
			}
			var lerr error
			r := testing.Benchmark(func(b *testing.B) {
				b.ReportAllocs()
				if err := mdnsbench.LookupLoop(ctx, br, name, b.N); err != nil {
					lerr = err
				}
			})
			closeFn()
			if lerr != nil {
				fail(fmt.Errorf("warm lookup: %w", lerr))
			}
			p("| %d | %d | %d | %d |\n", k, r.NsPerOp(), r.AllocedBytesPerOp(), r.AllocsPerOp())
		}
		if *cpuprof != "" {
			pprof.StopCPUProfile()
		}
		p("\n")
	}
	if !skipped["wire"] {
		nodes := []struct {
			label   string
			md, eps int
		}{{"helloworld", 0, 0}, {"helloworld + 5 metadata keys", 5, 0}, {"helloworld + 5 metadata keys + 20 endpoints", 5, 20}}
		p("## bytes on the wire per announced node\n\n")
		p("Payload is the DNS message (UDP payload); IP adds the UDP and IP headers (28 B IPv4, 48 B IPv6).\n\n")
		p("| node | link | announcement packets | payload B | IP B | goodbye payload B | records (an/ar) |\n|---|---|---:|---:|---:|---:|---|\n")
		for i, nd := range nodes {
			info := mdnsbench.HelloWorld("helloworld", mdnsbench.NodeID("helloworld", uint64(100+i)), cfg.Addr, nd.md, nd.eps)
			res, err := mdnsbench.WireBytes(ctx, cfg, nd.label, info, *window)
			if err != nil {
				fail(err)
			}
			keys, by := mdnsbench.PerLink(res.Announce)
			_, bye := mdnsbench.PerLink(res.Goodbye)
			for _, k := range keys {
				var pay, ip, byePay int
				var recs []string
				for _, pk := range by[k] {
					pay += pk.Payload()
					ip += pk.Wire()
					_, an, _, ar := pk.Counts()
					recs = append(recs, fmt.Sprintf("%d/%d", an, ar))
				}
				for _, pk := range bye[k] {
					byePay += pk.Payload()
				}
				p("| %s | %s | %d (%s B) | %d | %d | %d | %s |\n", nd.label, k, len(by[k]), sizes(by[k]), pay, ip, byePay, strings.Join(recs, ", "))
			}
			if res.Unrelated > 0 {
				p("| %s | (other packets heard: %d) | | | | | |\n", nd.label, res.Unrelated)
			}
		}
		p("\n")
	}
}

func sizes(ps []mdnsbench.Packet) string {
	var s []string
	for _, p := range ps {
		s = append(s, strconv.Itoa(p.Payload()))
	}
	return strings.Join(s, "+")
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mdnsbench:", err)
	os.Exit(1)
}
