// Package micro is a standard library for microservices in one flat package:
// RPC over the Connect protocol, service discovery, client-side load
// balancing and codecs by content type, with nothing beyond the Go standard
// library, golang.org/x/net and golang.org/x/sync.
//
// # Quick start
//
//	type Greeter struct{}
//
//	func (g *Greeter) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
//		rsp.Message = "hello " + req.Name
//		return nil
//	}
//
//	func main() {
//		svc := micro.NewService(micro.Name("greeter"), micro.Version("1.0.0"))
//		if err := svc.Init(); err != nil { // -name, -address, ... and MICRO_* variables
//			log.Fatal(err)
//		}
//		if err := micro.RegisterHandler(svc.Server(), new(Greeter)); err != nil {
//			log.Fatal(err)
//		}
//		log.Fatal(svc.Run()) // serve and register until SIGINT/SIGTERM, then drain
//	}
//
// Another service calls it by name:
//
//	var rsp HelloResponse
//	err := svc.Client().Call(ctx, "greeter", "Greeter.Hello", &HelloRequest{Name: "ada"}, &rsp)
//
// and so does curl, since the wire format is Connect's:
//
//	curl -H 'Content-Type: application/json' -d '{"name":"ada"}' http://127.0.0.1:PORT/Greeter/Hello
//
// # Service
//
// A [Service] owns a [Server], a [Client] and a [Registry]. [Service.Run]
// starts the server, registers the node with a TTL and refreshes it on an
// interval (a registry that is down at start is retried, never fatal), and on
// SIGINT, SIGTERM or the end of its context deregisters first, then stops
// accepting and lets calls in flight finish within a grace period.
// [Service.Start] and [Service.Stop] do the same for code that embeds a
// service.
//
// # RPC
//
// [RegisterHandler] exposes the exported methods of a value as endpoints
// ("Greeter.Hello" at POST /Greeter/Hello). Requests and replies follow the
// Connect protocol's unary form: the body is the message in the codec named
// by Content-Type, errors are an HTTP status with {"code","message"} JSON,
// Connect-Timeout-Ms carries the deadline and other headers carry metadata
// ([FromContext], [NewContext], [SetHeader]). Every error that crosses the
// wire is an [*Error] with one of sixteen [Code]s.
//
// Unary calls over HTTP/1.1 take a fast path (one write a call, replies
// parsed in the calling goroutine, requests served from each connection's own
// goroutine); HTTP/2, /health and everything else on the port is served by
// net/http. [HandlerWrapper] and [CallWrapper] are middleware for servers and
// clients.
//
// # Streaming
//
// A handler of the form func(ctx, *[Stream]) error serves client, server and
// bidirectional streams; func(ctx, *Req, *Stream) error serves a server
// stream. [Client.Stream] opens one. Streams follow the Connect streaming
// protocol over cleartext HTTP/2 on the same port, with HTTP/2's flow
// control between a writer and its reader.
//
// # Pub/sub
//
// [Client.Publish] sends an event on a topic and [RegisterSubscriber]
// handles one:
//
//	micro.RegisterSubscriber("user.created", svc.Server(), func(ctx context.Context, ev *User) error { ... })
//	err := svc.Client().Publish(ctx, "user.created", &User{ID: 7})
//
// Publish returns when every subscriber has acknowledged (its handler
// returned nil) or failed; a failing or unreachable subscriber is retried
// with back-off within the deadline, and what still fails is reported in a
// [*PublishError]. [Queue] makes subscribers share a topic's messages, each
// going to one member of the group. Delivery is at least once: a lost
// acknowledgement means the message is sent again, and [HeaderID] lets a
// handler drop the repeat. A Service's default [Broker] delivers over HTTP
// to subscribers announced in the registry; [NewMemoryBroker] serves one
// process.
//
// # Codecs
//
// JSON (the default), proto (through the messages' own Marshal methods), gob,
// raw bytes and plain text are built in; [WithCodec] adds others.
//
// # Discovery and balancing
//
// A [Registry] maps service names to nodes. The default, [MDNSRegistry],
// announces and finds services on the local link by multicast DNS (RFC 6762
// and the DNS-SD records of RFC 6763, which avahi-browse and dns-sd show),
// with no server to run; [MemoryRegistry] serves one process. The client caches lookups, refreshes them from a watch, and shares
// one lookup among concurrent misses. A [Balancer] picks the node for each
// attempt; the default, [NodeBalancer] with [LeastInFlight], ejects nodes that
// keep failing and probes them back. A call that was never served (the node
// refused the connection, or answered [CodeUnavailable]) is retried on
// another node within the deadline and a retry budget; a call that may have
// run, and an application error, never are.
//
// # Store
//
// A [Store] keeps records by key, in databases and tables, with prefix and
// suffix reads, limit and offset, and TTLs. [MemoryStore] is the default
// of a service ([Service.Store]); [FileStore] is an append-only log on disk
// that survives kill -9 and power cuts, chosen with [WithStore] or
// -store file:DIR; [RegisterStore] and [RemoteStore] share one store
// between nodes over RPC.
package micro

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Service is a runnable microservice: a server, a client and a registry under
// one name. Create it with [NewService], configure it with [Service.Init],
// register handlers on [Service.Server], then [Service.Run] (or Start and
// Stop). Its methods are safe for concurrent use.
type Service struct {
	life     sync.Mutex // serialises Start and Stop
	mu       sync.Mutex // guards the fields below
	opts     serviceOptions
	server   *Server
	client   *Client
	registry Registry
	ownsReg  bool // the registry was made here and is closed by Close
	store    Store
	storeOf  string // what made the store, if made here ("memory", "file:DIR")
	ln       net.Listener
	info     *ServiceInfo // as registered
	infoVer  uint64       // bumped when info changes while running
	regMu    sync.Mutex   // orders a re-announcement before Stop's deregistration
	broker   Broker
	ownsBrk  bool // the broker was made here and is closed by Close
	running  bool
	closed   bool          // by Close: no more Start
	stopped  chan struct{} // closed by Stop, ends Run
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the serve goroutine
	regWG    sync.WaitGroup // the register loop
	serveErr chan error
}

