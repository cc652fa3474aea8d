// Package brokerbench measures micro's brokers (memory and HTTP) against NATS
// core (an embedded nats-server), in one process, on loopback: messages a
// second and latency for one publisher to one subscriber and to a queue
// group of three, with one or more publishes in flight.
//
// An acknowledged publish (micro's brokers, and "nats-req", NATS
// request/reply where the subscriber answers) counts when Publish returns;
// its latency is Publish's duration. NATS core's own publish ("nats") is
// fire and forget: it counts a message when a subscriber receives it, and
// its latency runs from the publish to the receipt, with the publisher
// publishing as fast as it can (so at saturation the latency includes the
// queues). The command is ../cmd/brokerbench.
package brokerbench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/micro-kit/micro"
	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// The shapes of a run.
const (
	OneToOne = "1:1"    // one publisher, one subscriber
	Queue3   = "queue3" // one publisher, a queue group of three
)

// Config is what Run measures. Zero fields take the defaults.
type Config struct {
	Impls    []string      // default: all (see Impls)
	Shapes   []string      // default: 1:1 and queue3
	Payloads []int         // default: 64 and 4096 bytes
	InFlight []int         // publishes in flight; default 1 and 32 (fire-and-forget impls run at 1 only)
	Duration time.Duration // per measurement; default 2s
	Warmup   time.Duration // before each measurement; default 500ms, negative for none
	Rounds   int           // each cell measured once a round, the median reported; default 3
	Progress io.Writer     // a line per measurement, if not nil
}

// Impls lists the implementations, in report order.
func Impls() []string { return []string{"memory", "http", "nats", "nats-req"} }

// About describes an implementation.
func About(name string) string {
	switch name {
	case "memory":
		return "micro.MemoryBroker: handlers run in the publisher's goroutine; Publish returns acknowledged"
	case "http":
		return "micro's HTTP broker: services on loopback sharing a MemoryRegistry; Publish returns acknowledged"
	case "nats":
		return "NATS core publish (fire and forget) through an embedded nats-server; counted at the subscriber"
	case "nats-req":
		return "NATS core request/reply through an embedded nats-server: the subscriber answers, so it is acknowledged"
	}
	return ""
}

// Result is one cell: the median over the rounds of each figure.
type Result struct {
	Impl     string
	Shape    string
	Payload  int
	InFlight int
	Rate     float64 // messages a second
	P50, P99 time.Duration
	Errors   int64 // failed publishes, over all rounds
	Lost     int64 // fire and forget: published but not received within the run, over all rounds
	Rounds   int
}

// session is one implementation set up for one shape.
type session struct {
	publish  func(ctx context.Context, body []byte) error // acknowledged; nil for fire and forget
	fire     func(body []byte) error                      // fire and forget
	flush    func() error
	received *atomic.Int64 // messages handled by subscribers
	lat      *latencies    // fire and forget: one-way latencies, recorded by subscribers
	close    func()
}

// latencies keeps every 8th latency of a run.
type latencies struct {
	mu  sync.Mutex
	n   int
	all []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	if l.n++; l.n%8 == 0 {
		l.all = append(l.all, d)
	}
	l.mu.Unlock()
}

func (l *latencies) take() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.all
	l.all, l.n = nil, 0
	return out
}

func open(name, shape string) (*session, error) {
	if shape != OneToOne && shape != Queue3 {
		return nil, fmt.Errorf("unknown shape %q (have %s, %s)", shape, OneToOne, Queue3)
	}
	switch name {
	case "memory":
		return openMemory(shape)
	case "http":
		return openHTTP(shape)
	case "nats", "nats-req":
		return openNATS(shape, name == "nats-req")
	}
	return nil, fmt.Errorf("unknown implementation %q (have %s)", name, strings.Join(Impls(), ", "))
}

const topic = "bench.events"

func subscribers(shape string) int {
	if shape == Queue3 {
		return 3
	}
	return 1
}

