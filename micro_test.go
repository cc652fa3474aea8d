package micro

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestMain runs the tests inside a private network namespace when it can
// (Linux, root, unshare and ip present), so no test can put a packet on a
// real network: only loopback (multicast on) and a veth pair exist there, as
// ../shared/bin/netns-run sets up. Elsewhere the tests run as they are and
// keep to loopback. MICRO_NETNS=1 marks the inside; MICRO_NO_NETNS=1 skips
// the re-exec.
func TestMain(m *testing.M) {
	if code, ok := testReexecInNetns(); ok {
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// testNetnsSetup is the namespace's network, as netns-run makes it.
const testNetnsSetup = `
set -e
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 2>/dev/null || true
ip link set lo up
ip link set lo multicast on
ip addr del 127.0.0.1/8 dev lo
ip addr add 127.0.0.1/8 dev lo scope link
ip route add 224.0.0.0/4 dev lo src 127.0.0.1
ip link add veth0 type veth peer name veth1
ip link set veth0 up
ip link set veth1 up
exec "$@"`

func testReexecInNetns() (code int, ok bool) {
	if runtime.GOOS != "linux" || os.Getenv("MICRO_NETNS") == "1" || os.Getenv("MICRO_NO_NETNS") == "1" || os.Geteuid() != 0 {
		return 0, false
	}
	unshare, err1 := exec.LookPath("unshare")
	_, err2 := exec.LookPath("ip")
	if err1 != nil || err2 != nil {
		return 0, false
	}
	if exec.Command(unshare, "-n", "true").Run() != nil {
		return 0, false // not permitted here (an unprivileged container)
	}
	cmd := exec.Command(unshare, append([]string{"-n", "sh", "-c", testNetnsSetup, "netns"}, os.Args...)...)
	cmd.Env = append(os.Environ(), "MICRO_NETNS=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, true
	case errors.As(err, &exit):
		return exit.ExitCode(), true
	}
	fmt.Fprintf(os.Stderr, "micro tests: running outside a network namespace: %v\n", err)
	return 0, false
}

// checkGoroutines fails the test if goroutines started during it are still
// running when its cleanups are done. Call it first in a test, so that its
// cleanup runs last. Tests that use it must not run in parallel.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := testGoroutines()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			var leaked []string
			for id, stack := range testGoroutines() {
				if _, ok := before[id]; !ok && testOwnGoroutine(stack) {
					leaked = append(leaked, stack)
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines left running:\n\n%s", len(leaked), strings.Join(leaked, "\n\n"))
				return
			}
			time.Sleep(5 * time.Millisecond) // waiting for exits, polled
		}
	})
}

// testOwnGoroutine reports whether a goroutine belongs to the code under
// test (this package or the network code it runs), not to the test runner.
func testOwnGoroutine(stack string) bool {
	if strings.Contains(stack, "testing.tRunner") || strings.Contains(stack, "testing.(*T).Run") ||
		strings.Contains(stack, "testing.runFuzzing") || strings.Contains(stack, "signal.signal_recv") {
		return false
	}
	return strings.Contains(stack, "micro-kit/micro.") || strings.Contains(stack, "net/http.") ||
		strings.Contains(stack, "net.(*")
}

func testGoroutines() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	out := map[string]string{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		head, _, _ := strings.Cut(g, "\n")
		fields := strings.Fields(head) // goroutine N [state]:
		if len(fields) >= 2 {
			out[fields[1]] = g
		}
	}
	return out
}

// newTestService starts a service on 127.0.0.1:0 with the handlers and
// options, and stops it when the test ends.
func newTestService(t *testing.T, name string, handlers []any, opts ...ServiceOption) *Service {
	t.Helper()
	base := []ServiceOption{Name(name), Address("127.0.0.1:0"), HandleSignal(false), Args()}
	svc := NewService(append(base, opts...)...)
	if err := svc.Init(); err != nil {
		t.Fatal(err)
	}
	for _, h := range handlers {
		if err := RegisterHandler(svc.Server(), h); err != nil {
			t.Fatal(err)
		}
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := svc.Close(); err != nil {
			t.Errorf("closing %s: %v", name, err)
		}
	})
	return svc
}

func assertNoError(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
}