type serviceOptions struct {
	name             string
	version          string
	address          string
	advertise        string
	metadata         map[string]string
	registry         Registry
	registryName     string
	store            Store
	storeName        string
	registerTTL      time.Duration
	registerInterval time.Duration
	gracePeriod      time.Duration
	ctx              context.Context
	signal           bool
	args             []string
	flags            *flag.FlagSet
	logger           *slog.Logger
	beforeStart      []func() error
	afterStart       []func() error
	beforeStop       []func() error
	afterStop        []func() error

	serverOpts []ServerOption
	clientOpts []ClientOption

	broker     Broker         // WithBroker; nil: the service's own HTTP broker
	brokerOpts []BrokerOption // for the service's own broker
}

// ServiceOption configures a [Service]. Server and client options are service
// options too, applied to the service's server and client.
type ServiceOption interface {
	applyService(*serviceOptions)
}

// Option configures every component that takes it: a service, a server and a
// client alike (a codec, a registry, a logger).
type Option interface {
	ServerOption
	ClientOption
}

// NewService returns a service with the options. Unless [WithRegistry] says
// otherwise, it uses an [MDNSRegistry] of its own (or a [MemoryRegistry] with
// -registry memory), which it closes on Close. Its sockets open when the
// service starts or its client first looks a service up. Services in one
// process that share a registry find each other without the network.
func NewService(opts ...ServiceOption) *Service {
	s := &Service{
		opts: serviceOptions{
			name:             filepath.Base(os.Args[0]),
			address:          ":0",
			registerTTL:      90 * time.Second,
			registerInterval: 30 * time.Second,
			gracePeriod:      10 * time.Second,
			signal:           true,
			args:             os.Args[1:],
			logger:           rpcDiscard,
		},
	}
	for _, o := range opts {
		o.applyService(&s.opts)
	}
	s.server = NewServer(append([]ServerOption{serverName(s.opts.name)}, s.opts.serverOpts...)...)
	s.setRegistry()
	s.setStore()
	s.client = NewClient(append(s.opts.clientOpts, WithRegistry(s.registry))...)
	s.setBroker()
	return s
}

