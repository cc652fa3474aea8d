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
// re-execute it with this set to an implementation's name.
const benchServeEnv = "BENCH_TEST_SERVE"

func TestMain(m *testing.M) {
	if name := os.Getenv(benchServeEnv); name != "" {
		if err := Serve(context.Background(), name, "127.0.0.1:0", os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testServerCommand runs this test binary as a server process.
func testServerCommand(impl string) (*exec.Cmd, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// A race-enabled binary sleeps a second at exit unless told not to.
	cmd.Env = append(os.Environ(), benchServeEnv+"="+impl, "GORACE=atexit_sleep_ms=0")
	return cmd, nil
}

// testServe serves impl in this process and returns a caller of it; both are
// closed when the test ends.
func testServe(tb testing.TB, name string) benchCallFunc {
	tb.Helper()
	impl, err := benchLookup(name)
	if err != nil {
		tb.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv, err := impl.serve(l)
	if err != nil {
		l.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := srv.Close(); err != nil {
			tb.Errorf("closing the %s server: %v", name, err)
		}
	})
	call, closer, err := impl.newCaller(l.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { closer.Close() })
	return call
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
						if err == nil && !bytes.Equal(got, payload) {
							err = errRunMismatch
						}
						if err != nil {
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
		if r.Rate <= 0 || r.P50 <= 0 || r.P99 < r.P50 || r.Errors != 0 {
			t.Errorf("row %+v", r)
		}
		if r.CPU <= 0 && runtime.GOOS == "linux" {
			t.Errorf("%s: CPU/call %v, want > 0", r.Impl, r.CPU)
		}
		if r.ServerAllocs <= 0 || r.ClientAllocs <= 0 {
			t.Errorf("%s: allocs %v+%v, want both sides counted", r.Impl, r.ClientAllocs, r.ServerAllocs)
		}
		if r.Impl == "grpc" && r.VsGRPC != 1 {
			t.Errorf("grpc vs grpc = %v", r.VsGRPC)
		}
	}
	md := rep.Markdown()
	if n := strings.Count(md, "\n| micro | 64 B |"); n != 2 {
		t.Errorf("table has %d micro rows, want 2:\n%s", n, md)
	}
	for _, p := range rep.ProfileFiles {
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
			Sample{Impl: "micro", Payload: 64, Callers: 1, Round: i + 1, Calls: int64(rate / 2), Elapsed: time.Second, ClientAllocs: rate})
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
