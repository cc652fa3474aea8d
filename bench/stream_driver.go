package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"sync/atomic"
	"time"
)

// The streaming workloads.
const (
	// PingPong sends one message on a stream and waits for its echo before
	// sending the next; the time from send to echo is the round trip.
	PingPong = "pingpong"
	// Pipelined sends messages on a stream from one goroutine as fast as
	// flow control lets it, while another goroutine receives the echoes.
	Pipelined = "pipelined"
)

// StreamConfig is a run of the streaming matrix. Its zero value runs every
// streaming implementation with the defaults below.
type StreamConfig struct {
	// Impls are the implementations to measure, in order (default:
	// StreamImpls()).
	Impls []string
	// Workloads are PingPong and Pipelined, in the order given (default
	// both).
	Workloads []string
	// Payloads are the message sizes in bytes (default 64 and 4096).
	Payloads []int
	// Streams are the numbers of concurrent streams, all opened through one
	// client (default 1 and 32).
	Streams []int
	// Duration is how long each measurement sends (default 3s).
	Duration time.Duration
	// Warmup is how long each measurement runs, on streams of its own,
	// before it starts counting (default 1s; negative for none).
	Warmup time.Duration
	// Rounds is how many times each cell is measured (default 3); the
	// report holds each cell's median over the rounds.
	Rounds int

	// ProfileImpl, if set, names an implementation to profile once more
	// after the rounds, with ProfileWorkload, ProfilePayload bytes and
	// ProfileStreams streams (default Pipelined, 64 and 1). That run writes
	// CPU profiles of the server process and of this (client) process into
	// ProfileDir (default "."), as IMPL-stream-server.pprof and
	// IMPL-stream-client.pprof, and is not counted in the medians.
	ProfileImpl     string
	ProfileDir      string
	ProfileWorkload string
	ProfilePayload  int
	ProfileStreams  int

	// ServerCommand returns the command that runs an implementation's
	// server, which must behave as [ServeStream] does on its stdin and
	// stdout (default: this executable with -mode stream -serve IMPL -addr
	// 127.0.0.1:0, as cmd/rpcbench takes). Run sets Stdin and Stdout, and
	// Stderr if nil.
	ServerCommand func(impl string) (*exec.Cmd, error)

	// Progress, if set, gets a line per measurement.
	Progress io.Writer
}

func (c StreamConfig) withDefaults() StreamConfig {
	if len(c.Impls) == 0 {
		c.Impls = StreamImpls()
	}
	if len(c.Workloads) == 0 {
		c.Workloads = []string{PingPong, Pipelined}
	}
	if len(c.Payloads) == 0 {
		c.Payloads = []int{64, 4096}
	}
	if len(c.Streams) == 0 {
		c.Streams = []int{1, 32}
	}
	c.Duration, c.Warmup, c.Rounds, c.ProfileDir = runDefaults(c.Duration, c.Warmup, c.Rounds, c.ProfileDir)
	if c.ProfileWorkload == "" {
		c.ProfileWorkload = Pipelined
	}
	if c.ProfilePayload <= 0 {
		c.ProfilePayload = 64
	}
	if c.ProfileStreams <= 0 {
		c.ProfileStreams = 1
	}
	if c.ServerCommand == nil {
		c.ServerCommand = runServerCommand("-mode", "stream")
	}
	return c
}

// StreamSample is one measurement of one cell of the streaming matrix.
type StreamSample struct {
	Impl     string
	Workload string // PingPong or Pipelined
	Payload  int    // bytes
	Streams  int
	Round    int // from 1; 0 for the profiled run

	Messages int64         // messages echoed back intact
	Errors   int64         // streams that failed or echoed something else
	Elapsed  time.Duration // from the first send to the end of the last stream
	P50      time.Duration // round trip; PingPong only
	P99      time.Duration

	Costs // per echoed message

	FirstError string // the first failure, if any
}

// Rate returns the messages echoed per second.
func (s StreamSample) Rate() float64 { return runRate(s.Messages, s.Elapsed) }