// setBroker gives the server and client the broker of WithBroker, or the
// service's own HTTP broker (see broker_http.go), whose subscriptions the
// service announces in its registration.
func (s *Service) setBroker() {
	own, _ := s.broker.(*brokerHTTP)
	switch {
	case s.opts.broker == nil && own != nil && s.ownsBrk:
		// Init with new broker options: the same broker (it holds the
		// subscriptions and the server's delivery endpoint), reconfigured.
		own.opts = brokerDefaults()
		for _, o := range s.opts.brokerOpts {
			o.applyBroker(&own.opts)
		}
	case s.opts.broker == nil:
		b := newBrokerHTTP(s.server, s.client, s.opts.brokerOpts...)
		b.announce = s.reannounce
		s.broker, s.ownsBrk = b, true
	default:
		if s.ownsBrk {
			s.broker.Close()
		}
		s.broker, s.ownsBrk = s.opts.broker, false
	}
	s.server.opts.broker = s.broker
	s.client.opts.broker = s.broker
}

// setRegistry takes the registry of the options, or makes the service's own:
// mDNS unless -registry memory asked for a MemoryRegistry.
func (s *Service) setRegistry() {
	if s.ownsReg {
		if c, ok := s.registry.(interface{ Close() error }); ok {
			c.Close()
		}
	}
	s.registry, s.ownsReg = s.opts.registry, false
	if s.registry != nil {
		return
	}
	s.ownsReg = true
	if s.opts.registryName != "memory" {
		if r, err := NewMDNSRegistry(); err == nil { // cannot fail without options
			s.registry = r
			return
		}
	}
	s.registry = NewMemoryRegistry()
}

// setStore makes the store the options ask for, unless the service has it
// already: the WithStore store, or one of its own, which it closes when
// replaced.
func (s *Service) setStore() error {
	name := s.opts.storeName
	if name == "" {
		name = "memory"
	}
	var st Store
	switch dir, isFile := strings.CutPrefix(name, "file:"); {
	case name == "memory" && s.opts.store != nil:
		st, name = s.opts.store, ""
	case name == s.storeOf:
		return nil
	case name == "memory":
		st = NewMemoryStore()
	case isFile && dir != "":
		fs, err := NewFileStore(dir, StoreLogger(s.opts.logger))
		if err != nil {
			return err
		}
		st = fs
	default:
		return fmt.Errorf("micro: unknown store %q (have: memory, file:DIR)", name)
	}
	if s.storeOf != "" && s.store != st {
		s.store.Close()
	}
	s.store, s.storeOf = st, name
	return nil
}

