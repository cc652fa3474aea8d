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
	c.Duration, c.Warmup, c.Rounds, c.ProfileDir = runDefaults(c.Duration, c.Warmup, c.Rounds, c.ProfileDir)
	if c.ProfilePayload <= 0 {
		c.ProfilePayload = 64
	}
	if c.ProfileCallers <= 0 {
		c.ProfileCallers = 32
	}
	if c.ServerCommand == nil {
		c.ServerCommand = runServerCommand()
	}
	return c
}

// runDefaults fills in the defaults [Config] and [StreamConfig] share: a
// duration of 3s, a warmup of 1s, 3 rounds, profiles written to ".".
func runDefaults(duration, warmup time.Duration, rounds int, profileDir string) (time.Duration, time.Duration, int, string) {
	if duration <= 0 {
		duration = 3 * time.Second
	}
	if warmup == 0 {
		warmup = time.Second
	}
	if rounds <= 0 {
		rounds = 3
	}
	if profileDir == "" {
		profileDir = "."
	}
	return duration, warmup, rounds, profileDir
}

// runServerCommand returns the default ServerCommand: this executable with
// args, then -serve IMPL -addr 127.0.0.1:0.
func runServerCommand(args ...string) func(impl string) (*exec.Cmd, error) {
	return func(impl string) (*exec.Cmd, error) {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		return exec.Command(exe, append(args, "-serve", impl, "-addr", "127.0.0.1:0")...), nil
	}
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

	Costs // per call, failed ones included

	FirstError string // the first failure, if any
}

// Costs are what one operation (a call, or a streamed message) cost the
// driving process and the server process, on average over a measurement.
type Costs struct {
	ClientAllocs float64       // heap allocations in the driving process
	ServerAllocs float64       // heap allocations in the server process
	ClientBytes  float64       // bytes allocated in the driving process
	ServerBytes  float64       // bytes allocated in the server process
	ClientCPU    time.Duration // user+system CPU time of the driving process
	ServerCPU    time.Duration // user+system CPU time of the server process
}

// Rate returns the calls per second.
func (s Sample) Rate() float64 { return runRate(s.Calls, s.Elapsed) }

func runRate(n int64, elapsed time.Duration) float64 {
	if elapsed <= 0 {
		return 0
	}
	return float64(n) / elapsed.Seconds()
}

// runView is what the progress lines and the report take from a sample,
// unary or streaming.
type runView struct {
	impl       string
	round      int
	head       string  // the implementation and the cell, in a progress line
	rate       float64 // operations per second
	unit       string  // the rate's: "req/s"
	p50, p99   time.Duration
	costs      Costs
	errors     int64
	firstError string
}

func (s Sample) view() runView {
	return runView{
		impl: s.Impl, round: s.Round, head: fmt.Sprintf("%-12s %6s x%-3d", s.Impl, reportSize(s.Payload), s.Callers),
		rate: s.Rate(), unit: "req/s", p50: s.P50, p99: s.P99, costs: s.Costs, errors: s.Errors, firstError: s.FirstError,
	}
}

// runCell is a cell of the unary matrix, but for the implementation.
type runCell struct{ payload, callers int }

func (s Sample) cell() runCell { return runCell{s.Payload, s.Callers} }

// cells returns the cells of c's matrix in the order they are run and
// reported.
func (c Config) cells() []runCell {
	var cells []runCell
	for _, payload := range c.Payloads {
		for _, callers := range c.Callers {
			cells = append(cells, runCell{payload, callers})
		}
	}
	return cells
}

// Run measures every cell of cfg's matrix, each with a server process of its
// own, and returns the samples and their medians. It stops early, with the
// samples so far, when ctx ends.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg = cfg.withDefaults()
	plan := runPlan[runCell, Sample]{
		impls:  cfg.Impls,
		rounds: cfg.Rounds,
		cells:  cfg.cells(),
		known:  benchImpls.known,
		measure: func(name string, c runCell, round int, profile *[2]string) (Sample, error) {
			return runMeasure(ctx, cfg, name, c, round, profile)
		},
		describe:     func(c runCell) string { return fmt.Sprintf("%d B, %d callers", c.payload, c.callers) },
		progress:     cfg.Progress,
		profileImpl:  cfg.ProfileImpl,
		profileCell:  runCell{cfg.ProfilePayload, cfg.ProfileCallers},
		profileFiles: runProfilePaths(cfg.ProfileDir, cfg.ProfileImpl),
	}
	if err := plan.check(); err != nil {
		return nil, err
	}
	rep := &Report{Config: cfg}
	var err error
	rep.Samples, rep.Profiled, rep.ProfileFiles, err = plan.run()
	rep.summarise()
	return rep, err
}