func openMemory(shape string) (*session, error) {
	b := micro.NewMemoryBroker()
	s := &session{received: new(atomic.Int64)}
	for i := 0; i < subscribers(shape); i++ {
		var opts []micro.SubscribeOption
		if shape == Queue3 {
			opts = append(opts, micro.Queue("workers"))
		}
		if _, err := b.Subscribe(topic, func(ctx context.Context, msg *micro.Message) error {
			s.received.Add(1)
			return nil
		}, opts...); err != nil {
			b.Close()
			return nil, err
		}
	}
	header := micro.MD{"Content-Type": micro.ContentTypeBytes} // the broker does not keep or change it
	s.publish = func(ctx context.Context, body []byte) error {
		return b.Publish(ctx, topic, &micro.Message{Header: header, Body: body})
	}
	s.close = func() { b.Close() }
	return s, nil
}

func openHTTP(shape string) (*session, error) {
	reg := micro.NewMemoryRegistry()
	var svcs []*micro.Service
	closeAll := func() {
		for _, svc := range slices.Backward(svcs) {
			svc.Close()
		}
		reg.Close()
	}
	start := func(name string) (*micro.Service, error) {
		svc := micro.NewService(micro.Name(name), micro.Address("127.0.0.1:0"), micro.HandleSignal(false),
			micro.Args(), micro.WithRegistry(reg))
		svcs = append(svcs, svc)
		return svc, svc.Start()
	}
	s := &session{received: new(atomic.Int64)}
	for i := 0; i < subscribers(shape); i++ {
		svc, err := start("subscriber")
		if err != nil {
			closeAll()
			return nil, err
		}
		var opts []micro.SubscribeOption
		if shape == Queue3 {
			opts = append(opts, micro.Queue("workers"))
		}
		if _, err := micro.RegisterSubscriber(topic, svc.Server(), func(ctx context.Context, msg *micro.Message) error {
			s.received.Add(1)
			return nil
		}, opts...); err != nil {
			closeAll()
			return nil, err
		}
	}
	pub, err := start("publisher")
	if err != nil {
		closeAll()
		return nil, err
	}
	client := pub.Client()
	s.publish = func(ctx context.Context, body []byte) error {
		return client.Publish(ctx, topic, &micro.Message{Header: micro.MD{"Content-Type": micro.ContentTypeBytes}, Body: body})
	}
	s.close = closeAll
	return s, nil
}

func openNATS(shape string, request bool) (*session, error) {
	ns, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true})
	if err != nil {
		return nil, err
	}
	ns.Start()
	var conns []*nats.Conn
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
		ns.Shutdown()
		ns.WaitForShutdown()
	}
	if !ns.ReadyForConnections(10 * time.Second) {
		closeAll()
		return nil, errors.New("nats-server did not start")
	}
	connect := func() (*nats.Conn, error) {
		c, err := nats.Connect(ns.ClientURL())
		if err == nil {
			conns = append(conns, c)
		}
		return c, err
	}
	s := &session{received: new(atomic.Int64), lat: &latencies{}}
	for i := 0; i < subscribers(shape); i++ {
		c, err := connect() // a connection each, as separate nodes would have
		if err != nil {
			closeAll()
			return nil, err
		}
		handler := func(m *nats.Msg) {
			s.received.Add(1)
			if request {
				m.Respond(nil)
				return
			}
			if len(m.Data) >= 8 {
				s.lat.add(time.Duration(time.Now().UnixNano() - int64(binary.LittleEndian.Uint64(m.Data))))
			}
		}
		var sub *nats.Subscription
		if shape == Queue3 {
			sub, err = c.QueueSubscribe(topic, "workers", handler)
		} else {
			sub, err = c.Subscribe(topic, handler)
		}
		if err == nil {
			err = sub.SetPendingLimits(-1, -1) // count everything it receives, rather than drop for a slow consumer
		}
		if err == nil {
			err = c.Flush()
		}
		if err != nil {
			closeAll()
			return nil, err
		}
	}
	pc, err := connect()
	if err != nil {
		closeAll()
		return nil, err
	}
	if request {
		s.publish = func(ctx context.Context, body []byte) error {
			_, err := pc.RequestWithContext(ctx, topic, body)
			return err
		}
	} else {
		s.fire = func(body []byte) error {
			binary.LittleEndian.PutUint64(body, uint64(time.Now().UnixNano()))
			return pc.Publish(topic, body)
		}
		s.flush = pc.Flush
	}
	s.close = closeAll
	return s, nil
}