// Init applies more options, then the environment (MICRO_NAME,
// MICRO_VERSION, MICRO_ADDRESS, MICRO_ADVERTISE, MICRO_REGISTRY, MICRO_STORE,
// MICRO_REGISTER_TTL, MICRO_REGISTER_INTERVAL, MICRO_METADATA as
// "k=v,k=v"), then the command-line flags of the same names (-name,
// -register_ttl, ...; -metadata k=v may repeat), each overriding the one
// before. Call it before Start. -h returns an error wrapping flag.ErrHelp
// whose text is the usage.
func (s *Service) Init(opts ...ServiceOption) error {
	s.life.Lock() // not while a Stop drains
	defer s.life.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running {
		return errors.New("micro: Init after Start")
	}
	prevName := s.opts.name
	prevRegistry, prevRegistryName := s.opts.registry, s.opts.registryName
	prevBroker, prevBrokerOpts := s.opts.broker, len(s.opts.brokerOpts)
	o := &s.opts
	o.serverOpts, o.clientOpts = nil, nil
	for _, opt := range opts {
		opt.applyService(o)
	}
	fs := o.flags
	if fs == nil {
		fs = flag.NewFlagSet(o.name, flag.ContinueOnError)
		fs.SetOutput(new(strings.Builder))
	}
	metadata := &serviceMetaFlag{m: maps.Clone(o.metadata)} // never the caller's map
	if fs.Lookup("register_ttl") == nil {                   // Init may run twice on one FlagSet
		fs.StringVar(&o.name, "name", o.name, "service name")
		fs.StringVar(&o.version, "version", o.version, "service version")
		fs.StringVar(&o.address, "address", o.address, "address to listen on (host:port)")
		fs.StringVar(&o.advertise, "advertise", o.advertise, "address to register (default: the bound address)")
		fs.StringVar(&o.registryName, "registry", o.registryName, "registry: mdns (multicast DNS on the local link) or memory (this process only)")
		fs.StringVar(&o.storeName, "store", o.storeName, "store: memory or file:DIR (default memory)")
		fs.DurationVar(&o.registerTTL, "register_ttl", o.registerTTL, "registration TTL")
		fs.DurationVar(&o.registerInterval, "register_interval", o.registerInterval, "re-registration interval")
		fs.Var(metadata, "metadata", "service metadata key=value (repeatable)")
	} else if f, ok := fs.Lookup("metadata").Value.(*serviceMetaFlag); ok {
		metadata = f
	}
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if !serviceFlagNames[f.Name] {
			return // the program's own flags
		}
		v, ok := os.LookupEnv("MICRO_" + strings.ToUpper(f.Name))
		if !ok || envErr != nil {
			return
		}
		if f.Name == "metadata" {
			for _, kv := range strings.Split(v, ",") {
				if err := metadata.Set(kv); err != nil {
					envErr = fmt.Errorf("micro: MICRO_METADATA: %w", err)
					return
				}
			}
			return
		}
		if err := f.Value.Set(v); err != nil {
			envErr = fmt.Errorf("micro: MICRO_%s=%q: %w", strings.ToUpper(f.Name), v, err)
		}
	})
	if envErr != nil {
		return envErr
	}
	var args []string
	for _, a := range o.args { // go test's own flags, when a test calls Init
		if o.flags != nil || !strings.HasPrefix(a, "-test.") {
			args = append(args, a)
		}
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			var b strings.Builder
			fs.SetOutput(&b)
			fs.PrintDefaults()
			return fmt.Errorf("%w\nusage of %s:\n%s", err, o.name, b.String())
		}
		return fmt.Errorf("micro: %w", err)
	}
	o.metadata = metadata.m
	if err := o.validate(); err != nil {
		return err
	}
	switch o.registryName {
	case "", "mdns", "memory": // the service's own, unless WithRegistry gave one
	default:
		return fmt.Errorf("micro: unknown registry %q (have: mdns, memory)", o.registryName)
	}
	if err := s.setStore(); err != nil {
		return err
	}
	if o.name != prevName {
		o.serverOpts = append(o.serverOpts, serverName(o.name))
	}
	s.server.apply(o.serverOpts)
	clientOpts := o.clientOpts
	if o.registry != prevRegistry || o.registryName != prevRegistryName {
		s.setRegistry()
		clientOpts = append(clientOpts, WithRegistry(s.registry))
	}
	if len(clientOpts) > 0 {
		s.client.apply(clientOpts)
	}
	if o.broker != prevBroker || len(o.brokerOpts) != prevBrokerOpts {
		s.setBroker()
	}
	return nil
}