// runPlan is a matrix to measure: cells of type C (everything but the
// implementation), each measured into a sample of type S. [Run] and
// [RunStream] each make one.
type runPlan[C any, S interface{ view() runView }] struct {
	impls  []string
	rounds int
	cells  []C
	known  func(impl string) error // an error for an unknown impl
	// measure measures cell with impl in a server process of its own, in
	// round (0 for the profiled run); with profile set, it writes CPU
	// profiles of the server and of this process to profile[0] and [1].
	measure  func(impl string, cell C, round int, profile *[2]string) (S, error)
	describe func(C) string // the cell, in errors
	progress io.Writer      // if set, gets a line per sample

	// profileImpl, if set, is measured once more after the rounds, at
	// profileCell, into profileFiles.
	profileImpl  string
	profileCell  C
	profileFiles [2]string
}

// check reports an unknown implementation.
func (p runPlan[C, S]) check() error {
	for _, name := range p.impls {
		if err := p.known(name); err != nil {
			return err
		}
	}
	return nil
}

// run measures every cell with every implementation once a round, then the
// profiled run if there is one, and returns the samples, and the profiled
// one and its profiles. It stops at the first error, with the samples so
// far.
func (p runPlan[C, S]) run() (samples []S, profiled *S, profileFiles [2]string, err error) {
	for round := 1; round <= p.rounds; round++ {
		for _, cell := range p.cells {
			// Rotate the order each round so no implementation always runs
			// first, or right after the same neighbour.
			n := len(p.impls)
			for i := range n {
				name := p.impls[(i+round-1)%n]
				s, err := p.measure(name, cell, round, nil)
				if err != nil {
					return samples, nil, profileFiles, fmt.Errorf("bench: %s, %s: %w", name, p.describe(cell), err)
				}
				samples = append(samples, s)
				runProgress(p.progress, s.view())
			}
		}
	}
	if p.profileImpl == "" {
		return samples, nil, profileFiles, nil
	}
	if err := p.known(p.profileImpl); err != nil {
		return samples, nil, profileFiles, err
	}
	s, err := p.measure(p.profileImpl, p.profileCell, 0, &p.profileFiles)
	if err != nil {
		return samples, nil, profileFiles, fmt.Errorf("bench: profiling %s: %w", p.profileImpl, err)
	}
	runProgress(p.progress, s.view())
	return samples, &s, p.profileFiles, nil
}

// runProgress writes a sample's line to w, if w is set.
func runProgress(w io.Writer, v runView) {
	if w == nil {
		return
	}
	round := fmt.Sprintf("round %d", v.round)
	if v.round == 0 {
		round = "profiled"
	}
	fmt.Fprintf(w, "%-9s %s %10.0f %s  p50 %-9s p99 %-9s cpu %s+%s  allocs %.1f+%.1f",
		round, v.head, v.rate, v.unit, reportLatency(v.p50), reportLatency(v.p99),
		reportLatency(v.costs.ClientCPU), reportLatency(v.costs.ServerCPU), v.costs.ClientAllocs, v.costs.ServerAllocs)
	if v.errors > 0 {
		fmt.Fprintf(w, "  errors %d (%s)", v.errors, v.firstError)
	}
	fmt.Fprintln(w)
}

// runProfilePaths returns where a profiled run writes its server and client
// profiles: name-server.pprof and name-client.pprof in dir.
func runProfilePaths(dir, name string) [2]string {
	return [2]string{filepath.Join(dir, name+"-server.pprof"), filepath.Join(dir, name+"-client.pprof")}
}

