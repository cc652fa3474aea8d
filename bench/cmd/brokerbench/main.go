// Command brokerbench measures micro's memory and HTTP brokers against NATS
// core (an embedded nats-server), in one process on loopback. See package
// brokerbench for what is counted.
//
//	go run ./cmd/brokerbench                                   # the full matrix, 3 rounds, ~4 min
//	go run ./cmd/brokerbench -impls http,nats-req -rounds 1 -duration 1s
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/micro-kit/micro/bench/brokerbench"
)

func main() {
	var (
		impls    = flag.String("impls", strings.Join(brokerbench.Impls(), ","), "implementations, comma-separated")
		shapes   = flag.String("shapes", brokerbench.OneToOne+","+brokerbench.Queue3, "shapes: 1:1 and queue3")
		payloads = flag.String("payloads", "64,4096", "payload sizes in bytes")
		inflight = flag.String("inflight", "1,32", "publishes in flight")
		duration = flag.Duration("duration", 2*time.Second, "how long each measurement runs")
		warmup   = flag.Duration("warmup", 500*time.Millisecond, "warm-up before each measurement (negative: none)")
		rounds   = flag.Int("rounds", 3, "rounds; each cell's median is reported")
		out      = flag.String("out", "", "also write the table to this file")
		list     = flag.Bool("list", false, "list the implementations and exit")
		cpuprof  = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	)
	flag.Parse()
	if *list {
		for _, name := range brokerbench.Impls() {
			fmt.Printf("%-9s %s\n", name, brokerbench.About(name))
		}
		return
	}
	cfg := brokerbench.Config{
		Impls:    split(*impls),
		Shapes:   split(*shapes),
		Duration: *duration,
		Warmup:   *warmup,
		Rounds:   *rounds,
		Progress: os.Stderr,
	}
	var err error
	if cfg.Payloads, err = ints(*payloads); err != nil {
		fail(err)
	}
	if cfg.InFlight, err = ints(*inflight); err != nil {
		fail(err)
	}
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err != nil {
			fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	results, err := brokerbench.Run(ctx, cfg)
	if err != nil {
		pprof.StopCPUProfile()
		fail(err)
	}
	table := brokerbench.Markdown(results)
	fmt.Print(table)
	if *out != "" {
		if err := os.WriteFile(*out, []byte(table), 0o644); err != nil {
			fail(err)
		}
	}
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range split(s) {
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q: want positive integers", s)
		}
		out = append(out, n)
	}
	return out, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "brokerbench:", err)
	os.Exit(1)
}