// validate checks options that cannot work together.
func (o *serviceOptions) validate() error {
	if o.registerTTL > 0 && o.registerInterval >= o.registerTTL {
		return fmt.Errorf("micro: register interval %s must be shorter than the register TTL %s, "+
			"or the registration expires between refreshes", o.registerInterval, o.registerTTL)
	}
	return nil
}

// serviceFlagNames are the flags Init defines, each also read from the
// environment as MICRO_NAME and so on.
var serviceFlagNames = map[string]bool{
	"name": true, "version": true, "address": true, "advertise": true, "registry": true, "store": true,
	"register_ttl": true, "register_interval": true, "metadata": true,
}

// serviceMetaFlag is a repeatable key=value flag.
type serviceMetaFlag struct{ m map[string]string }

func (f *serviceMetaFlag) String() string {
	if f == nil || len(f.m) == 0 {
		return ""
	}
	var kv []string
	for k, v := range f.m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

func (f *serviceMetaFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("metadata %q is not key=value", s)
	}
	if f.m == nil {
		f.m = map[string]string{}
	}
	f.m[strings.TrimSpace(k)] = strings.TrimSpace(v)
	return nil
}

// Name returns the service's name.
func (s *Service) Name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.opts.name
}

// Server returns the service's server, for registering handlers.
func (s *Service) Server() *Server { return s.server }

// Client returns the service's client, which finds services through the
// service's registry.
func (s *Service) Client() *Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.client
}

// Broker returns the service's broker: the one given with [WithBroker], or
// the service's own HTTP broker, which [Service.Close] closes.
func (s *Service) Broker() Broker {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.broker
}

// Registry returns the service's registry.
func (s *Service) Registry() Registry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.registry
}

// Store returns the service's store: the one given with [WithStore], or the
// one -store chose, by default a [MemoryStore] of its own. The service
// closes a store it made when it closes.
func (s *Service) Store() Store {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store
}

// Addr returns the address the service listens on (with the real port when
// it was asked for port 0), or "" before Start.
func (s *Service) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// Info returns the record the service registers (nil before Start).
func (s *Service) Info() *ServiceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info.Clone()
}

// Start runs the before-start hooks, listens, serves, registers the node
// and runs the after-start hooks, then returns. A registry that fails is
// retried in the background until it takes the registration. Hooks may call
// the service's getters, but not Start or Stop.
func (s *Service) Start() error {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	running, opts := s.running, s.opts
	s.mu.Unlock()
	if running {
		return errors.New("micro: service already started")
	}
	if err := opts.validate(); err != nil {
		return err
	}
	for _, h := range opts.beforeStart {
		if err := h(); err != nil {
			return err
		}
	}
	if err := s.start(); err != nil {
		return err
	}
	for _, h := range opts.afterStart {
		if err := h(); err != nil {
			s.stop()
			return err
		}
	}
	return nil
}

// start listens, serves and registers; the caller holds s.life.
func (s *Service) start() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	ln, err := net.Listen("tcp", s.opts.address)
	if err != nil {
		s.mu.Unlock()
		return fmt.Errorf("micro: listen on %s: %w", s.opts.address, err)
	}
	s.server.reopen() // if started again after Stop
	s.ln = ln
	srv := s.server
	s.serveErr = make(chan error, 1)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		err := srv.Serve(ln)
		if errors.Is(err, ErrClosed) { // stopped before it began
			err = nil
		}
		s.serveErr <- err
	}()

	id := make([]byte, 8)
	rand.Read(id)
	addr := s.opts.advertise
	if addr == "" {
		tcp := ln.Addr().(*net.TCPAddr)
		if _, mdns := s.registry.(*MDNSRegistry); mdns && tcp.IP.IsUnspecified() {
			addr = tcp.String() // mDNS answers with the address of the interface asked on
		} else {
			addr = serviceAdvertise(tcp)
		}
	}
	s.info = &ServiceInfo{
		Name:      s.opts.name,
		Version:   s.opts.version,
		Metadata:  maps.Clone(s.opts.metadata),
		Endpoints: s.server.Endpoints(),
		Nodes:     []*Node{{ID: s.opts.name + "-" + hex.EncodeToString(id), Address: addr, Metadata: s.nodeMetadata()}},
	}
	s.server.info.Store(s.info.Clone())
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.stopped = make(chan struct{})
	s.running = true
	reg, info, ttl, logger := s.registry, s.info.Clone(), s.opts.registerTTL, s.opts.logger
	s.mu.Unlock()

	// Register once now, outside the lock, so the service can be found when
	// Start returns; the loop retries a failure and refreshes the TTL.
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	err = s.registerInfo(rctx, reg, ttl)
	rcancel()
	if err != nil {
		logger.Warn("micro: register failed; retrying", "service", info.Name, "err", err)
	}
	s.regWG.Add(1)
	go s.registerLoop(ctx, reg, info, err == nil)
	return nil
}