func assertCode(t *testing.T, err error, want Code) {
	t.Helper()
	if got := CodeOf(err); got != want {
		t.Fatalf("code %v (error %v), want %v", got, err, want)
	}
}

func assertEqual[T comparable](t *testing.T, got, want T) {
	t.Helper()
	if got != want {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// The test services.

type HelloRequest struct {
	Name string `json:"name"`
}

type HelloResponse struct {
	Message string `json:"message"`
	Node    string `json:"node,omitempty"`
}

// Greeter answers Hello with its own id, so tests can tell nodes apart.
type Greeter struct {
	id      string
	calls   atomic.Int64
	started chan struct{} // Slow signals here when it has begun
	release chan struct{} // Slow returns when this closes
}

func (g *Greeter) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	g.calls.Add(1)
	rsp.Message = "hello " + req.Name
	rsp.Node = g.id
	return nil
}

func (g *Greeter) Slow(ctx context.Context, req *HelloRequest) (*HelloResponse, error) {
	g.started <- struct{}{}
	select {
	case <-g.release:
		return &HelloResponse{Message: "done " + req.Name, Node: g.id}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Relay calls the greeter service from inside a handler.
type Relay struct{ client func() *Client }

func (r *Relay) Forward(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	return r.client().Call(ctx, "greeter", "Greeter.Hello", req, rsp)
}

func TestTwoServicesCallEachOther(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	greeter := newTestService(t, "greeter", []any{&Greeter{id: "g1"}}, WithRegistry(reg))
	var relaySvc atomic.Pointer[Service] // set here, read in the handler: ordered only by the network
	relaySvc.Store(newTestService(t, "relay", []any{&Relay{client: func() *Client { return relaySvc.Load().Client() }}}, WithRegistry(reg)))

	var rsp HelloResponse
	assertNoError(t, greeter.Client().Call(context.Background(), "relay", "Relay.Forward", &HelloRequest{Name: "ada"}, &rsp))
	assertEqual(t, rsp.Message, "hello ada")
	assertEqual(t, rsp.Node, "g1")

	infos, err := reg.Lookup(context.Background(), "greeter")
	assertNoError(t, err)
	assertEqual(t, len(infos), 1)
	assertEqual(t, infos[0].Nodes[0].Address, greeter.Addr())
	if !slices.ContainsFunc(infos[0].Endpoints, func(e *Endpoint) bool {
		return e.Name == "Greeter.Hello" && e.Request == "*micro.HelloRequest" && e.Response == "*micro.HelloResponse"
	}) {
		t.Fatalf("endpoints not published: %+v", infos[0].Endpoints)
	}
}

// balancerSpy wraps a balancer to see every pick and result.
type balancerSpy struct {
	Balancer
	dead        string
	mu          sync.Mutex
	deadPicks   int
	deadFails   int
	afterEject  int // dead picks after the balancer had ejected it
	ejectedSeen bool
	ejectAfter  int
}

func (s *balancerSpy) Pick(ctx context.Context, nodes []*Node) (*Node, func(error), error) {
	n, done, err := s.Balancer.Pick(ctx, nodes)
	if err != nil {
		return n, done, err
	}
	if n.Address == s.dead {
		s.mu.Lock()
		s.deadPicks++
		if s.ejectedSeen {
			s.afterEject++
		}
		s.mu.Unlock()
	}
	return n, func(err error) {
		done(err)
		if n.Address == s.dead && err != nil {
			s.mu.Lock()
			s.deadFails++
			if s.deadFails >= s.ejectAfter {
				s.ejectedSeen = true
			}
			s.mu.Unlock()
		}
	}, nil
}

func TestDeadNodeIsEjectedAndCallsSucceed(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	g1, g2 := &Greeter{id: "g1"}, &Greeter{id: "g2"}
	newTestService(t, "greeter", []any{g1}, WithRegistry(reg))
	newTestService(t, "greeter", []any{g2}, WithRegistry(reg))

	// A third node whose port refuses connections.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	dead := ln.Addr().String()
	ln.Close()
	assertNoError(t, reg.Register(context.Background(), &ServiceInfo{
		Name: "greeter", Nodes: []*Node{{ID: "dead", Address: dead}},
	}, time.Minute))

	for _, strategy := range []Strategy{LeastInFlight, RoundRobin, Random} {
		t.Run(fmt.Sprint(strategy), func(t *testing.T) {
			spy := &balancerSpy{Balancer: NewBalancer(strategy), dead: dead, ejectAfter: 3}
			client := NewClient(WithRegistry(reg), WithBalancer(spy))
			defer client.Close()
			var wg sync.WaitGroup
			errs := make(chan error, 1000)
			for w := 0; w < 8; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 125; i++ {
						var rsp HelloResponse
						if err := client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "x"}, &rsp); err != nil {
							errs <- err
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Errorf("call failed: %v", err)
			}
			if spy.deadPicks == 0 {
				t.Fatalf("the dead node was never tried; the test proves nothing")
			}
			if spy.afterEject > 0 {
				t.Fatalf("%d calls went to the dead node after it was ejected", spy.afterEject)
			}
		})
	}
	if g1.calls.Load() == 0 || g2.calls.Load() == 0 {
		t.Fatalf("calls not spread: g1 %d, g2 %d", g1.calls.Load(), g2.calls.Load())
	}
}

func TestGracefulStopFinishesCallsAndNewCallsGoElsewhere(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	a := &Greeter{id: "a", started: make(chan struct{}, 1), release: make(chan struct{})}
	b := &Greeter{id: "b"}
	svcA := newTestService(t, "greeter", []any{a}, WithRegistry(reg))
	newTestService(t, "greeter", []any{b}, WithRegistry(reg))
	client := NewClient(WithRegistry(reg))
	t.Cleanup(func() { client.Close() })

	// Warm the client's cache and connections to both nodes.
	for i := 0; i < 10; i++ {
		var rsp HelloResponse
		assertNoError(t, client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp))
	}

	w, err := reg.Watch(context.Background(), "greeter")
	assertNoError(t, err)
	defer w.Stop()

	inflight := make(chan error, 1)
	var slowRsp HelloResponse
	go func() {
		inflight <- client.Call(context.Background(), "greeter", "Greeter.Slow", &HelloRequest{Name: "x"}, &slowRsp, WithAddress(svcA.Addr()))
	}()
	<-a.started

	stopped := make(chan error, 1)
	go func() { stopped <- svcA.Stop() }()

	// The node leaves the registry before the server stops.
	ev, err := w.Next()
	assertNoError(t, err)
	assertEqual(t, ev.Type, EventDelete)

	for i := 0; i < 20; i++ {
		var rsp HelloResponse
		assertNoError(t, client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp))
		assertEqual(t, rsp.Node, "b")
	}
	select {
	case err := <-stopped:
		t.Fatalf("Stop returned (%v) while a call was in flight", err)
	default:
	}
	close(a.release)
	assertNoError(t, <-inflight)
	assertEqual(t, slowRsp.Message, "done x")
	assertNoError(t, <-stopped)
}