// sample is one measurement of one cell.
type sample struct {
	rate     float64
	p50, p99 time.Duration
	errors   int64
	lost     int64
}

// measure runs one cell once.
func measure(ctx context.Context, name, shape string, payload, inflight int, warmup, duration time.Duration) (sample, error) {
	s, err := open(name, shape)
	if err != nil {
		return sample{}, err
	}
	defer s.close()
	if s.publish == nil {
		return measureFire(ctx, s, payload, warmup, duration)
	}
	// One deadline for the whole run bounds a publish that hangs, without a
	// timer per publish in what is measured.
	ctx, cancel := context.WithTimeout(ctx, warmup+duration+30*time.Second)
	defer cancel()
	var (
		measuring atomic.Bool
		stop      atomic.Bool
		count     atomic.Int64
		errs      atomic.Int64
		mu        sync.Mutex
		lats      []time.Duration
		wg        sync.WaitGroup
	)
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := make([]byte, payload)
			var mine []time.Duration
			for i := 0; !stop.Load() && ctx.Err() == nil; i++ {
				t0 := time.Now()
				err := s.publish(ctx, body)
				d := time.Since(t0)
				if !measuring.Load() {
					continue
				}
				if err != nil {
					errs.Add(1)
					continue
				}
				count.Add(1)
				if i%8 == 0 {
					mine = append(mine, d)
				}
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		}()
	}
	if warmup > 0 {
		wait(ctx, warmup)
	}
	measuring.Store(true)
	t0 := time.Now()
	wait(ctx, duration)
	measuring.Store(false)
	elapsed := time.Since(t0)
	stop.Store(true)
	wg.Wait()
	p50, p99 := quantiles(lats)
	return sample{rate: float64(count.Load()) / elapsed.Seconds(), p50: p50, p99: p99, errors: errs.Load()}, ctx.Err()
}

// measureFire runs a fire-and-forget cell: one publisher as fast as it
// goes, messages counted as subscribers receive them.
func measureFire(ctx context.Context, s *session, payload int, warmup, duration time.Duration) (sample, error) {
	body := make([]byte, max(payload, 8))
	var stop atomic.Bool
	var published, errs atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() && ctx.Err() == nil {
			if err := s.fire(body); err != nil {
				errs.Add(1)
				continue
			}
			published.Add(1)
		}
	}()
	if warmup > 0 {
		wait(ctx, warmup)
	}
	s.lat.take()
	r0, t0 := s.received.Load(), time.Now()
	wait(ctx, duration)
	r1, elapsed := s.received.Load(), time.Since(t0)
	lats := s.lat.take()
	stop.Store(true)
	<-done
	s.flush()
	// What was published and never received: wait for the stragglers a
	// little, polling, since fire and forget gives nothing to wait on.
	for end := time.Now().Add(2 * time.Second); s.received.Load() < published.Load() && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	p50, p99 := quantiles(lats)
	return sample{rate: float64(r1-r0) / elapsed.Seconds(), p50: p50, p99: p99, errors: errs.Load(),
		lost: published.Load() - s.received.Load()}, ctx.Err()
}