// nodeMetadata is the node's metadata: the service's, and the subscriptions
// of its own HTTP broker. The caller holds s.mu.
func (s *Service) nodeMetadata() map[string]string {
	md := maps.Clone(s.opts.metadata)
	if b, ok := s.broker.(*brokerHTTP); ok && b.server == s.server {
		if bm := b.metadata(); len(bm) > 0 {
			if md == nil {
				md = map[string]string{}
			}
			maps.Copy(md, bm)
		}
	}
	return md
}

// registerInfo registers the current record, and again if it changed
// meanwhile, so that the last registration to finish is of the latest one.
func (s *Service) registerInfo(ctx context.Context, reg Registry, ttl time.Duration) error {
	for {
		s.mu.Lock()
		info, ver := s.info.Clone(), s.infoVer
		s.mu.Unlock()
		if err := reg.Register(ctx, info, ttl); err != nil {
			return err
		}
		s.mu.Lock()
		same := s.infoVer == ver
		s.mu.Unlock()
		if same {
			return nil
		}
	}
}

// reannounce re-registers a running service after its broker's
// subscriptions changed, so publishers see the change. A failure is left to
// the register loop's next refresh.
func (s *Service) reannounce() {
	s.regMu.Lock() // Stop deregisters only after this registration
	defer s.regMu.Unlock()
	s.mu.Lock()
	if !s.running || s.info == nil {
		s.mu.Unlock()
		return
	}
	info := s.info.Clone()
	info.Endpoints = s.server.Endpoints()
	info.Nodes[0].Metadata = s.nodeMetadata()
	s.info = info
	s.infoVer++
	reg, ttl, logger, ctx := s.registry, s.opts.registerTTL, s.opts.logger, context.Background()
	s.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.registerInfo(rctx, reg, ttl); err != nil {
		logger.Warn("micro: re-registering after a subscription change failed; the register loop retries", "service", info.Name, "err", err)
	}
}

// registerLoop refreshes the registration every interval, and retries a
// failed one with back-off (from 100ms to the interval).
func (s *Service) registerLoop(ctx context.Context, reg Registry, info *ServiceInfo, ok bool) {
	defer s.regWG.Done()
	interval := s.opts.registerInterval
	if interval <= 0 {
		interval = 30 * time.Second
	}
	backoff := 100 * time.Millisecond
	t := time.NewTimer(interval)
	defer t.Stop()
	if !ok {
		t.Reset(backoff)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := s.registerInfo(rctx, reg, s.opts.registerTTL)
		cancel()
		if err == nil {
			backoff = 100 * time.Millisecond
			t.Reset(interval)
			continue
		}
		if ctx.Err() != nil {
			return
		}
		s.opts.logger.Warn("micro: register failed; retrying", "service", info.Name, "err", err, "in", backoff)
		t.Reset(backoff)
		backoff = min(2*backoff, interval)
	}
}