// runMeasure starts a server process for impl, warms up, and measures one
// cell. With profile set it writes CPU profiles of the server and this
// process there.
func runMeasure(ctx context.Context, cfg Config, name string, c runCell, round int, profile *[2]string) (Sample, error) {
	s := Sample{Impl: name, Payload: c.payload, Callers: c.callers, Round: round}
	proc, call, stop, err := runConnect(cfg.ServerCommand, benchImpls, name, benchImpl.newCaller)
	if err != nil {
		return s, err
	}
	defer stop()

	payload := runPayload(c.payload)
	if cfg.Warmup > 0 {
		runDrive(ctx, call, payload, c.callers, cfg.Warmup, nil)
	}
	if err := ctx.Err(); err != nil {
		return s, err
	}
	hists := make([]latencyHistogram, c.callers)
	d, usage, err := runMeasured(proc, profile, func() runDriveResult {
		return runDrive(ctx, call, payload, c.callers, cfg.Duration, hists)
	})
	if err != nil {
		return s, err
	}
	s.Calls, s.Errors, s.Elapsed, s.FirstError = d.echoes, d.errors, d.elapsed, d.firstError()
	s.P50, s.P99 = runQuantiles(hists)
	s.Costs = usage.per(d.echoes + d.errors)
	if s.Calls == 0 {
		return s, fmt.Errorf("no call succeeded: %s", s.FirstError)
	}
	return s, ctx.Err()
}

// runConnect starts the server process command(name) makes for the
// implementation name in reg, and a client of it made by newClient (a
// caller, or a stream opener); stop closes the client, then stops the
// server.
func runConnect[I, C any](command func(impl string) (*exec.Cmd, error), reg *registry[I], name string, newClient func(impl I, addr string) (C, io.Closer, error)) (proc *runServer, client C, stop func(), err error) {
	impl, err := reg.lookup(name)
	if err != nil {
		return nil, client, nil, err
	}
	if proc, err = runStartServer(command, name); err != nil {
		return nil, client, nil, err
	}
	client, closer, err := newClient(impl, proc.addr)
	if err != nil {
		proc.stop()
		return nil, client, nil, err
	}
	return proc, client, func() {
		closer.Close()
		proc.stop()
	}, nil
}

// runUsage is what the driving process and the server process spent while
// a drive ran.
type runUsage struct {
	clientMallocs, clientBytes uint64
	clientCPU                  time.Duration
	server                     runServerStats
}

// per returns u spread over n operations, or nothing if there were none.
func (u runUsage) per(n int64) Costs {
	if n <= 0 {
		return Costs{}
	}
	f := float64(n)
	return Costs{
		ClientAllocs: float64(u.clientMallocs) / f,
		ServerAllocs: float64(u.server.mallocs) / f,
		ClientBytes:  float64(u.clientBytes) / f,
		ServerBytes:  float64(u.server.bytes) / f,
		ClientCPU:    time.Duration(float64(u.clientCPU) / f),
		ServerCPU:    time.Duration(float64(u.server.cpu) / f),
	}
}

// runMeasured runs drive between two readings of the allocation and CPU
// counters of both processes, and returns what it counted and what they
// spent meanwhile. With profile set, CPU profiles of the server (into
// profile[0]) and of this process (into profile[1]) cover the same span.
func runMeasured(proc *runServer, profile *[2]string, drive func() runDriveResult) (d runDriveResult, u runUsage, err error) {
	if profile != nil {
		stopProfile, err := runStartProfiles(proc, *profile)
		if err != nil {
			return d, u, err
		}
		defer func() {
			if perr := stopProfile(); err == nil {
				err = perr
			}
		}()
	}
	srv0, err := proc.stats()
	if err != nil {
		return d, u, err
	}
	var cli0, cli1 runtime.MemStats
	runtime.ReadMemStats(&cli0)
	cpu0 := cpuTime()
	d = drive()
	cpu1 := cpuTime()
	runtime.ReadMemStats(&cli1)
	srv1, err := proc.stats()
	if err != nil {
		return d, u, err
	}
	u = runUsage{
		clientMallocs: cli1.Mallocs - cli0.Mallocs,
		clientBytes:   cli1.TotalAlloc - cli0.TotalAlloc,
		clientCPU:     cpu1 - cpu0,
		server: runServerStats{
			mallocs: srv1.mallocs - srv0.mallocs,
			bytes:   srv1.bytes - srv0.bytes,
			gcs:     srv1.gcs - srv0.gcs,
			cpu:     srv1.cpu - srv0.cpu,
		},
	}
	return d, u, nil
}