// flakyRegistry fails the first n registrations.
type flakyRegistry struct {
	Registry
	fails atomic.Int32
}

func (r *flakyRegistry) Register(ctx context.Context, s *ServiceInfo, ttl time.Duration) error {
	if r.fails.Add(-1) >= 0 {
		return errors.New("registry down")
	}
	return r.Registry.Register(ctx, s, ttl)
}

func TestServiceServesWhileRegistryIsDown(t *testing.T) {
	checkGoroutines(t)
	mem := NewMemoryRegistry()
	t.Cleanup(func() { mem.Close() })
	reg := &flakyRegistry{Registry: mem}
	reg.fails.Store(2)
	w, err := mem.Watch(context.Background(), "greeter")
	assertNoError(t, err)
	defer w.Stop()

	svc := newTestService(t, "greeter", []any{&Greeter{id: "g"}}, WithRegistry(reg))
	// Serving already, though not registered.
	client := NewClient()
	defer client.Close()
	var rsp HelloResponse
	assertNoError(t, client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "a"}, &rsp, WithAddress(svc.Addr())))
	// And registered once the registry recovers.
	ev, err := w.Next()
	assertNoError(t, err)
	assertEqual(t, ev.Type, EventCreate)
	assertEqual(t, ev.Service.Nodes[0].Address, svc.Addr())
}