// serviceAdvertise picks the address to register for a listener: its own IP,
// or for a wildcard listener the first private unicast address of an up
// interface (loopback if there is none).
func serviceAdvertise(a *net.TCPAddr) string {
	port := fmt.Sprint(a.Port)
	if !a.IP.IsUnspecified() {
		return net.JoinHostPort(a.IP.String(), port)
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ad := range addrs {
			if ipn, ok := ad.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsPrivate() {
				return net.JoinHostPort(ipn.IP.String(), port)
			}
		}
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// Stop runs the before-stop hooks, deregisters (while /health answers
// 503), stops accepting calls, lets those in flight finish within the grace
// period (then cuts them), and runs the after-stop hooks. The client stays
// usable, and Start may run again. It is idempotent and ends Run.
func (s *Service) Stop() error {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	running, opts := s.running, s.opts
	s.mu.Unlock()
	if !running {
		return nil
	}
	var errs []error
	for _, h := range opts.beforeStop {
		errs = append(errs, h())
	}
	errs = append(errs, s.stop())
	for _, h := range opts.afterStop {
		errs = append(errs, h())
	}
	return errors.Join(errs...)
}

// stop deregisters, drains and stops; the caller holds s.life. The service's
// fields are read under s.mu, but the waiting happens outside it, so getters
// answer during a drain.
func (s *Service) stop() error {
	s.mu.Lock()
	s.running = false
	s.cancel() // ends the register loop
	reg, server, grace := s.registry, s.server, s.opts.gracePeriod
	s.mu.Unlock()
	s.regWG.Wait() // so no refresh can land after the deregistration

	var errs []error
	server.draining.Store(true)
	s.regMu.Lock() // after a re-announcement in flight
	s.mu.Lock()
	info := s.info // as last announced
	s.mu.Unlock()
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := reg.Deregister(dctx, info); err != nil {
		errs = append(errs, fmt.Errorf("micro: deregister: %w", err))
	}
	cancel()
	s.regMu.Unlock()
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	if err := server.Shutdown(sctx); err != nil {
		errs = append(errs, fmt.Errorf("micro: calls still running after the %s grace period were cut", grace))
	}
	cancel()
	s.wg.Wait()
	if err := <-s.serveErr; err != nil {
		errs = append(errs, err)
	}
	s.mu.Lock()
	s.ln = nil
	close(s.stopped)
	s.mu.Unlock()
	return errors.Join(errs...)
}

// Close stops the service if it runs, then releases its client and, if it
// made it, its registry. A closed service does not start again. It is
// idempotent.
func (s *Service) Close() error {
	err := s.Stop()
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return err
	}
	s.closed = true
	client, reg, owns := s.client, s.registry, s.ownsReg
	store, ownsStore := s.store, s.storeOf != ""
	broker, ownsBrk := s.broker, s.ownsBrk
	s.mu.Unlock()
	if ownsBrk {
		broker.Close() // before the client it publishes with
	}
	client.Close()
	if c, ok := reg.(interface{ Close() error }); ok && owns {
		c.Close()
	}
	if ownsStore {
		err = errors.Join(err, store.Close())
	}
	return err
}

// Run starts the service and blocks until SIGINT or SIGTERM (unless
// HandleSignal(false)), the service's [Context] ends, or Stop is called; then
// it stops the service and returns Stop's error.
func (s *Service) Run() error {
	if err := s.Start(); err != nil {
		return err
	}
	s.mu.Lock()
	stopped := s.stopped
	ctx := s.opts.ctx
	handle := s.opts.signal
	s.mu.Unlock()
	if ctx == nil {
		ctx = context.Background()
	}
	var sig chan os.Signal
	if handle {
		sig = make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		defer signal.Stop(sig)
	}
	select {
	case <-sig:
	case <-ctx.Done():
	case <-stopped:
	}
	return s.Close()
}

// Name sets the service's name (default: the program's file name).
func Name(name string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.name = name }}
}