// runStartProfiles starts CPU profiles of the server (into paths[0]) and of
// this process (into paths[1]), and returns the func that stops both.
func runStartProfiles(proc *runServer, paths [2]string) (func() error, error) {
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

var errRunMismatch = errors.New("bench: echo differs from the payload")

// runCheckEcho returns the error of an echo of payload that returned rsp and
// err: err, or errRunMismatch if rsp differs from payload.
func runCheckEcho(payload, rsp []byte, err error) error {
	if err == nil && !bytes.Equal(rsp, payload) {
		return errRunMismatch
	}
	return err
}

// runTally is what one worker (a caller, or a stream) counted, kept in its
// goroutine until it ends so workers do not share cache lines while
// counting.
type runTally struct {
	echoes   int64 // calls or messages that came back as sent
	errors   int64 // failed calls, or failed streams
	firstErr error
}

func (t *runTally) fail(err error) {
	if err == nil {
		return
	}
	t.errors++
	if t.firstErr == nil {
		t.firstErr = err
	}
}

// runDriveResult is the workers' tallies added up, and the time from their
// start until the last one ended.
type runDriveResult struct {
	runTally
	elapsed time.Duration
}

func (r runDriveResult) firstError() string {
	if r.firstErr == nil {
		return ""
	}
	return r.firstErr.Error()
}

// runWorkers runs n workers at once, each in a goroutine, and sets the stop
// flag they watch once d has passed. Worker i records its latencies, if it
// has any, in hists[i] (h is nil when hists is).
func runWorkers(n int, d time.Duration, hists []latencyHistogram, work func(i int, stop *atomic.Bool, h *latencyHistogram) runTally) runDriveResult {
	var stop atomic.Bool
	tallies := make([]runTally, n)
	var wg sync.WaitGroup
	start := time.Now()
	timer := time.AfterFunc(d, func() { stop.Store(true) })
	defer timer.Stop()
	for i := range n {
		var h *latencyHistogram
		if hists != nil {
			h = &hists[i]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			tallies[i] = work(i, &stop, h)
		}()
	}
	wg.Wait()
	r := runDriveResult{elapsed: time.Since(start)}
	for _, t := range tallies {
		r.echoes += t.echoes
		r.errors += t.errors
		if r.firstErr == nil {
			r.firstErr = t.firstErr
		}
	}
	return r
}

// runQuantiles returns the p50 and p99 of hists merged, or zeros if they
// are empty.
func runQuantiles(hists []latencyHistogram) (p50, p99 time.Duration) {
	var all latencyHistogram
	for i := range hists {
		all.merge(&hists[i])
	}
	return all.quantile(0.50), all.quantile(0.99)
}

// runDrive makes calls from callers goroutines for d, recording latencies in
// hists (one per caller) when hists is not nil.
func runDrive(ctx context.Context, call benchCallFunc, payload []byte, callers int, d time.Duration, hists []latencyHistogram) runDriveResult {
	return runWorkers(callers, d, hists, func(_ int, stop *atomic.Bool, h *latencyHistogram) runTally {
		var t runTally
		for !stop.Load() && ctx.Err() == nil {
			t0 := time.Now()
			rsp, err := call(ctx, payload)
			lat := time.Since(t0)
			if err = runCheckEcho(payload, rsp, err); err != nil {
				t.fail(err)
				continue
			}
			t.echoes++
			if h != nil {
				h.record(lat)
			}
		}
		return t
	})
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

// runStartServer starts the server process command(name) makes and reads
// its address.
func runStartServer(command func(impl string) (*exec.Cmd, error), name string) (*runServer, error) {
	cmd, err := command(name)
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
