package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Config is a run of the matrix. Its zero value runs every implementation
// with the defaults below.
type Config struct {
	// Impls are the implementations to measure, in order (default: Impls()).
	Impls []string
	// Payloads are the payload sizes in bytes (default 64 and 4096).
	Payloads []int
	// Callers are the numbers of concurrent callers (default 1 and 32).
	Callers []int
	// Duration is how long each measurement runs (default 3s).
	Duration time.Duration
	// Warmup is how long each measurement calls before it starts counting
	// (default 1s; negative for none).
	Warmup time.Duration
	// Rounds is how many times each cell is measured (default 3). A round
	// measures every cell once, each cell with every implementation in turn,
	// and the report holds each cell's median over the rounds.
	Rounds int

	// ProfileImpl, if set, names an implementation to profile once more
	// after the rounds, at ProfilePayload bytes and ProfileCallers callers
	// (default 64 and 32). That run writes a CPU profile of the server
	// process and one of this (client) process into ProfileDir (default
	// "."), as IMPL-server.pprof and IMPL-client.pprof, and is not counted
	// in the medians.
	ProfileImpl    string
	ProfileDir     string
	ProfilePayload int
	ProfileCallers int

	// ServerCommand returns the command that runs an implementation's
	// server, which must behave as [Serve] does on its stdin and stdout
	// (default: this executable with -serve IMPL -addr 127.0.0.1:0, as
	// cmd/rpcbench takes). Run sets Stdin and Stdout, and Stderr if nil.
	ServerCommand func(impl string) (*exec.Cmd, error)

	// Progress, if set, gets a line per measurement.
	Progress io.Writer
}

func (c Config) withDefaults() Config {
	if len(c.Impls) == 0 {
		c.Impls = Impls()
	}
	if len(c.Payloads) == 0 {
		c.Payloads = []int{64, 4096}
	}
	if len(c.Callers) == 0 {
		c.Callers = []int{1, 32}
	}
	if c.Duration <= 0 {
		c.Duration = 3 * time.Second
	}
	if c.Warmup == 0 {
		c.Warmup = time.Second
	}
	if c.Rounds <= 0 {
		c.Rounds = 3
	}
	if c.ProfileDir == "" {
		c.ProfileDir = "."
	}
	if c.ProfilePayload <= 0 {
		c.ProfilePayload = 64
	}
	if c.ProfileCallers <= 0 {
		c.ProfileCallers = 32
	}
	if c.ServerCommand == nil {
		c.ServerCommand = func(impl string) (*exec.Cmd, error) {
			exe, err := os.Executable()
			if err != nil {
				return nil, err
			}
			return exec.Command(exe, "-serve", impl, "-addr", "127.0.0.1:0"), nil
		}
	}
	return c
}

// Sample is one measurement of one cell.
type Sample struct {
	Impl    string
	Payload int // bytes
	Callers int
	Round   int // from 1; 0 for the profiled run

	Calls   int64         // calls that returned the payload
	Errors  int64         // calls that failed or returned something else
	Elapsed time.Duration // from the first call to the end of the last
	P50     time.Duration
	P99     time.Duration

	ClientAllocs float64       // heap allocations per call in the driving process
	ServerAllocs float64       // heap allocations per call in the server process
	ClientBytes  float64       // bytes allocated per call in the driving process
	ServerBytes  float64       // bytes allocated per call in the server process
	ClientCPU    time.Duration // user+system CPU time per call of the driving process
	ServerCPU    time.Duration // user+system CPU time per call of the server process

	FirstError string // the first failure, if any
}

// Rate returns the calls per second.
func (s Sample) Rate() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Calls) / s.Elapsed.Seconds()
}

// Run measures every cell of cfg's matrix, each with a server process of its
// own, and returns the samples and their medians. It stops early, with the
// samples so far, when ctx ends.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg = cfg.withDefaults()
	for _, name := range cfg.Impls {
		if _, err := benchLookup(name); err != nil {
			return nil, err
		}
	}
	rep := &Report{Config: cfg}
	for round := 1; round <= cfg.Rounds; round++ {
		for _, payload := range cfg.Payloads {
			for _, callers := range cfg.Callers {
				// Rotate the order each round so no implementation always
				// runs first, or right after the same neighbour.
				n := len(cfg.Impls)
				for i := range n {
					name := cfg.Impls[(i+round-1)%n]
					s, err := runMeasure(ctx, cfg, name, payload, callers, round, "")
					if err != nil {
						rep.summarise()
						return rep, fmt.Errorf("bench: %s, %d B, %d callers: %w", name, payload, callers, err)
					}
					rep.Samples = append(rep.Samples, s)
					runProgress(cfg, s)
				}
			}
		}
	}
	if cfg.ProfileImpl != "" {
		if _, err := benchLookup(cfg.ProfileImpl); err != nil {
			return rep, err
		}
		s, err := runMeasure(ctx, cfg, cfg.ProfileImpl, cfg.ProfilePayload, cfg.ProfileCallers, 0, cfg.ProfileDir)
		if err != nil {
			rep.summarise()
			return rep, fmt.Errorf("bench: profiling %s: %w", cfg.ProfileImpl, err)
		}
		rep.Profiled = &s
		rep.ProfileFiles = runProfilePaths(cfg.ProfileDir, cfg.ProfileImpl)
		runProgress(cfg, s)
	}
	rep.summarise()
	return rep, nil
}

