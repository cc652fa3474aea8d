package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// benchServeEnv makes the test binary a server process: the driver tests
// re-execute it with this set to an implementation's name, and
// benchServeStreamEnv to a streaming implementation's.
const (
	benchServeEnv       = "BENCH_TEST_SERVE"
	benchServeStreamEnv = "BENCH_TEST_SERVE_STREAM"
)

func TestMain(m *testing.M) {
	serve, name := Serve, os.Getenv(benchServeEnv)
	if sname := os.Getenv(benchServeStreamEnv); sname != "" {
		serve, name = ServeStream, sname
	}
	if name != "" {
		if err := serve(context.Background(), name, "127.0.0.1:0", os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testServerCommand runs this test binary as a server process.
func testServerCommand(impl string) (*exec.Cmd, error) {
	return testServerCommandEnv(benchServeEnv, impl), nil
}

// testStreamServerCommand runs this test binary as a streaming server
// process.
func testStreamServerCommand(impl string) (*exec.Cmd, error) {
	return testServerCommandEnv(benchServeStreamEnv, impl), nil
}

func testServerCommandEnv(env, impl string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// A race-enabled binary sleeps a second at exit unless told not to.
	cmd.Env = append(os.Environ(), env+"="+impl, "GORACE=atexit_sleep_ms=0")
	return cmd
}

// testServe serves impl in this process and returns a caller of it; both are
// closed when the test ends.
func testServe(tb testing.TB, name string) benchCallFunc {
	tb.Helper()
	impl, err := benchImpls.lookup(name)
	if err != nil {
		tb.Fatal(err)
	}
	return testServeWith(tb, name, impl.serve, impl.newCaller)
}

// testServeStream serves the streaming implementation name in this process
// and returns an opener of its streams; both are closed when the test ends.
func testServeStream(tb testing.TB, name string) streamOpenFunc {
	tb.Helper()
	impl, err := streamImpls.lookup(name)
	if err != nil {
		tb.Fatal(err)
	}
	return testServeWith(tb, "stream "+name, impl.serve, impl.newOpener)
}

// testServeWith starts a server with serve on a loopback port and returns a
// client of it made by newClient; both are closed when the test ends.
func testServeWith[C any](tb testing.TB, name string, serve func(net.Listener) (io.Closer, error), newClient func(addr string) (C, io.Closer, error)) C {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv, err := serve(l)
	if err != nil {
		l.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := srv.Close(); err != nil {
			tb.Errorf("closing the %s server: %v", name, err)
		}
	})
	client, closer, err := newClient(l.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { closer.Close() })
	return client
}

// testNoLeak fails the test if goroutines started during it are still
// running a few seconds after it (and its cleanups) end.
func testNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func TestEcho(t *testing.T) {
	for _, name := range Impls() {
		t.Run(name, func(t *testing.T) {
			testNoLeak(t) // registered first, so it runs after testServe's cleanups
			call := testServe(t, name)
			ctx := context.Background()
			for _, size := range []int{0, 64, 4096} {
				payload := runPayload(size)
				for range 3 {
					got, err := call(ctx, payload)
					if err != nil {
						t.Fatalf("%d B: %v", size, err)
					}
					if !bytes.Equal(got, payload) {
						t.Fatalf("%d B: echo differs: got %d bytes", size, len(got))
					}
				}
			}
			// Concurrent callers share one client, as in the driver.
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for i := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					payload := runPayload(64 + i)
					for range 5 {
						got, err := call(ctx, payload)
						if err = runCheckEcho(payload, got, err); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

func TestServeProtocol(t *testing.T) {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), "raw", "127.0.0.1:0", inR, outW)
		outW.Close()
	}()
	lines := make(chan string)
	go func() {
		defer close(lines)
		buf := make([]byte, 0, 256)
		one := make([]byte, 1)
		for {
			if _, err := outR.Read(one); err != nil {
				return
			}
			if one[0] == '\n' {
				lines <- string(buf)
				buf = buf[:0]
				continue
			}
			buf = append(buf, one[0])
		}
	}()
	ask := func(line string) string {
		t.Helper()
		if line != "" {
			if _, err := io.WriteString(inW, line+"\n"); err != nil {
				t.Fatal(err)
			}
		}
		select {
		case reply := <-lines:
			return reply
		case <-time.After(10 * time.Second):
			t.Fatalf("no reply to %q", line)
			return ""
		}
	}
	addr := ask("")
	if _, _, err := net.SplitHostPort(addr); err != nil {
		t.Fatalf("first line %q is not an address: %v", addr, err)
	}
	call, closer, err := rawImpl{}.newCaller(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	if got, err := call(context.Background(), []byte("hi")); err != nil || string(got) != "hi" {
		t.Fatalf("call = %q, %v", got, err)
	}
	var mallocs, bytes, gcs, cpu uint64
	if _, err := fmt.Sscanf(ask("stats"), "stats mallocs=%d bytes=%d gcs=%d cpu=%d", &mallocs, &bytes, &gcs, &cpu); err != nil || mallocs == 0 {
		t.Errorf("stats: %v, mallocs=%d", err, mallocs)
	}
	prof := filepath.Join(t.TempDir(), "cpu.pprof")
	if got := ask("cpuprofile-start " + prof); got != "ok" {
		t.Errorf("cpuprofile-start = %q", got)
	}
	if got := ask("cpuprofile-start " + prof); !strings.HasPrefix(got, "error ") {
		t.Errorf("second cpuprofile-start = %q, want an error", got)
	}
	if got := ask("cpuprofile-stop"); got != "ok" {
		t.Errorf("cpuprofile-stop = %q", got)
	}
	if fi, err := os.Stat(prof); err != nil || fi.Size() == 0 {
		t.Errorf("profile file: %v", err)
	}
	if got := ask("bogus"); !strings.HasPrefix(got, "error ") {
		t.Errorf("bogus = %q, want an error", got)
	}
	inW.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its input ended")
	}
}

// TestRunSmoke runs the driver across processes with tiny durations.
func TestRunSmoke(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{
		Impls:         []string{"grpc", "micro"},
		Payloads:      []int{64},
		Callers:       []int{1, 4},
		Duration:      100 * time.Millisecond,
		Warmup:        20 * time.Millisecond,
		Rounds:        1,
		ProfileImpl:   "micro",
		ProfileDir:    dir,
		ServerCommand: testServerCommand,
	}
	rep, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 4 {
		t.Fatalf("%d rows, want 4:\n%s", len(rep.Rows), rep.Markdown())
	}
	for _, r := range rep.Rows {
		testSmokeSummary(t, r.Impl, r.Summary)
		if r.P50 <= 0 {
			t.Errorf("%s: p50 %v", r.Impl, r.P50)
		}
		if r.CPU <= 0 && runtime.GOOS == "linux" {
			t.Errorf("%s: CPU/call %v, want > 0", r.Impl, r.CPU)
		}
	}
	md := rep.Markdown()
	if n := strings.Count(md, "\n| micro | 64 B |"); n != 2 {
		t.Errorf("table has %d micro rows, want 2:\n%s", n, md)
	}
	testSmokeProfiles(t, rep.ProfileFiles)
}

// testSmokeSummary checks what every row of a smoke run shows, unary or
// streaming.
func testSmokeSummary(t *testing.T, impl string, s Summary) {
	t.Helper()
	if s.Rate <= 0 || s.P99 < s.P50 || s.Errors != 0 {
		t.Errorf("%s: %+v", impl, s)
	}
	if s.ServerAllocs <= 0 || s.ClientAllocs <= 0 {
		t.Errorf("%s: allocs %v+%v, want both sides counted", impl, s.ClientAllocs, s.ServerAllocs)
	}
	if impl == "grpc" && s.VsGRPC != 1 {
		t.Errorf("grpc vs grpc = %v", s.VsGRPC)
	}
}

// testSmokeProfiles checks a smoke run wrote both CPU profiles.
func testSmokeProfiles(t *testing.T, files [2]string) {
	t.Helper()
	for _, p := range files {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Errorf("profile %s: %v", p, err)
		}
	}
}

func TestRunUnknownImpl(t *testing.T) {
	if _, err := Run(context.Background(), Config{Impls: []string{"nope"}}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("Run with an unknown implementation = %v", err)
	}
}

func TestReportMedian(t *testing.T) {
	rep := &Report{Config: Config{Impls: []string{"grpc", "micro"}, Payloads: []int{64}, Callers: []int{1}}}
	for i, rate := range []float64{100, 300, 200} {
		rep.Samples = append(rep.Samples,
			Sample{Impl: "grpc", Payload: 64, Callers: 1, Round: i + 1, Calls: int64(rate), Elapsed: time.Second, P50: time.Duration(rate)},
			Sample{Impl: "micro", Payload: 64, Callers: 1, Round: i + 1, Calls: int64(rate / 2), Elapsed: time.Second, Costs: Costs{ClientAllocs: rate}})
	}
	rep.summarise()
	if len(rep.Rows) != 2 {
		t.Fatalf("rows = %+v", rep.Rows)
	}
	g, m := rep.Rows[0], rep.Rows[1]
	if g.Rate != 200 || g.P50 != 200 || g.RateSpread != 1 || g.VsGRPC != 1 {
		t.Errorf("grpc row %+v", g)
	}
	if m.Rate != 100 || m.ClientAllocs != 200 || m.VsGRPC != 0.5 {
		t.Errorf("micro row %+v", m)
	}
	for _, tc := range []struct {
		in   float64
		want string
	}{{0, "0"}, {999, "999"}, {1000, "1,000"}, {1234567, "1,234,567"}} {
		if got := reportCount(tc.in); got != tc.want {
			t.Errorf("reportCount(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// BenchmarkEcho measures each implementation in one process, client and
// server sharing the scheduler and the heap: quick to run, but the
// cross-process driver (cmd/rpcbench) is the measurement that counts.
func BenchmarkEcho(b *testing.B) {
	for _, size := range []int{64, 4096} {
		for _, name := range Impls() {
			b.Run(fmt.Sprintf("%s/%dB", name, size), func(b *testing.B) {
				call := testServe(b, name)
				payload := runPayload(size)
				ctx := context.Background()
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := call(ctx, payload); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

func TestStreamEcho(t *testing.T) {
	for _, name := range StreamImpls() {
		t.Run(name, func(t *testing.T) {
			testNoLeak(t) // registered first, so it runs after testServeStream's cleanups
			open := testServeStream(t, name)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()

			// One stream, ping-pong, every size, then a clean end.
			st, err := open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, size := range []int{0, 64, 4096, 64} {
				payload := runPayload(size)
				if err := st.send(payload); err != nil {
					t.Fatalf("send %d B: %v", size, err)
				}
				got, err := st.recv()
				if err != nil {
					t.Fatalf("recv %d B: %v", size, err)
				}
				if !bytes.Equal(got, payload) {
					t.Fatalf("%d B: echo differs: got %d bytes", size, len(got))
				}
			}
			if err := st.closeSend(); err != nil {
				t.Fatal(err)
			}
			if _, err := st.recv(); err != io.EOF {
				t.Fatalf("recv after closeSend = %v, want io.EOF", err)
			}
			st.close()
			st.close() // idempotent

			// A stream closed while open.
			st, err = open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.send([]byte("x")); err != nil {
				t.Fatal(err)
			}
			st.close()

			// Both workloads on concurrent streams, as the driver runs them.
			for _, workload := range []string{PingPong, Pipelined} {
				payload := runPayload(100)
				sts, err := streamOpenAll(ctx, open, 3, payload)
				if err != nil {
					t.Fatalf("%s: %v", workload, err)
				}
				hists := make([]latencyHistogram, len(sts))
				r := streamDrive(ctx, sts, workload, payload, 50*time.Millisecond, hists)
				if r.errors != 0 || r.echoes < int64(len(sts)) {
					t.Errorf("%s: %d messages, %d errors (first: %v)", workload, r.echoes, r.errors, r.firstErr)
				}
			}
		})
	}
}

// TestRunStreamSmoke runs the streaming driver across processes with tiny
// durations.
func TestRunStreamSmoke(t *testing.T) {
	dir := t.TempDir()
	cfg := StreamConfig{
		Impls:         []string{"grpc", "micro"},
		Payloads:      []int{64},
		Streams:       []int{1, 3},
		Duration:      100 * time.Millisecond,
		Warmup:        20 * time.Millisecond,
		Rounds:        1,
		ProfileImpl:   "micro",
		ProfileDir:    dir,
		ServerCommand: testStreamServerCommand,
	}
	rep, err := RunStream(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 8 {
		t.Fatalf("%d rows, want 8:\n%s", len(rep.Rows), rep.Markdown())
	}
	for _, r := range rep.Rows {
		testSmokeSummary(t, r.Impl, r.Summary)
		if pingpong := r.Workload == PingPong; pingpong != (r.P50 > 0) {
			t.Errorf("%s %s: p50 %v, p99 %v", r.Impl, r.Workload, r.P50, r.P99)
		}
	}
	md := rep.Markdown()
	if n := strings.Count(md, "\n| micro | pipelined | 64 B |"); n != 2 {
		t.Errorf("table has %d micro pipelined rows, want 2:\n%s", n, md)
	}
	if rep.Profiled == nil || rep.Profiled.Workload != Pipelined || rep.Profiled.Streams != 1 {
		t.Errorf("profiled run %+v", rep.Profiled)
	}
	testSmokeProfiles(t, rep.ProfileFiles)
}

func TestRunStreamBadConfig(t *testing.T) {
	for _, cfg := range []StreamConfig{
		{Impls: []string{"nope"}},
		{Impls: []string{"grpc"}, Workloads: []string{"nope"}},
	} {
		if _, err := RunStream(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "nope") {
			t.Errorf("RunStream(%+v) = %v", cfg, err)
		}
	}
}

// BenchmarkStream measures each streaming implementation's pipelined
// throughput on one stream in one process: a quick check only, as
// BenchmarkEcho is.
func BenchmarkStream(b *testing.B) {
	for _, size := range []int{64, 4096} {
		for _, name := range StreamImpls() {
			b.Run(fmt.Sprintf("%s/%dB", name, size), func(b *testing.B) {
				open := testServeStream(b, name)
				payload := runPayload(size)
				st, err := open(context.Background())
				if err != nil {
					b.Fatal(err)
				}
				defer st.close()
				b.SetBytes(int64(size))
				b.ReportAllocs()
				done := make(chan error, 1)
				go func() {
					for range b.N {
						if _, err := st.recv(); err != nil {
							done <- err
							return
						}
					}
					done <- nil
				}()
				for range b.N {
					if err := st.send(payload); err != nil {
						b.Fatal(err)
					}
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
