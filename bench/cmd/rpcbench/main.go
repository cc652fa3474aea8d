// Command rpcbench measures unary RPC (or, with -mode stream, bidirectional
// streaming RPC) in micro against its peers, with the client in this
// process and each server in a process of its own.
//
//	go run ./cmd/rpcbench                      # every implementation, the full matrix
//	go run ./cmd/rpcbench -impls grpc,micro -duration 1s -rounds 1
//	go run ./cmd/rpcbench -cpuprofile-impl micro -cpuprofile-dir /tmp
//	go run ./cmd/rpcbench -mode stream         # streams: ping-pong and pipelined, 1 and 32 streams
//
// With -serve IMPL it is instead the server process the driver starts: it
// prints its address and answers the control protocol of bench.Serve (or
// bench.ServeStream, with -mode stream) on stdin and stdout until stdin
// closes or it gets SIGTERM.
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
		mode     = flag.String("mode", "unary", "what to measure: unary calls, or stream (bidirectional streams)")
		serve    = flag.String("serve", "", "run the server of this implementation (for the driver)")
		addr     = flag.String("addr", "127.0.0.1:0", "with -serve: the address to listen on")
		impls    = flag.String("impls", "", "implementations to measure, comma-separated (default: all of the mode's; see -list)")
		duration = flag.Duration("duration", 3*time.Second, "how long each measurement runs")
		warmup   = flag.Duration("warmup", time.Second, "how long each measurement warms up first (negative: none)")
		rounds   = flag.Int("rounds", 3, "rounds: each cell is measured once per round and the median reported")
		payloads = flag.String("payloads", "64,4096", "payload sizes in bytes, comma-separated")
		callers  = flag.String("callers", "1,32", "unary: concurrent callers, comma-separated")
		streams  = flag.String("streams", "1,32", "stream: concurrent streams, comma-separated")
		workload = flag.String("workloads", bench.PingPong+","+bench.Pipelined, "stream: workloads, comma-separated")
		profImpl = flag.String("cpuprofile-impl", "", "after the rounds, profile this implementation's server and client (unary: 64 B, 32 callers; stream: pipelined, 64 B, 1 stream)")
		profDir  = flag.String("cpuprofile-dir", ".", "where -cpuprofile-impl writes IMPL-server.pprof and IMPL-client.pprof (stream: IMPL-stream-*.pprof)")
		out      = flag.String("out", "", "also write the report to this file")
		list     = flag.Bool("list", false, "list the implementations and exit")
	)
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *mode != "unary" && *mode != "stream" {
		fail(fmt.Errorf("-mode %q: want unary or stream", *mode))
	}
	if *list {
		names, about := bench.Impls(), bench.About
		if *mode == "stream" {
			names, about = bench.StreamImpls(), bench.StreamAbout
		}
		for _, name := range names {
			fmt.Printf("%-13s %s\n", name, about(name))
		}
		return
	}
	if *serve != "" {
		serveFunc := bench.Serve
		if *mode == "stream" {
			serveFunc = bench.ServeStream
		}
		if err := serveFunc(ctx, *serve, *addr, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "rpcbench:", err)
			os.Exit(1)
		}
		return
	}
	if *warmup < 0 {
		*warmup = -1
	}
	payloadSizes, err := ints(*payloads)
	if err != nil {
		fail(fmt.Errorf("-payloads: %w", err))
	}
	started := time.Now()
	var text string
	var runErr error
	if *mode == "stream" {
		streamCounts, err := ints(*streams)
		if err != nil {
			fail(fmt.Errorf("-streams: %w", err))
		}
		text, runErr = runStream(ctx, bench.StreamConfig{
			Impls:       split(*impls),
			Workloads:   split(*workload),
			Payloads:    payloadSizes,
			Streams:     streamCounts,
			Duration:    *duration,
			Warmup:      *warmup,
			Rounds:      *rounds,
			ProfileImpl: *profImpl,
			ProfileDir:  *profDir,
			Progress:    os.Stderr,
		})
	} else {
		callerCounts, err := ints(*callers)
		if err != nil {
			fail(fmt.Errorf("-callers: %w", err))
		}
		text, runErr = runUnary(ctx, bench.Config{
			Impls:       split(*impls),
			Payloads:    payloadSizes,
			Callers:     callerCounts,
			Duration:    *duration,
			Warmup:      *warmup,
			Rounds:      *rounds,
			ProfileImpl: *profImpl,
			ProfileDir:  *profDir,
			Progress:    os.Stderr,
		})
	}
	text = header(started, os.Args[1:]) + "\n" + text
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

// runUnary runs the unary matrix and returns its report, and the error that
// stopped it early, if one did; it fails if there is no report.
func runUnary(ctx context.Context, cfg bench.Config) (string, error) {
	rep, err := bench.Run(ctx, cfg)
	if rep == nil {
		fail(err)
	}
	text := rep.Markdown()
	if p := rep.Profiled; p != nil {
		text += fmt.Sprintf("\nCPU profiles of %s (%s, %d callers, %.0f req/s while profiled): %s, %s\n",
			p.Impl, size(p.Payload), p.Callers, p.Rate(), rep.ProfileFiles[0], rep.ProfileFiles[1])
	}
	return text, err
}

// runStream is runUnary for the streaming matrix.
func runStream(ctx context.Context, cfg bench.StreamConfig) (string, error) {
	rep, err := bench.RunStream(ctx, cfg)
	if rep == nil {
		fail(err)
	}
	text := rep.Markdown()
	if p := rep.Profiled; p != nil {
		text += fmt.Sprintf("\nCPU profiles of %s (%s, %s, streams=%d, %.0f msg/s while profiled): %s, %s\n",
			p.Impl, p.Workload, size(p.Payload), p.Streams, p.Rate(), rep.ProfileFiles[0], rep.ProfileFiles[1])
	}
	return text, err
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