func runProgress(cfg Config, s Sample) {
	if cfg.Progress == nil {
		return
	}
	round := fmt.Sprintf("round %d", s.Round)
	if s.Round == 0 {
		round = "profiled"
	}
	fmt.Fprintf(cfg.Progress, "%-9s %-12s %6s x%-3d %10.0f req/s  p50 %-9s p99 %-9s cpu %s+%s  allocs %.1f+%.1f",
		round, s.Impl, reportSize(s.Payload), s.Callers, s.Rate(), reportLatency(s.P50), reportLatency(s.P99),
		reportLatency(s.ClientCPU), reportLatency(s.ServerCPU), s.ClientAllocs, s.ServerAllocs)
	if s.Errors > 0 {
		fmt.Fprintf(cfg.Progress, "  errors %d (%s)", s.Errors, s.FirstError)
	}
	fmt.Fprintln(cfg.Progress)
}

// runProfilePaths returns where a profiled run of impl writes its server
// and client profiles.
func runProfilePaths(dir, impl string) [2]string {
	return [2]string{filepath.Join(dir, impl+"-server.pprof"), filepath.Join(dir, impl+"-client.pprof")}
}

// runMeasure starts a server process for impl, warms up, and measures one
// cell. With profileDir set it writes CPU profiles of both sides there.
func runMeasure(ctx context.Context, cfg Config, name string, size, callers, round int, profileDir string) (Sample, error) {
	s := Sample{Impl: name, Payload: size, Callers: callers, Round: round}
	impl, err := benchLookup(name)
	if err != nil {
		return s, err
	}
	proc, err := runStartServer(cfg, name)
	if err != nil {
		return s, err
	}
	defer proc.stop()
	call, closer, err := impl.newCaller(proc.addr)
	if err != nil {
		return s, err
	}
	defer closer.Close()

	payload := runPayload(size)
	if cfg.Warmup > 0 {
		runDrive(ctx, call, payload, callers, cfg.Warmup, nil)
	}
	if err := ctx.Err(); err != nil {
		return s, err
	}
	hists := make([]latencyHistogram, callers)
	var stopProfile func() error
	if profileDir != "" {
		if stopProfile, err = runStartProfiles(proc, profileDir, name); err != nil {
			return s, err
		}
	}
	srv0, err := proc.stats()
	if err != nil {
		return s, err
	}
	var cli0, cli1 runtime.MemStats
	runtime.ReadMemStats(&cli0)
	cpu0 := cpuTime()
	d := runDrive(ctx, call, payload, callers, cfg.Duration, hists)
	cpu1 := cpuTime()
	runtime.ReadMemStats(&cli1)
	srv1, err := proc.stats()
	if err != nil {
		return s, err
	}
	if stopProfile != nil {
		if err := stopProfile(); err != nil {
			return s, err
		}
	}

	s.Calls, s.Errors, s.Elapsed = d.calls, d.errors, d.elapsed
	if d.firstErr != nil {
		s.FirstError = d.firstErr.Error()
	}
	var all latencyHistogram
	for i := range hists {
		all.merge(&hists[i])
	}
	s.P50, s.P99 = all.quantile(0.50), all.quantile(0.99)
	if n := float64(d.calls + d.errors); n > 0 {
		s.ClientAllocs = float64(cli1.Mallocs-cli0.Mallocs) / n
		s.ClientBytes = float64(cli1.TotalAlloc-cli0.TotalAlloc) / n
		s.ServerAllocs = float64(srv1.mallocs-srv0.mallocs) / n
		s.ServerBytes = float64(srv1.bytes-srv0.bytes) / n
		s.ClientCPU = time.Duration(float64(cpu1-cpu0) / n)
		s.ServerCPU = time.Duration(float64(srv1.cpu-srv0.cpu) / n)
	}
	if s.Calls == 0 {
		return s, fmt.Errorf("no call succeeded: %s", s.FirstError)
	}
	return s, ctx.Err()
}