func (s StreamSample) view() runView {
	return runView{
		impl: s.Impl, round: s.Round, head: fmt.Sprintf("%-8s %-9s %6s x%-3d", s.Impl, s.Workload, reportSize(s.Payload), s.Streams),
		rate: s.Rate(), unit: "msg/s", p50: s.P50, p99: s.P99, costs: s.Costs, errors: s.Errors, firstError: s.FirstError,
	}
}

// streamCell is a cell of the streaming matrix, but for the implementation.
type streamCell struct {
	workload         string
	payload, streams int
}

func (s StreamSample) cell() streamCell { return streamCell{s.Workload, s.Payload, s.Streams} }

// cells returns the cells of c's matrix in the order they are run and
// reported.
func (c StreamConfig) cells() []streamCell {
	var cells []streamCell
	for _, workload := range c.Workloads {
		for _, payload := range c.Payloads {
			for _, streams := range c.Streams {
				cells = append(cells, streamCell{workload, payload, streams})
			}
		}
	}
	return cells
}

// RunStream measures every cell of cfg's streaming matrix, each with a
// server process of its own, and returns the samples and their medians. It
// stops early, with the samples so far, when ctx ends.
func RunStream(ctx context.Context, cfg StreamConfig) (*StreamReport, error) {
	cfg = cfg.withDefaults()
	plan := runPlan[streamCell, StreamSample]{
		impls:  cfg.Impls,
		rounds: cfg.Rounds,
		cells:  cfg.cells(),
		known:  streamImpls.known,
		measure: func(name string, c streamCell, round int, profile *[2]string) (StreamSample, error) {
			return streamMeasure(ctx, cfg, name, c, round, profile)
		},
		describe: func(c streamCell) string {
			return fmt.Sprintf("%s, %d B, %d streams", c.workload, c.payload, c.streams)
		},
		progress:     cfg.Progress,
		profileImpl:  cfg.ProfileImpl,
		profileCell:  streamCell{cfg.ProfileWorkload, cfg.ProfilePayload, cfg.ProfileStreams},
		profileFiles: runProfilePaths(cfg.ProfileDir, cfg.ProfileImpl+"-stream"),
	}
	if err := plan.check(); err != nil {
		return nil, err
	}
	for _, w := range slices.Concat(cfg.Workloads, []string{cfg.ProfileWorkload}) {
		if w != PingPong && w != Pipelined {
			return nil, fmt.Errorf("bench: unknown workload %q; want %s or %s", w, PingPong, Pipelined)
		}
	}
	rep := &StreamReport{Config: cfg}
	var err error
	rep.Samples, rep.Profiled, rep.ProfileFiles, err = plan.run()
	rep.summarise()
	return rep, err
}

// streamMeasure starts a server process for impl, warms up, and measures one
// cell. With profile set it writes CPU profiles of the server and this
// process there.
func streamMeasure(ctx context.Context, cfg StreamConfig, name string, c streamCell, round int, profile *[2]string) (StreamSample, error) {
	s := StreamSample{Impl: name, Workload: c.workload, Payload: c.payload, Streams: c.streams, Round: round}
	proc, open, stop, err := runConnect(cfg.ServerCommand, streamImpls, name, streamImpl.newOpener)
	if err != nil {
		return s, err
	}
	defer stop()

	payload := runPayload(c.payload)
	if cfg.Warmup > 0 {
		sts, err := streamOpenAll(ctx, open, c.streams, payload)
		if err != nil {
			return s, err
		}
		streamDrive(ctx, sts, c.workload, payload, cfg.Warmup, nil)
	}
	if err := ctx.Err(); err != nil {
		return s, err
	}
	// The measured streams are open, each with one echo behind it, before
	// the counting starts; ending them is counted.
	sts, err := streamOpenAll(ctx, open, c.streams, payload)
	if err != nil {
		return s, err
	}
	defer streamCloseAll(sts) // streamDrive closes them, if it gets to run
	var hists []latencyHistogram
	if c.workload == PingPong {
		hists = make([]latencyHistogram, c.streams)
	}
	d, usage, err := runMeasured(proc, profile, func() runDriveResult {
		return streamDrive(ctx, sts, c.workload, payload, cfg.Duration, hists)
	})
	if err != nil {
		return s, err
	}
	s.Messages, s.Errors, s.Elapsed, s.FirstError = d.echoes, d.errors, d.elapsed, d.firstError()
	s.P50, s.P99 = runQuantiles(hists)
	s.Costs = usage.per(d.echoes)
	if s.Messages == 0 {
		return s, fmt.Errorf("no message came back: %s", s.FirstError)
	}
	return s, ctx.Err()
}