func wait(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func quantiles(lats []time.Duration) (p50, p99 time.Duration) {
	if len(lats) == 0 {
		return 0, 0
	}
	slices.Sort(lats)
	return lats[len(lats)/2], lats[len(lats)*99/100]
}

// Run measures every cell of cfg, round after round, and returns a Result
// per cell with the medians.
func Run(ctx context.Context, cfg Config) ([]Result, error) {
	if len(cfg.Impls) == 0 {
		cfg.Impls = Impls()
	}
	if len(cfg.Shapes) == 0 {
		cfg.Shapes = []string{OneToOne, Queue3}
	}
	if len(cfg.Payloads) == 0 {
		cfg.Payloads = []int{64, 4096}
	}
	if len(cfg.InFlight) == 0 {
		cfg.InFlight = []int{1, 32}
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 2 * time.Second
	}
	if cfg.Warmup == 0 {
		cfg.Warmup = 500 * time.Millisecond
	}
	if cfg.Rounds <= 0 {
		cfg.Rounds = 3
	}
	type cell struct {
		impl, shape       string
		payload, inflight int
	}
	var cells []cell
	for _, shape := range cfg.Shapes {
		for _, payload := range cfg.Payloads {
			for _, inflight := range cfg.InFlight {
				for _, impl := range cfg.Impls {
					if impl == "nats" && inflight != 1 {
						continue // one publisher, as fast as it goes
					}
					cells = append(cells, cell{impl, shape, payload, inflight})
				}
			}
		}
	}
	samples := make([][]sample, len(cells))
	for round := 0; round < cfg.Rounds; round++ {
		for i, c := range cells {
			smp, err := measure(ctx, c.impl, c.shape, c.payload, c.inflight, cfg.Warmup, cfg.Duration)
			if err != nil {
				return nil, fmt.Errorf("%s %s %d B x%d: %w", c.impl, c.shape, c.payload, c.inflight, err)
			}
			samples[i] = append(samples[i], smp)
			if cfg.Progress != nil {
				fmt.Fprintf(cfg.Progress, "round %d/%d %-8s %-6s %5d B x%-2d %10.0f msg/s p50 %v errors %d lost %d\n",
					round+1, cfg.Rounds, c.impl, c.shape, c.payload, c.inflight, smp.rate, smp.p50, smp.errors, smp.lost)
			}
		}
	}
	out := make([]Result, len(cells))
	for i, c := range cells {
		r := Result{Impl: c.impl, Shape: c.shape, Payload: c.payload, InFlight: c.inflight, Rounds: len(samples[i])}
		r.Rate = median(samples[i], func(s sample) float64 { return s.rate })
		r.P50 = time.Duration(median(samples[i], func(s sample) float64 { return float64(s.p50) }))
		r.P99 = time.Duration(median(samples[i], func(s sample) float64 { return float64(s.p99) }))
		for _, s := range samples[i] {
			r.Errors += s.errors
			r.Lost += s.lost
		}
		out[i] = r
	}
	return out, nil
}

func median(ss []sample, f func(sample) float64) float64 {
	v := make([]float64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	sort.Float64s(v)
	if len(v) == 0 {
		return 0
	}
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// Markdown formats results as a table, with each rate's ratio to NATS
// request/reply (acknowledged) and to NATS publish in the same shape and
// payload.
func Markdown(results []Result) string {
	var b strings.Builder
	b.WriteString("| shape | payload | impl | in flight | msgs/s | p50 | p99 | vs nats-req | vs nats | errors | lost |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|\n")
	find := func(impl, shape string, payload, inflight int) float64 {
		for _, r := range results {
			if r.Impl == impl && r.Shape == shape && r.Payload == payload && r.InFlight == inflight {
				return r.Rate
			}
		}
		return 0
	}
	ratio := func(a, b float64) string {
		if b == 0 {
			return "—"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	for _, r := range results {
		fmt.Fprintf(&b, "| %s | %d B | %s | %d | %s | %s | %s | %s | %s | %d | %d |\n",
			r.Shape, r.Payload, r.Impl, r.InFlight, count(r.Rate), latency(r.P50), latency(r.P99),
			ratio(r.Rate, find("nats-req", r.Shape, r.Payload, r.InFlight)), ratio(r.Rate, find("nats", r.Shape, r.Payload, 1)),
			r.Errors, r.Lost)
	}
	return b.String()
}

func latency(d time.Duration) string {
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%dns", d.Nanoseconds())
	case d < 100*time.Microsecond:
		return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	}
	return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
}

func count(f float64) string {
	s := fmt.Sprintf("%.0f", f)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