// runStartProfiles starts CPU profiles of the server and of this process,
// and returns the func that stops both.
func runStartProfiles(proc *runServer, dir, impl string) (func() error, error) {
	paths := runProfilePaths(dir, impl)
	abs, err := filepath.Abs(paths[0])
	if err != nil {
		return nil, err
	}
	if err := proc.command("cpuprofile-start " + abs); err != nil {
		return nil, err
	}
	f, err := os.Create(paths[1])
	if err != nil {
		proc.command("cpuprofile-stop")
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		proc.command("cpuprofile-stop")
		return nil, err
	}
	return func() error {
		pprof.StopCPUProfile()
		return errors.Join(f.Close(), proc.command("cpuprofile-stop"))
	}, nil
}

// runPayload returns size bytes of a fixed pattern (not zeros, which some
// codecs or transports could shortcut).
func runPayload(size int) []byte {
	p := make([]byte, size)
	for i := range p {
		p[i] = byte(i*131 + i>>8 + 7)
	}
	return p
}

type runDriveResult struct {
	calls, errors int64
	elapsed       time.Duration
	firstErr      error
}

// runWorker is one caller's tally, kept in its goroutine until it ends so
// callers do not share cache lines while counting.
type runWorker struct {
	calls, errors int64
	firstErr      error
}

var errRunMismatch = errors.New("bench: echo differs from the payload")

// runDrive makes calls from callers goroutines for d, recording latencies in
// hists (one per caller) when hists is not nil.
func runDrive(ctx context.Context, call benchCallFunc, payload []byte, callers int, d time.Duration, hists []latencyHistogram) runDriveResult {
	var stop atomic.Bool
	workers := make([]runWorker, callers)
	var wg sync.WaitGroup
	start := time.Now()
	timer := time.AfterFunc(d, func() { stop.Store(true) })
	defer timer.Stop()
	for i := range callers {
		var h *latencyHistogram
		if hists != nil {
			h = &hists[i]
		}
		wg.Add(1)
		go func(w *runWorker) {
			defer wg.Done()
			var calls, errs int64
			var firstErr error
			for !stop.Load() && ctx.Err() == nil {
				t0 := time.Now()
				rsp, err := call(ctx, payload)
				lat := time.Since(t0)
				if err == nil && !bytes.Equal(rsp, payload) {
					err = errRunMismatch
				}
				if err != nil {
					errs++
					if firstErr == nil {
						firstErr = err
					}
					continue
				}
				calls++
				if h != nil {
					h.record(lat)
				}
			}
			*w = runWorker{calls: calls, errors: errs, firstErr: firstErr}
		}(&workers[i])
	}
	wg.Wait()
	r := runDriveResult{elapsed: time.Since(start)}
	for _, w := range workers {
		r.calls += w.calls
		r.errors += w.errors
		if r.firstErr == nil {
			r.firstErr = w.firstErr
		}
	}
	return r
}

// runServer is a server process and the pipes of its control protocol.
type runServer struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	addr  string
	waitC chan error
}

type runServerStats struct {
	mallocs, bytes, gcs uint64
	cpu                 time.Duration
}

func runStartServer(cfg Config, name string) (*runServer, error) {
	cmd, err := cfg.ServerCommand(name)
	if err != nil {
		return nil, err
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &runServer{cmd: cmd, in: in, out: bufio.NewReader(out), waitC: make(chan error, 1)}
	line, err := p.out.ReadString('\n')
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("server %s did not start: %w", name, err)
	}
	p.addr = strings.TrimSpace(line)
	return p, nil
}

// request sends one control line and returns the reply.
func (p *runServer) request(line string) (string, error) {
	if _, err := io.WriteString(p.in, line+"\n"); err != nil {
		return "", err
	}
	reply, err := p.out.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("server: %q: %w", line, err)
	}
	reply = strings.TrimSpace(reply)
	if msg, ok := strings.CutPrefix(reply, "error "); ok {
		return "", fmt.Errorf("server: %q: %s", line, msg)
	}
	return reply, nil
}

// command sends a control line whose reply is "ok".
func (p *runServer) command(line string) error {
	reply, err := p.request(line)
	if err == nil && reply != "ok" {
		err = fmt.Errorf("server: %q: unexpected reply %q", line, reply)
	}
	return err
}

func (p *runServer) stats() (runServerStats, error) {
	var st runServerStats
	reply, err := p.request("stats")
	if err != nil {
		return st, err
	}
	var cpu int64
	if _, err := fmt.Sscanf(reply, "stats mallocs=%d bytes=%d gcs=%d cpu=%d", &st.mallocs, &st.bytes, &st.gcs, &cpu); err != nil {
		return st, fmt.Errorf("server: bad stats reply %q: %w", reply, err)
	}
	st.cpu = time.Duration(cpu)
	return st, nil
}

// stop closes the server's stdin, which ends it, and waits for it to exit;
// one that has not exited in 10s is killed.
func (p *runServer) stop() error {
	p.in.Close()
	go func() { p.waitC <- p.cmd.Wait() }()
	select {
	case err := <-p.waitC:
		return err
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		return <-p.waitC
	}
}