// streamOpenAll opens n streams and echoes one payload on each, so that
// every stream is open at both ends (connect-go sends its request with the
// first message). On failure it closes what it opened.
func streamOpenAll(ctx context.Context, open streamOpenFunc, n int, payload []byte) ([]streamEcho, error) {
	sts := make([]streamEcho, 0, n)
	for range n {
		st, err := open(ctx)
		if err != nil {
			streamCloseAll(sts)
			return nil, fmt.Errorf("opening a stream: %w", err)
		}
		sts = append(sts, st)
		err = st.send(payload)
		var rsp []byte
		if err == nil {
			rsp, err = st.recv()
		}
		if err = runCheckEcho(payload, rsp, err); err != nil {
			streamCloseAll(sts)
			return nil, fmt.Errorf("the first echo on a new stream: %w", err)
		}
	}
	return sts, nil
}

func streamCloseAll(sts []streamEcho) {
	for _, st := range sts {
		st.close()
	}
}

// streamDrive runs workload on every stream at once for d, then ends each
// stream (CloseSend, and the server's clean end) and closes it. With hists
// set (one per stream), PingPong records its round trips there.
func streamDrive(ctx context.Context, sts []streamEcho, workload string, payload []byte, d time.Duration, hists []latencyHistogram) runDriveResult {
	return runWorkers(len(sts), d, hists, func(i int, stop *atomic.Bool, h *latencyHistogram) runTally {
		defer sts[i].close()
		if workload == PingPong {
			return streamPingPong(ctx, sts[i], payload, stop, h)
		}
		return streamPipelined(ctx, sts[i], payload, stop)
	})
}

// streamPingPong sends a message and waits for its echo, again and again,
// until stop is set; then it ends the stream. A failure ends it early.
func streamPingPong(ctx context.Context, st streamEcho, payload []byte, stop *atomic.Bool, h *latencyHistogram) runTally {
	var t runTally
	for !stop.Load() && ctx.Err() == nil {
		t0 := time.Now()
		err := st.send(payload)
		var rsp []byte
		if err == nil {
			rsp, err = st.recv()
		}
		lat := time.Since(t0)
		if err = runCheckEcho(payload, rsp, err); err != nil {
			t.fail(err)
			return t
		}
		t.echoes++
		if h != nil {
			h.record(lat)
		}
	}
	if err := st.closeSend(); err != nil {
		t.fail(err)
		return t
	}
	if _, err := st.recv(); err != io.EOF {
		t.fail(fmt.Errorf("bench: after CloseSend, recv = %v, want io.EOF", err))
	}
	return t
}

// streamPipelined sends from one goroutine until stop is set, then closes
// its side, while this one receives the echoes until the server ends the
// stream.
func streamPipelined(ctx context.Context, st streamEcho, payload []byte, stop *atomic.Bool) runTally {
	var sent int64
	sendErr := make(chan error, 1)
	go func() {
		var err error
		for !stop.Load() && ctx.Err() == nil {
			if err = st.send(payload); err != nil {
				break
			}
			sent++
		}
		if err == nil {
			err = st.closeSend()
		}
		sendErr <- err
	}()
	var t runTally
	for {
		rsp, err := st.recv()
		if err == io.EOF {
			break
		}
		if err = runCheckEcho(payload, rsp, err); err != nil {
			t.fail(err)
			break
		}
		t.echoes++
	}
	// A clean end means the sender has closed its side already; otherwise
	// closing the stream unblocks a sender held by flow control.
	st.close()
	if err := <-sendErr; err != nil && !errors.Is(err, io.EOF) && t.errors == 0 {
		t.fail(err)
	}
	if t.errors == 0 && t.echoes != sent {
		t.fail(fmt.Errorf("bench: %d messages sent, %d echoed", sent, t.echoes))
	}
	return t
}
