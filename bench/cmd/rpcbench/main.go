// Command rpcbench measures unary RPC in micro against its peers, with the
// client in this process and each server in a process of its own.
//
//	go run ./cmd/rpcbench                      # every implementation, the full matrix
//	go run ./cmd/rpcbench -impls grpc,micro -duration 1s -rounds 1
//	go run ./cmd/rpcbench -cpuprofile-impl micro -cpuprofile-dir /tmp
//
// With -serve IMPL it is instead the server process the driver starts: it
// prints its address and answers the control protocol of bench.Serve on
// stdin and stdout until stdin closes or it gets SIGTERM.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/micro-kit/micro/bench"
)

func main() {
	var (
		serve    = flag.String("serve", "", "run the server of this implementation (for the driver)")
		addr     = flag.String("addr", "127.0.0.1:0", "with -serve: the address to listen on")
		impls    = flag.String("impls", strings.Join(bench.Impls(), ","), "implementations to measure, comma-separated")
		duration = flag.Duration("duration", 3*time.Second, "how long each measurement runs")
		warmup   = flag.Duration("warmup", time.Second, "how long each measurement warms up first (negative: none)")
		rounds   = flag.Int("rounds", 3, "rounds: each cell is measured once per round and the median reported")
		payloads = flag.String("payloads", "64,4096", "payload sizes in bytes, comma-separated")
		callers  = flag.String("callers", "1,32", "concurrent callers, comma-separated")
		profImpl = flag.String("cpuprofile-impl", "", "after the rounds, profile this implementation's server and client at 64 B, 32 callers")
		profDir  = flag.String("cpuprofile-dir", ".", "where -cpuprofile-impl writes IMPL-server.pprof and IMPL-client.pprof")
		out      = flag.String("out", "", "also write the report to this file")
		list     = flag.Bool("list", false, "list the implementations and exit")
	)
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *list {
		for _, name := range bench.Impls() {
			fmt.Printf("%-13s %s\n", name, bench.About(name))
		}
		return
	}
	if *serve != "" {
		if err := bench.Serve(ctx, *serve, *addr, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "rpcbench:", err)
			os.Exit(1)
		}
		return
	}

	cfg := bench.Config{
		Impls:       split(*impls),
		Duration:    *duration,
		Warmup:      *warmup,
		Rounds:      *rounds,
		ProfileImpl: *profImpl,
		ProfileDir:  *profDir,
		Progress:    os.Stderr,
	}
	var err error
	if cfg.Payloads, err = ints(*payloads); err != nil {
		fail(fmt.Errorf("-payloads: %w", err))
	}
	if cfg.Callers, err = ints(*callers); err != nil {
		fail(fmt.Errorf("-callers: %w", err))
	}
	if *warmup < 0 {
		cfg.Warmup = -1
	}
	started := time.Now()
	rep, runErr := bench.Run(ctx, cfg)
	if rep == nil {
		fail(runErr)
	}
	text := header(started, os.Args[1:]) + "\n" + rep.Markdown()
	if rep.Profiled != nil {
		text += fmt.Sprintf("\nCPU profiles of %s (%s, %d callers, %.0f req/s while profiled): %s, %s\n",
			rep.Profiled.Impl, size(rep.Profiled.Payload), rep.Profiled.Callers, rep.Profiled.Rate(),
			rep.ProfileFiles[0], rep.ProfileFiles[1])
	}
	fmt.Print(text)
	if *out != "" {
		if err := os.WriteFile(*out, []byte(text), 0o644); err != nil {
			fail(err)
		}
	}
	if runErr != nil {
		fail(runErr)
	}
}

// header says when, where and how the numbers were taken.
func header(started time.Time, args []string) string {
	return fmt.Sprintf("rpcbench %s\n\n%s, %s, %s/%s, %d CPUs, %s\n",
		strings.Join(args, " "), started.UTC().Format(time.RFC3339), runtime.Version(),
		runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), cpuModel())
}

// cpuModel reads the CPU model from /proc/cpuinfo, or says it could not.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "CPU model unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "CPU model unknown"
}

func size(n int) string {
	if n%1024 == 0 {
		return fmt.Sprintf("%d KiB", n/1024)
	}
	return fmt.Sprintf("%d B", n)
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
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "rpcbench:", err)
	os.Exit(1)
}