// Version sets the service's version (default "").
func Version(v string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.version = v }}
}

// Address sets the address the service listens on (default ":0", any free
// port). Tests use "127.0.0.1:0". To send a call to a given node, use
// [WithAddress].
func Address(addr string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.address = addr }}
}

// Advertise sets the address registered for the node (default: the bound
// address; for a wildcard listener, the host's first private IPv4 address).
func Advertise(addr string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.advertise = addr }}
}

// Metadata sets the service's metadata, registered with its record and node.
func Metadata(md map[string]string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.metadata = md }}
}

// RegisterTTL sets the TTL of the service's registration (default 90s).
func RegisterTTL(d time.Duration) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.registerTTL = d }}
}

// RegisterInterval sets how often the registration is refreshed (default
// 30s); keep it well under the TTL.
func RegisterInterval(d time.Duration) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.registerInterval = d }}
}

// GracePeriod bounds how long Stop waits for calls in flight (default 10s).
func GracePeriod(d time.Duration) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.gracePeriod = d }}
}

// Context makes Run stop the service when ctx ends (default: never).
func Context(ctx context.Context) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.ctx = ctx }}
}

// HandleSignal sets whether Run stops on SIGINT and SIGTERM (default true).
func HandleSignal(b bool) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.signal = b }}
}

// Args sets the command-line arguments Init parses (default os.Args[1:],
// less go test's -test.* flags); Args() with none makes Init ignore the
// command line.
func Args(args ...string) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.args = args }}
}

// Flags makes Init define the service's flags on fs, beside the program's
// own, and parse the command line into all of them at once (default: a
// FlagSet of the service's own). With flag.CommandLine, -h prints the usage
// of every flag and exits, as Go programs do.
func Flags(fs *flag.FlagSet) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.flags = fs }}
}

// BeforeStart adds a hook run by Start before listening; an error aborts
// Start.
func BeforeStart(fn func() error) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.beforeStart = append(o.beforeStart, fn) }}
}

// AfterStart adds a hook run once the service serves and is registered; an
// error stops the service and is returned by Start.
func AfterStart(fn func() error) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.afterStart = append(o.afterStart, fn) }}
}

// BeforeStop adds a hook run by Stop before deregistering.
func BeforeStop(fn func() error) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.beforeStop = append(o.beforeStop, fn) }}
}

// AfterStop adds a hook run by Stop once the server has stopped.
func AfterStop(fn func() error) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.afterStop = append(o.afterStop, fn) }}
}

// WithRegistry sets the registry a service registers in and a client looks
// services up in. The caller keeps ownership: closing it is theirs.
func WithRegistry(r Registry) Option {
	return rpcOption{
		service: func(o *serviceOptions) { o.registry = r },
		client:  func(o *clientOptions) { o.registry = r },
		server:  func(*serverOptions) {},
	}
}

// WithStore sets the service's store (default: a [MemoryStore] of its own;
// the -store flag and MICRO_STORE, when given file:DIR, take precedence).
// The caller keeps ownership: closing it is theirs.
func WithStore(st Store) ServiceOption {
	return rpcOption{service: func(o *serviceOptions) { o.store = st }}
}

// WithCodec adds a codec, or replaces the built-in one for its content type,
// on servers and clients.
func WithCodec(c Codec) Option {
	return rpcOption{
		server: func(o *serverOptions) { o.codecs = append(o.codecs, c) },
		client: func(o *clientOptions) { o.codecs = append(o.codecs, c) },
	}
}

// WithLogger sets the logger (default: discard). The library logs only what
// an operator should see: failed registrations, handler panics.
func WithLogger(l *slog.Logger) Option {
	return rpcOption{
		service: func(o *serviceOptions) { o.logger = l },
		server:  func(o *serverOptions) { o.logger = l },
		client:  func(o *clientOptions) { o.logger = l },
	}
}