func TestServiceInitFlagsAndEnv(t *testing.T) {
	t.Setenv("MICRO_VERSION", "2.0.0")
	t.Setenv("MICRO_METADATA", "zone=eu,track=canary")
	t.Setenv("MICRO_REGISTER_TTL", "45s")
	t.Setenv("MICRO_REGISTRY", "memory") // no multicast outside the test namespace
	svc := NewService(Name("greeter"), Version("1.0.0"), HandleSignal(false),
		Args("-name", "hello", "-address", "127.0.0.1:0", "-metadata", "track=stable", "-test.v"))
	assertNoError(t, svc.Init())
	assertEqual(t, svc.opts.name, "hello")
	assertEqual(t, svc.opts.version, "2.0.0")
	assertEqual(t, svc.opts.registerTTL, 45*time.Second)
	assertEqual(t, svc.opts.metadata["zone"], "eu")
	assertEqual(t, svc.opts.metadata["track"], "stable") // the flag beats the environment
	if _, ok := svc.Registry().(*MemoryRegistry); !ok {
		t.Fatalf("MICRO_REGISTRY=memory gave a %T", svc.Registry())
	}
	assertNoError(t, svc.Start())
	defer svc.Close()
	info := svc.Info()
	assertEqual(t, info.Name, "hello")
	assertEqual(t, info.Version, "2.0.0")
	assertEqual(t, info.Nodes[0].Address, svc.Addr())

	bad := NewService(Args("-register_ttl", "soon"))
	if err := bad.Init(); err == nil || !strings.Contains(err.Error(), "register_ttl") {
		t.Fatalf("bad flag: %v", err)
	}
	if err := NewService(Args("-register_ttl", "10s", "-register_interval", "10s")).Init(); err == nil ||
		!strings.Contains(err.Error(), "shorter than the register TTL") {
		t.Fatalf("interval not under the TTL: %v", err)
	}
	if err := NewService(Address("127.0.0.1:0"), RegisterTTL(time.Second), RegisterInterval(2*time.Second)).Start(); err == nil {
		t.Fatal("Start with an interval past the TTL succeeded")
	}
	t.Setenv("MICRO_REGISTRY", "zookeeper")
	if err := NewService(Args()).Init(); err == nil || !strings.Contains(err.Error(), "zookeeper") {
		t.Fatalf("unknown registry: %v", err)
	}
	help := NewService(Args("-h")).Init()
	if !errors.Is(help, flag.ErrHelp) || !strings.Contains(help.Error(), "-register_interval") {
		t.Fatalf("help: %v", help)
	}
}

func TestServiceHooksAndRunStopsOnContext(t *testing.T) {
	checkGoroutines(t)
	var order []string
	hook := func(name string) func() error {
		return func() error { order = append(order, name); return nil }
	}
	ctx, cancel := context.WithCancel(context.Background())
	reg := NewMemoryRegistry()
	defer reg.Close()
	svc := NewService(Name("hooks"), Address("127.0.0.1:0"), Args(), Context(ctx), HandleSignal(false), WithRegistry(reg),
		BeforeStart(hook("before-start")), AfterStart(hook("after-start")),
		BeforeStop(hook("before-stop")), AfterStop(hook("after-stop")),
		AfterStart(func() error { cancel(); return nil }))
	assertNoError(t, svc.Run())
	assertEqual(t, strings.Join(order, ","), "before-start,after-start,before-stop,after-stop")
	// A failing before-start hook aborts Start.
	failing := NewService(Address("127.0.0.1:0"), Args(), BeforeStart(func() error { return errors.New("no") }))
	if err := failing.Start(); err == nil || err.Error() != "no" {
		t.Fatalf("Start: %v", err)
	}
	failing.Close()
}

func TestNoGoroutinesLeftAfterStop(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	defer reg.Close()
	svc := NewService(Name("greeter"), Address("127.0.0.1:0"), Args(), WithRegistry(reg), HandleSignal(false))
	assertNoError(t, RegisterHandler(svc.Server(), &Greeter{id: "g"}))
	assertNoError(t, svc.Start())
	caller := NewService(Name("caller"), Args(), WithRegistry(reg))
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 20; j++ {
				var rsp HelloResponse
				if err := caller.Client().Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	assertNoError(t, svc.Stop())
	assertNoError(t, caller.Close())
	assertNoError(t, svc.Close())
}

// The go-micro quick start compiles with only the import path changed.
var _ = func() error {
	service := NewService(Name("helloworld"))
	service.Init()
	return service.Run()
}

func TestServiceStartsAgainAfterStop(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	svc := newTestService(t, "greeter", []any{&Greeter{id: "g"}}, WithRegistry(reg))
	assertNoError(t, svc.Stop())
	assertNoError(t, svc.Stop()) // idempotent
	if _, err := reg.Lookup(context.Background(), "greeter"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("still registered after Stop: %v", err)
	}
	assertNoError(t, svc.Start())
	var rsp HelloResponse
	assertNoError(t, svc.Client().Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "again"}, &rsp))
	assertEqual(t, rsp.Message, "hello again")
}

// Services in one process, each with its default registry (mDNS), find
// each other over the link, and a wildcard listener is announced with the
// address of the interface asked on.
func TestServiceDefaultRegistryIsMDNS(t *testing.T) {
	if !testInNetns() {
		t.Skip("the default registry multicasts: only inside the private network namespace")
	}
	checkGoroutines(t)
	svc := newTestService(t, "mdns-greeter", []any{&Greeter{id: "mdns"}}, Address(":0"))
	if _, ok := svc.Registry().(*MDNSRegistry); !ok {
		t.Fatalf("default registry is a %T", svc.Registry())
	}
	if host, _, _ := net.SplitHostPort(svc.Info().Nodes[0].Address); host != "::" {
		t.Fatalf("registered %s; want the wildcard address", svc.Info().Nodes[0].Address)
	}
	caller := newTestService(t, "mdns-caller", nil)
	var rsp HelloResponse
	assertNoError(t, caller.Client().Call(testCtx(t), "mdns-greeter", "Greeter.Hello", &HelloRequest{Name: "link"}, &rsp))
	assertEqual(t, rsp.Message, "hello link")
	got, err := caller.Registry().Lookup(testCtx(t), "mdns-greeter")
	assertNoError(t, err)
	t.Logf("resolved over the link as %s", got[0].Nodes[0].Address)
	if len(got[0].Endpoints) != 0 {
		t.Fatalf("endpoints travelled in DNS: %v", got[0].Endpoints)
	}
	full, err := caller.Client().Describe(testCtx(t), "mdns-greeter")
	assertNoError(t, err)
	if len(full) != 1 || !slices.ContainsFunc(full[0].Endpoints, func(e *Endpoint) bool { return e.Name == "Greeter.Hello" }) {
		t.Fatalf("described: %+v", full)
	}
}

func TestClientDescribe(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	newTestService(t, "described", []any{&Greeter{id: "d"}}, WithRegistry(reg), Metadata(map[string]string{"team": "core"}))
	caller := newTestService(t, "describer", nil, WithRegistry(reg))
	got, err := caller.Client().Describe(testCtx(t), "described")
	assertNoError(t, err)
	if len(got) != 1 || len(got[0].Nodes) != 1 || got[0].Metadata["team"] != "core" ||
		!slices.ContainsFunc(got[0].Endpoints, func(e *Endpoint) bool { return e.Name == "Greeter.Hello" }) {
		t.Fatalf("described: %+v", got[0])
	}
	if _, err := caller.Client().Describe(testCtx(t), "nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("describing a missing service: %v", err)
	}
}

// TestCrossBuild builds the package for platforms the suite does not run on:
// plan9 (no ECONNRESET or EPIPE in its syscall package), windows and
// js/wasm (no socket peeking). Each needs its standard library compiled
// once (~25 s with a cold build cache, then cached), so -short skips it.
func TestCrossBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("cross builds compile the standard library for other platforms: not with -short")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	for _, p := range []struct{ goos, goarch string }{{"plan9", "amd64"}, {"windows", "amd64"}, {"js", "wasm"}} {
		cmd := exec.Command(goTool, "build", "-o", os.DevNull, ".")
		cmd.Env = append(os.Environ(), "GOOS="+p.goos, "GOARCH="+p.goarch, "CGO_ENABLED=0", "GOPROXY=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("GOOS=%s GOARCH=%s go build: %v\n%s", p.goos, p.goarch, err, out)
		}
	}
}
