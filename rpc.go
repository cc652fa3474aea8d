package micro

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"reflect"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MD is the metadata of a call: HTTP headers on the wire, with keys in
// canonical header form ("X-Request-Id"). Use Get and Set, which canonicalise.
type MD map[string]string

// Get returns the value for key, whatever its case.
func (md MD) Get(key string) string { return md[textproto.CanonicalMIMEHeaderKey(key)] }

// Set stores value under the canonical form of key.
func (md MD) Set(key, value string) { md[textproto.CanonicalMIMEHeaderKey(key)] = value }

type (
	rpcOutgoingKey struct{}
	rpcCallKey     struct{}
)

// NewContext returns a copy of ctx carrying md (merged over any metadata it
// carried already): calls made with the returned context send md as headers.
func NewContext(ctx context.Context, md MD) context.Context {
	merged := MD{}
	if old, ok := ctx.Value(rpcOutgoingKey{}).(MD); ok {
		for k, v := range old {
			merged[k] = v
		}
	}
	for k, v := range md {
		merged.Set(k, v)
	}
	return context.WithValue(ctx, rpcOutgoingKey{}, merged)
}

// FromContext returns the metadata of the request a handler is serving. It is
// not forwarded on calls the handler makes; pass it on with [NewContext] when
// that is wanted (a trace ID, say), since blind forwarding would hand the
// caller's credentials to every service downstream.
func FromContext(ctx context.Context) (MD, bool) {
	c, ok := ctx.Value(rpcCallKey{}).(*rpcCall)
	if !ok {
		return nil, false
	}
	return c.incoming(), true
}

// SetHeader sets a response header (metadata the caller receives) from inside
// a handler, before it returns. It fails outside a handler's context.
func SetHeader(ctx context.Context, key, value string) error {
	c, ok := ctx.Value(rpcCallKey{}).(*rpcCall)
	if !ok {
		return errors.New("micro: SetHeader called outside a handler")
	}
	if !rpcSendable(textproto.CanonicalMIMEHeaderKey(key), value) {
		return fmt.Errorf("micro: SetHeader: %q cannot be sent: a protocol header, or not a valid header", key)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sealed {
		return errors.New("micro: SetHeader after the handler returned")
	}
	if c.out == nil {
		c.out = MD{}
	}
	c.out.Set(key, value)
	return nil
}

// rpcCall is the context a handler runs in: its parent's values and
// cancellation, the deadline the caller sent, the request's headers (turned
// into metadata on first use) and the response metadata the handler sets.
// One allocation carries all of it. A handler that never waits on Done costs
// no timer: the deadline is checked by Err, and a real context is made only
// when Done is first asked for (or a child context is derived).
type rpcCall struct {
	parent   context.Context
	deadline time.Time // from Connect-Timeout-Ms; zero: none
	head     *rpcHead

	mu       sync.Mutex
	in, out  MD
	real     context.Context // made on first Done
	cancel   context.CancelFunc
	finished bool // the handler returned
	sealed   bool // out has been taken for the reply
}

func (c *rpcCall) incoming() MD {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.in == nil {
		c.in = c.head.metadata()
	}
	return c.in
}

// Deadline returns the earlier of the caller's deadline and the parent's.
func (c *rpcCall) Deadline() (time.Time, bool) {
	pd, ok := c.parent.Deadline()
	if c.deadline.IsZero() || (ok && pd.Before(c.deadline)) {
		return pd, ok
	}
	return c.deadline, true
}

// Done returns a channel closed when the call's context ends.
func (c *rpcCall) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.realLocked().Done()
}

func (c *rpcCall) realLocked() context.Context {
	if c.real == nil {
		if c.deadline.IsZero() {
			c.real, c.cancel = context.WithCancel(c.parent)
		} else {
			c.real, c.cancel = context.WithDeadline(c.parent, c.deadline)
		}
		if c.finished {
			c.cancel()
		} else if c.head != nil && c.head.watch != nil {
			c.head.watch(c.cancel) // the fast path watches its connection from now on
		}
	}
	return c.real
}

// Err says why the context ended, if it has.
func (c *rpcCall) Err() error {
	c.mu.Lock()
	real, finished := c.real, c.finished
	c.mu.Unlock()
	switch {
	case real != nil:
		return real.Err()
	case c.parent.Err() != nil:
		return c.parent.Err()
	case !c.deadline.IsZero() && !time.Now().Before(c.deadline):
		return context.DeadlineExceeded
	case finished:
		return context.Canceled
	}
	return nil
}

// Value returns the call itself for rpcCallKey, and otherwise defers to the
// real context once there is one (so derived contexts hook onto it without
// a goroutine), or to the parent.
func (c *rpcCall) Value(key any) any {
	if key == (rpcCallKey{}) {
		return c
	}
	c.mu.Lock()
	real := c.real
	c.mu.Unlock()
	if real != nil {
		return real.Value(key)
	}
	return c.parent.Value(key)
}

// finish ends the context when the handler returns, as a deferred cancel of
// context.WithTimeout would: goroutines it left behind see it canceled.
func (c *rpcCall) finish() {
	c.mu.Lock()
	c.finished = true
	cancel := c.cancel
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// Request describes a call for middleware: on the server, the call being
// served (Body holds the decoded request); on the client, the call being made
// (Service is the target).
type Request struct {
	Service     string // the service called (on the server: this one's name, if known)
	Endpoint    string // "Greeter.Hello"
	ContentType string // the codec's content type
	Header      MD     // incoming metadata on the server; outgoing on the client
	Body        any    // the request message
}

// HandlerFunc serves a decoded request and returns the response message.
type HandlerFunc func(ctx context.Context, req *Request) (any, error)

// HandlerWrapper is server middleware: it wraps every handler of a server.
// Wrappers apply in the order given, the first outermost.
type HandlerWrapper func(HandlerFunc) HandlerFunc

// CallFunc makes a call and decodes the response into rsp.
type CallFunc func(ctx context.Context, req *Request, rsp any, opts ...CallOption) error

// CallWrapper is client middleware: it wraps every call of a client (around
// discovery, balancing and retries). Wrappers apply in the order given, the
// first outermost.
type CallWrapper func(CallFunc) CallFunc

// Server serves RPC handlers over the Connect protocol. It is an
// [http.Handler]: mount it in any mux, or let [Server.Serve] run it with
// HTTP/1.1 and cleartext HTTP/2 on one listener.
//
// Register handlers before serving. A Server is safe for concurrent use;
// Shutdown and Close stop what Serve started.
type Server struct {
	opts   serverOptions
	codecs *codecSet

	mu        sync.RWMutex
	methods   map[string]*rpcMethod // by path, "/Greeter/Hello"
	endpoints []*Endpoint
	extra     *http.ServeMux // routes added with HandleHTTP
	hs        *http.Server   // serves what the fast path hands off
	h1ln      *http1Listener // how it gets those connections
	hsDone    chan struct{}  // closed when hs.Serve returns
	listeners map[net.Listener]struct{}
	conns     map[*http1ServerConn]struct{}
	connWG    sync.WaitGroup // fast-path connection goroutines
	closed    bool

	closing    atomic.Bool                 // Shutdown or Close began
	draining   atomic.Bool                 // /health says so
	info       atomic.Pointer[ServiceInfo] // served at /micro/info; set by Service
	baseCtx    context.Context
	cancelBase context.CancelFunc
}

type serverOptions struct {
	name              string
	maxBodySize       int64
	readHeaderTimeout time.Duration
	readTimeout       time.Duration
	idleTimeout       time.Duration
	maxHeaderBytes    int
	wrappers          []HandlerWrapper
	streamWrappers    []StreamWrapper
	codecs            []Codec
	logger            *slog.Logger
	broker            Broker              // for RegisterSubscriber (broker.go)
	subWrappers       []SubscriberWrapper // around every RegisterSubscriber
}

// rpcMethod is one registered endpoint.
type rpcMethod struct {
	name    string // "Greeter.Hello"
	recv    reflect.Value
	fn      reflect.Value
	reqType reflect.Type
	rspType reflect.Type // for the (ctx, req, rsp) form; nil for the returning form
	handler HandlerFunc  // fn behind the server's wrappers
	stream  int          // streamNone, streamBidi or streamServer
	get     bool         // no side effects: may be called with GET (NoSideEffects)
}

// NewServer returns a server with the options.
func NewServer(opts ...ServerOption) *Server {
	s := &Server{
		opts: serverOptions{
			maxBodySize:       4 << 20,
			readHeaderTimeout: 10 * time.Second,
			readTimeout:       30 * time.Second,
			idleTimeout:       120 * time.Second,
			maxHeaderBytes:    64 << 10,
			logger:            rpcDiscard,
		},
		methods:   make(map[string]*rpcMethod),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*http1ServerConn]struct{}),
	}
	s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
	s.apply(opts)
	return s
}

func (s *Server) apply(opts []ServerOption) {
	for _, o := range opts {
		o.applyServer(&s.opts)
	}
	s.codecs = &codecSet{server: true}
	for _, c := range s.opts.codecs {
		s.codecs.add(c)
	}
	s.mu.Lock()
	for _, m := range s.methods { // wrappers given later apply to every handler
		m.wrap(s.opts.wrappers)
	}
	s.mu.Unlock()
}

// HandlerOption configures one [RegisterHandler] call.
type HandlerOption func(*rpcHandlerOptions)

type rpcHandlerOptions struct {
	name    string
	meta    map[string]string
	safe    []string // NoSideEffects' methods
	safeAll bool     // NoSideEffects with none named
}

// HandlerName sets the name endpoints are registered under (default: the
// handler's type name), such as "helloworld.Greeter" for the endpoint
// "helloworld.Greeter.Hello" at path /helloworld.Greeter/Hello.
func HandlerName(name string) HandlerOption {
	return func(o *rpcHandlerOptions) { o.name = name }
}

// NoSideEffects says that the named methods of the handler (such as
// "Hello"; with none named, all its unary methods) have no side effects,
// so they may also be called with HTTP GET, the request in the query, as
// the Connect protocol's unary GET has it: ?encoding=json&message=... (the
// message URL-encoded, or base64url with base64=1; compression=gzip for a
// compressed one). A browser, a cache or
//
//	curl --get --data-urlencode encoding=json --data-urlencode 'message={"name":"Ada"}' http://host:port/Greeter/Hello
//
// can then call them. Calls by POST are unchanged; other methods answer
// GET with 405. Default: none. Naming a method that is not a unary
// endpoint of the handler makes RegisterHandler fail.
func NoSideEffects(methods ...string) HandlerOption {
	return func(o *rpcHandlerOptions) {
		o.safe = append(o.safe, methods...)
		o.safeAll = o.safeAll || len(methods) == 0
	}
}

// EndpointMetadata adds metadata to every endpoint of the handler, as
// published in the registry.
func EndpointMetadata(md map[string]string) HandlerOption {
	return func(o *rpcHandlerOptions) { o.meta = md }
}

var (
	rpcContextType = reflect.TypeFor[context.Context]()
	rpcErrorType   = reflect.TypeFor[error]()
)

// RegisterHandler registers the exported methods of h as endpoints named
// "Type.Method". Each method that takes a context.Context first must have
// one of the forms
//
//	func (h *T) Hello(ctx context.Context, req *Req, rsp *Rsp) error
//	func (h *T) Hello(ctx context.Context, req *Req) (*Rsp, error)
//
// and any other shape is an error that says how to fix it. Methods that do
// not take a context first are not endpoints and are left alone.
func RegisterHandler(s *Server, h any, opts ...HandlerOption) error {
	var o rpcHandlerOptions
	for _, opt := range opts {
		opt(&o)
	}
	v := reflect.ValueOf(h)
	if !v.IsValid() {
		return errors.New("micro: RegisterHandler: handler is nil")
	}
	t := v.Type()
	name := o.name
	if name == "" {
		name = reflect.Indirect(v).Type().Name()
		if name == "" {
			return fmt.Errorf("micro: RegisterHandler: %s has no type name; pass HandlerName(\"Name\")", t)
		}
	}
	if rpcPath(name+".M") == "" {
		return fmt.Errorf("micro: RegisterHandler: handler name %q: use ASCII letters, digits, '_' and dots", name)
	}
	var methods []*rpcMethod
	var problems []string
	for i := 0; i < t.NumMethod(); i++ {
		m := t.Method(i)
		if !m.IsExported() {
			continue
		}
		mt := m.Type // receiver first
		if mt.NumIn() < 2 || mt.In(1) != rpcContextType {
			continue
		}
		if rpcPath(name+"."+m.Name) == "" {
			problems = append(problems, fmt.Sprintf("method %s: use an ASCII name", m.Name))
			continue
		}
		rm, err := rpcNewMethod(name+"."+m.Name, v, m)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		methods = append(methods, rm)
	}
	for _, safe := range o.safe {
		if !slices.ContainsFunc(methods, func(m *rpcMethod) bool { return m.stream == streamNone && m.name == name+"."+safe }) {
			problems = append(problems, fmt.Sprintf("NoSideEffects(%q): no unary endpoint %s.%s", safe, name, safe))
		}
	}
	for _, m := range methods {
		m.get = m.stream == streamNone && (o.safeAll || slices.Contains(o.safe, strings.TrimPrefix(m.name, name+".")))
	}
	if len(problems) > 0 {
		return fmt.Errorf("micro: RegisterHandler(%s): %s", t, strings.Join(problems, "; "))
	}
	if len(methods) == 0 {
		hint := ""
		if t.Kind() != reflect.Pointer && reflect.PointerTo(t).NumMethod() > t.NumMethod() {
			hint = "; hint: pass a pointer to a value of that type"
		}
		return fmt.Errorf("micro: RegisterHandler(%s): no exported method of the form "+
			"func(ctx context.Context, req *Req, rsp *Rsp) error or func(ctx context.Context, req *Req) (*Rsp, error)%s", t, hint)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range methods {
		if _, dup := s.methods[rpcPath(m.name)]; dup {
			return fmt.Errorf("micro: RegisterHandler: endpoint %s is registered already", m.name)
		}
	}
	for _, m := range methods {
		m.wrap(s.opts.wrappers)
		s.methods[rpcPath(m.name)] = m
		e := &Endpoint{Name: m.name, Request: m.reqType.String(), Metadata: o.meta}
		switch {
		case m.stream != streamNone:
			e.Metadata = maps.Clone(o.meta)
			if e.Metadata == nil {
				e.Metadata = map[string]string{}
			}
			e.Metadata["stream"] = map[int]string{streamBidi: "bidi", streamServer: "server"}[m.stream]
			e.Response = streamType.String()
		case m.rspType != nil:
			e.Response = m.rspType.String()
		default:
			e.Response = m.fn.Type().Out(0).String()
		}
		s.endpoints = append(s.endpoints, e)
	}
	slices.SortFunc(s.endpoints, func(a, b *Endpoint) int { return strings.Compare(a.Name, b.Name) })
	return nil
}

func rpcNewMethod(name string, recv reflect.Value, m reflect.Method) (*rpcMethod, error) {
	mt := m.Type
	want := "want func(ctx context.Context, req *Req, rsp *Rsp) error, func(ctx context.Context, req *Req) (*Rsp, error), " +
		"func(ctx context.Context, stream *micro.Stream) error or func(ctx context.Context, req *Req, stream *micro.Stream) error"
	rm := &rpcMethod{name: name, recv: recv, fn: m.Func, stream: streamKind(mt)}
	switch {
	case rm.stream == streamBidi:
		rm.reqType = streamType
		return rm, nil
	case rm.stream == streamServer:
		rm.reqType = mt.In(2)
		return rm, nil
	case mt.NumIn() == 4 && mt.NumOut() == 1:
		if mt.Out(0) != rpcErrorType {
			return nil, fmt.Errorf("method %s returns %s; %s", m.Name, mt.Out(0), want)
		}
		rm.reqType, rm.rspType = mt.In(2), mt.In(3)
		if rm.rspType.Kind() != reflect.Pointer {
			return nil, fmt.Errorf("method %s: response %s is not a pointer; hint: use *%s", m.Name, rm.rspType, rm.rspType)
		}
	case mt.NumIn() == 3 && mt.NumOut() == 2:
		if mt.Out(1) != rpcErrorType {
			return nil, fmt.Errorf("method %s: second result is %s, not error; %s", m.Name, mt.Out(1), want)
		}
		rm.reqType = mt.In(2)
	default:
		return nil, fmt.Errorf("method %s has type %s; %s", m.Name, mt, want)
	}
	return rm, nil
}

// wrap puts the handler behind the server's wrappers, the first outermost.
func (m *rpcMethod) wrap(wrappers []HandlerWrapper) {
	m.handler = m.call
	for i := len(wrappers) - 1; i >= 0; i-- {
		m.handler = wrappers[i](m.handler)
	}
}

// call invokes the method on a decoded request.
func (m *rpcMethod) call(ctx context.Context, req *Request) (any, error) {
	args := []reflect.Value{m.recv, reflect.ValueOf(ctx), reflect.ValueOf(req.Body)}
	if m.rspType != nil {
		rsp := reflect.New(m.rspType.Elem())
		out := m.fn.Call(append(args, rsp))
		if err, _ := out[0].Interface().(error); err != nil {
			return nil, err
		}
		return rsp.Interface(), nil
	}
	out := m.fn.Call(args)
	if err, _ := out[1].Interface().(error); err != nil {
		return nil, err
	}
	return out[0].Interface(), nil
}

// rpcTarget is an endpoint split for its request line: /handler/method.
type rpcTarget struct{ handler, method string }

func (t rpcTarget) String() string { return "/" + t.handler + "/" + t.method }

// rpcPath maps "pkg.Greeter.Hello" to "/pkg.Greeter/Hello", or returns ""
// for a name that is not letters, digits, '_' and dots. (It allocates;
// a client call uses rpcTarget.)
func rpcPath(endpoint string) string {
	if !rpcValidEndpoint(endpoint) {
		return ""
	}
	i := strings.LastIndexByte(endpoint, '.')
	return "/" + endpoint[:i] + "/" + endpoint[i+1:]
}

// rpcValidEndpoint reports whether endpoint is "Handler.Method" in letters,
// digits, '_' and dots.
func rpcValidEndpoint(endpoint string) bool {
	for i := 0; i < len(endpoint); i++ {
		if c := endpoint[i]; !(c == '.' || c == '_' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	i := strings.LastIndexByte(endpoint, '.')
	return i > 0 && i < len(endpoint)-1
}

// Endpoints returns the registered endpoints, sorted by name.
func (s *Server) Endpoints() []*Endpoint {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Endpoint, len(s.endpoints))
	for i, e := range s.endpoints {
		c := *e
		out[i] = &c
	}
	return out
}

// HandleHTTP serves plain HTTP handlers on the server's port beside the RPC
// endpoints, with http.ServeMux patterns. RPC endpoints take precedence.
func (s *Server) HandleHTTP(pattern string, h http.Handler) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.extra == nil {
		s.extra = http.NewServeMux()
	}
	s.extra.Handle(pattern, h)
}

// ServeHTTP serves one request: a Connect unary call to a registered
// endpoint, /health, or a route added with [Server.HandleHTTP].
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
		// net/http drops a Content-Length sent beside Transfer-Encoding and
		// keeps the connection; closing it after this reply means nothing
		// smuggled behind the body is ever read (RFC 9112 §6.3).
		w.Header().Set("Connection", "close")
	}
	s.mu.RLock()
	m := s.methods[r.URL.Path]
	extra := s.extra
	s.mu.RUnlock()
	if m == nil {
		if extra != nil {
			if _, pattern := extra.Handler(r); pattern != "" {
				extra.ServeHTTP(w, r)
				return
			}
		}
		if r.URL.Path == "/health" {
			s.serveHealth(w)
			return
		}
		if r.URL.Path == rpcInfoPath && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			s.serveInfo(w)
			return
		}
		rpcWriteReply(w, rpcErrorReply(0, Errorf(CodeUnimplemented, "no endpoint at %s", r.URL.Path)))
		return
	}
	if r.Method == http.MethodGet && m.get {
		s.serveGet(w, r, m)
		return
	}
	if r.Method != http.MethodPost {
		rep := rpcErrorReply(http.StatusMethodNotAllowed, Errorf(CodeUnimplemented, "method %s not allowed; use POST", r.Method))
		rep.md = MD{"Allow": http.MethodPost}
		if m.get {
			rep.md["Allow"] = "GET, POST"
		}
		rpcWriteReply(w, rep)
		return
	}
	if m.stream != streamNone || strings.HasPrefix(codecMediaType(r.Header.Get("Content-Type")), "application/connect+") {
		s.serveStream(w, r, m)
		return
	}
	limit := s.opts.maxBodySize
	if r.ContentLength > limit {
		rpcWriteReply(w, rpcErrorReply(0, rpcTooBig(limit)))
		return
	}
	if d := s.opts.readTimeout; d > 0 { // per request, so streams on this server are unaffected
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(d))
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 { // grown as the body arrives, not as the header claims
		buf.Grow(int(min(r.ContentLength, 64<<10)))
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	var maxErr *http.MaxBytesError
	switch {
	case errors.As(err, &maxErr):
		s.writeReply(w, rpcErrorReply(0, rpcTooBig(limit)))
		return
	case err != nil:
		s.writeReply(w, rpcErrorReply(0, Errorf(CodeInvalidArgument, "reading the request body: %v", err)))
		return
	}
	head := rpcHead{
		contentType: r.Header.Get("Content-Type"),
		timeout:     r.Header.Get("Connect-Timeout-Ms"),
		encoding:    r.Header.Get("Content-Encoding"),
		header:      r.Header,
	}
	s.writeReply(w, s.unary(r.Context(), m, &head, buf.Bytes()))
}

// writeReply writes a unary reply through net/http within ReadTimeout from
// now: the handler's own time does not count, as on the fast path.
func (s *Server) writeReply(w http.ResponseWriter, rep rpcReply) {
	if d := s.opts.readTimeout; d > 0 {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
	}
	rpcWriteReply(w, rep)
}

// serveGet serves a unary call made with GET, its request in the query
// (https://connectrpc.com/docs/protocol#unary-get-request): encoding (the
// codec's name, as in application/<name>), message, base64=1 if the message
// is base64url, compression, and connect=v1 (optional).
func (s *Server) serveGet(w http.ResponseWriter, r *http.Request, m *rpcMethod) {
	fail := func(err *Error) { s.writeReply(w, rpcErrorReply(0, err)) }
	q, err := url.ParseQuery(r.URL.RawQuery)
	switch {
	case err != nil:
		fail(Errorf(CodeInvalidArgument, "malformed query: %v", err))
		return
	case !q.Has("message"):
		fail(Errorf(CodeInvalidArgument, "a GET call needs message= the request"))
		return
	}
	if v := q.Get("connect"); v != "" && v != "v1" {
		fail(Errorf(CodeInvalidArgument, "connect=%q: this server speaks v1", v))
		return
	}
	enc := q.Get("encoding")
	if enc == "" || strings.ContainsAny(enc, "/;, ") {
		fail(Errorf(CodeInvalidArgument, "a GET call needs encoding= the codec's name, such as json or proto"))
		return
	}
	msg := []byte(q.Get("message"))
	if q.Get("base64") == "1" {
		b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(string(msg), "="))
		if err != nil {
			fail(Errorf(CodeInvalidArgument, "message= is not base64url: %v", err))
			return
		}
		msg = b
	}
	if int64(len(msg)) > s.opts.maxBodySize {
		fail(rpcTooBig(s.opts.maxBodySize))
		return
	}
	head := rpcHead{
		contentType: "application/" + enc,
		timeout:     r.Header.Get("Connect-Timeout-Ms"),
		encoding:    q.Get("compression"),
		header:      r.Header,
	}
	s.writeReply(w, s.unary(r.Context(), m, &head, msg))
}

// rpcInfoPath serves a node's full record: what discovery records leave out.
const rpcInfoPath = "/micro/info"

// serveInfo answers with the node's ServiceInfo as JSON: the record its
// service registered, or the server's name and endpoints.
func (s *Server) serveInfo(w http.ResponseWriter) {
	info := s.info.Load()
	if info == nil {
		info = &ServiceInfo{Name: s.opts.name, Endpoints: s.Endpoints()}
	}
	b, err := json.Marshal(info)
	if err != nil {
		rpcWriteReply(w, rpcErrorReply(0, Errorf(CodeInternal, "encoding the service record: %v", err)))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

func (s *Server) serveHealth(w http.ResponseWriter) {
	w.Header().Set("Content-Type", ContentTypeJSON)
	if s.draining.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"status":"draining"}`)
		return
	}
	io.WriteString(w, `{"status":"serving"}`)
}

// rpcReply is a unary reply, framed by whichever transport took the call.
type rpcReply struct {
	status      int
	contentType string
	md          MD // response metadata, and protocol headers such as Allow
	body        []byte
}

// unary serves a Connect unary call to m, given its headers and its body as
// it came off the wire (compressed or not, within the size limit). It never
// keeps raw after it returns.
func (s *Server) unary(ctx context.Context, m *rpcMethod, h *rpcHead, raw []byte) (rep rpcReply) {
	defer func() { // a codec that panics; the handler's own panics are caught in invoke
		if p := recover(); p != nil {
			s.opts.logger.Error("micro: panic serving a call", "endpoint", m.name, "panic", p, "stack", string(debug.Stack()))
			rep = rpcErrorReply(0, NewError(CodeInternal, "internal error serving "+m.name))
		}
	}()
	ct := h.contentType
	codec := s.codecs.get(ct)
	if codec == nil {
		rep := rpcErrorReply(http.StatusUnsupportedMediaType, Errorf(CodeInvalidArgument, "unsupported content type %q", ct))
		rep.md = MD{"Accept-Post": s.codecs.names()}
		return rep
	}
	call := &rpcCall{parent: ctx, head: h}
	ms := h.timeoutMS
	if v := h.timeout; v != "" {
		var ok bool
		if ms, ok = rpcParseTimeout(v); !ok {
			return rpcErrorReply(0, Errorf(CodeInvalidArgument, "bad Connect-Timeout-Ms %q: want 1 to 10 digits", v))
		}
	}
	if ms > 0 {
		call.deadline = time.Now().Add(time.Duration(ms) * time.Millisecond)
	}
	defer call.finish()
	body, err := rpcDecodeBody(raw, h.encoding, s.opts.maxBodySize)
	if err != nil {
		return rpcErrorReply(0, err)
	}
	ptr := codecNew(m.reqType)
	if err := codec.Unmarshal(body, ptr.Interface()); err != nil {
		return rpcErrorReply(0, Errorf(CodeInvalidArgument, "malformed %s request: %v", codec.ContentType(), err))
	}
	ctx = call
	req := &Request{Service: s.opts.name, Endpoint: m.name, ContentType: codec.ContentType(), Body: ptr.Interface()}
	if m.reqType.Kind() != reflect.Pointer {
		req.Body = ptr.Elem().Interface()
	}
	if len(s.opts.wrappers) > 0 { // only middleware reads it; handlers use FromContext
		req.Header = call.incoming()
	}
	rsp, err := s.invoke(ctx, m, req)
	call.mu.Lock()
	out := call.out
	call.sealed = true // a goroutine the handler left behind cannot change it now
	call.mu.Unlock()
	if err != nil {
		if ctx.Err() != nil && CodeOf(err) == CodeUnknown {
			err = ctx.Err()
		}
		rep := rpcErrorReply(0, err)
		rep.md = rpcMergeMD(out, rep.md)
		return rep
	}
	b, err := codec.Marshal(rsp)
	if err != nil {
		rep := rpcErrorReply(0, Errorf(CodeInternal, "encoding the response: %v", err))
		rep.md = out
		return rep
	}
	return rpcReply{status: http.StatusOK, contentType: codec.ContentType(), md: out, body: b}
}

// invoke runs the handler chain; a panic becomes an internal error.
func (s *Server) invoke(ctx context.Context, m *rpcMethod, req *Request) (rsp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.opts.logger.Error("micro: handler panic", "endpoint", m.name, "panic", p, "stack", string(debug.Stack()))
			rsp, err = nil, NewError(CodeInternal, "internal error: handler "+m.name+" panicked")
		}
	}()
	return m.handler(ctx, req)
}

func rpcTooBig(limit int64) *Error {
	return Errorf(CodeResourceExhausted, "request body larger than %d bytes", limit)
}

// rpcGzipReaders keeps gzip readers (about 40 KB of state each) for reuse:
// a stream may carry many small compressed messages.
var rpcGzipReaders sync.Pool

// rpcDecodeBody undoes the request's Content-Encoding, within the limit.
func rpcDecodeBody(raw []byte, encoding string, limit int64) ([]byte, error) {
	switch encoding {
	case "", "identity":
		return raw, nil
	case "gzip":
		if len(raw) == 0 { // the protocol says: empty stays empty
			return raw, nil
		}
	default:
		return nil, Errorf(CodeUnimplemented, "unsupported Content-Encoding %q; use gzip or none", encoding)
	}
	zr, _ := rpcGzipReaders.Get().(*gzip.Reader)
	var err error
	if zr == nil {
		zr, err = gzip.NewReader(bytes.NewReader(raw))
	} else {
		err = zr.Reset(bytes.NewReader(raw))
	}
	if err != nil {
		return nil, Errorf(CodeInvalidArgument, "malformed gzip body: %v", err)
	}
	defer func() {
		zr.Reset(bytes.NewReader(nil)) // let go of raw: a pooled reader must not keep a body alive
		rpcGzipReaders.Put(zr)
	}()
	var buf bytes.Buffer
	_, err = buf.ReadFrom(io.LimitReader(zr, limit+1))
	switch {
	case int64(buf.Len()) > limit:
		return nil, rpcTooBig(limit)
	case err != nil:
		return nil, Errorf(CodeInvalidArgument, "malformed gzip body: %v", err)
	}
	return buf.Bytes(), nil
}

// rpcMergeMD returns a and b together (b wins), allocating only when both
// have entries.
func rpcMergeMD(a, b MD) MD {
	if len(a) == 0 {
		return b
	}
	if len(b) == 0 {
		return a
	}
	m := make(MD, len(a)+len(b))
	for k, v := range a {
		m[k] = v
	}
	for k, v := range b {
		m[k] = v
	}
	return m
}

// rpcHead is what a unary call needs of its request's headers. net/http's
// requests carry their parsed header; the fast path's carry the raw header
// lines (only when some are metadata), parsed into metadata on first use.
type rpcHead struct {
	contentType string
	timeout     string // Connect-Timeout-Ms as sent, unless parsed into timeoutMS
	timeoutMS   uint64 // Connect-Timeout-Ms parsed (0: none)
	encoding    string // Content-Encoding
	header      http.Header
	raw         []byte              // "Name: value\r\n" lines
	watch       func(cancel func()) // fast path: cancel when the caller hangs up
}

// metadata returns the request's metadata.
func (h *rpcHead) metadata() MD {
	if h.header != nil {
		return rpcIncomingMetadata(h.header)
	}
	md := MD{}
	for rest := h.raw; len(rest) > 0; {
		var l []byte
		l, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok {
			continue
		}
		k := textproto.CanonicalMIMEHeaderKey(string(name))
		if _, seen := md[k]; seen || rpcReservedHeaders[k] || strings.HasPrefix(k, "Connect-") {
			continue // the first value counts, as with http.Header.Get
		}
		md[k] = string(bytes.Trim(value, " \t"))
	}
	return md
}

// rpcParseTimeout parses Connect-Timeout-Ms: 1 to 10 digits, not zero.
func rpcParseTimeout(v string) (uint64, bool) {
	if len(v) == 0 || len(v) > 10 {
		return 0, false
	}
	var ms uint64
	for i := 0; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return 0, false
		}
		ms = ms*10 + uint64(v[i]-'0')
	}
	return ms, ms > 0
}

// rpcReservedHeaders are protocol headers, not call metadata.
var rpcReservedHeaders = map[string]bool{
	"Accept": true, "Accept-Encoding": true, "Connection": true, "Content-Encoding": true,
	"Content-Length": true, "Content-Type": true, "Expect": true, "Host": true,
	"Keep-Alive": true, "Te": true, "Trailer": true, "Transfer-Encoding": true,
	"Upgrade": true, "User-Agent": true, "Date": true,
}

func rpcIncomingMetadata(h http.Header) MD {
	md := make(MD, len(h))
	for k, v := range h {
		if rpcReservedHeaders[k] || strings.HasPrefix(k, "Connect-") || len(v) == 0 {
			continue
		}
		md[k] = v[0]
	}
	return md
}

// rpcWireError is the Connect error body.
type rpcWireError struct {
	Code    string          `json:"code"`
	Message string          `json:"message,omitempty"`
	Details []rpcWireDetail `json:"details,omitempty"`
}

type rpcWireDetail struct {
	Type  string `json:"type"`
	Value string `json:"value"` // base64, unpadded
}

// rpcErrorReply encodes err as a Connect error, with status or, if 0, the
// code's status.
func rpcErrorReply(status int, err error) rpcReply {
	e := AsError(err)
	if status == 0 {
		status = e.code().HTTPStatus()
	}
	code := e.code()
	if code > CodeUnauthenticated { // Connect has no codes of its own making
		code = CodeUnknown
	}
	body := rpcWireError{Code: code.String(), Message: e.Message}
	for _, d := range e.Details {
		body.Details = append(body.Details, rpcWireDetail{Type: d.Type, Value: base64.RawStdEncoding.EncodeToString(d.Value)})
	}
	out, _ := json.Marshal(body)
	return rpcReply{status: status, contentType: ContentTypeJSON, md: e.Meta, body: out}
}

// rpcWriteReply writes a reply through net/http.
func rpcWriteReply(w http.ResponseWriter, rep rpcReply) {
	h := w.Header()
	for k, v := range rep.md {
		if rpcSendable(k, v) {
			h.Set(k, v)
		}
	}
	h.Set("Content-Type", rep.contentType)
	h.Set("Content-Length", strconv.Itoa(len(rep.body)))
	w.WriteHeader(rep.status)
	w.Write(rep.body)
}

// rpcReadError turns an error response into an *Error: the Connect body if it
// has one, else a code from the HTTP status.
func rpcReadError(status int, header http.Header, body []byte) *Error {
	var wire rpcWireError
	e := &Error{}
	if json.Unmarshal(body, &wire) == nil && wire.Code != "" {
		code, ok := ParseCode(wire.Code)
		if !ok { // not a Connect code: the body is malformed, the status speaks
			code = errorCodeFromHTTP(status)
		}
		e.Code, e.Message = code, wire.Message
		for _, d := range wire.Details {
			v, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(d.Value, "="))
			if err != nil {
				continue
			}
			e.Details = append(e.Details, ErrorDetail{Type: d.Type, Value: v})
		}
	} else {
		e.Code = errorCodeFromHTTP(status)
		e.Message = fmt.Sprintf("HTTP %d %s", status, http.StatusText(status))
	}
	if e.Message == fmt.Sprintf("HTTP %d %s", status, http.StatusText(status)) {
		// A bare 502/503/504 from a proxy or an overloaded server: the call
		// was not served. (A handler's own unavailable is an answer, and is
		// not sent again.)
		e.retry = e.Code == CodeUnavailable
	}
	e.Meta = rpcResponseMetadata(header)
	return e
}

// rpcResponseMetadata is a reply's metadata: its headers, with unary
// trailers (sent as Trailer-Name headers) under their own names.
func rpcResponseMetadata(h http.Header) MD {
	md := rpcIncomingMetadata(h)
	for k, v := range md {
		if name, ok := strings.CutPrefix(k, "Trailer-"); ok && name != "" {
			delete(md, k)
			md[textproto.CanonicalMIMEHeaderKey(name)] = v
		}
	}
	return md
}

// rpcSendable reports whether metadata k: v may go on the wire: not a
// protocol header (framing, Connect's own), and a valid header.
func rpcSendable(k, v string) bool {
	return !rpcReservedHeaders[k] && !strings.HasPrefix(k, "Connect-") && http1ValidHeader(k, v)
}

// Serve accepts connections on l until Shutdown or Close, when it returns
// nil. Unary calls over HTTP/1.1 take the fast path (see http1.go); every
// other request, HTTP/2 included, is served by net/http on the same port.
// Serve may run for several listeners at once. After Shutdown or Close it
// closes l and returns ErrClosed.
func (s *Server) Serve(l net.Listener) error {
	if _, err := s.httpServer(l.Addr()); err != nil {
		l.Close()
		return err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return nil
			}
			if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(delay):
				case <-s.baseCtx.Done():
				}
				continue
			}
			return err
		}
		delay = 0
		sc := newHTTP1ServerConn(s, c)
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			continue
		}
		s.conns[sc] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		go sc.serve()
	}
}

func (s *Server) untrackConn(sc *http1ServerConn) {
	s.mu.Lock()
	delete(s.conns, sc)
	s.mu.Unlock()
	s.connWG.Done()
}

// httpServer returns the http.Server that serves what the fast path does
// not, started on first use.
func (s *Server) httpServer(addr net.Addr) (*http.Server, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	if s.hs == nil {
		protocols := new(http.Protocols)
		protocols.SetHTTP1(true)
		protocols.SetUnencryptedHTTP2(true)
		s.hs = &http.Server{
			Handler:           s,
			ReadHeaderTimeout: s.opts.readHeaderTimeout,
			IdleTimeout:       s.opts.idleTimeout,
			MaxHeaderBytes:    s.opts.maxHeaderBytes,
			Protocols:         protocols,
			ErrorLog:          slog.NewLogLogger(s.opts.logger.Handler(), slog.LevelDebug),
			BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
		}
		s.h1ln = newHTTP1Listener()
		s.h1ln.addr = addr
		s.hsDone = make(chan struct{})
		hs, ln, done := s.hs, s.h1ln, s.hsDone
		go func() {
			defer close(done)
			hs.Serve(ln)
		}()
	}
	return s.hs, nil
}

// beginClose marks the server closed and returns what must be stopped.
func (s *Server) beginClose() (*http.Server, []net.Listener, []*http1ServerConn) {
	s.draining.Store(true)
	s.closing.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	var ls []net.Listener
	for l := range s.listeners {
		ls = append(ls, l)
	}
	var cs []*http1ServerConn
	for c := range s.conns {
		cs = append(cs, c)
	}
	for _, l := range ls {
		l.Close()
	}
	return s.hs, ls, cs
}

// Shutdown stops accepting, lets calls in flight finish, and returns when
// they have or when ctx ends: then it cancels the contexts of the calls still
// running, closes their connections and returns ctx's error at once (a
// handler that ignores its context may run on). Idle connections close at
// once. /health answers 503 from the start of a shutdown.
func (s *Server) Shutdown(ctx context.Context) error {
	hs, _, conns := s.beginClose()
	for _, sc := range conns {
		if sc.state.CompareAndSwap(http1Idle, http1Closed) {
			sc.c.Close()
		}
	}
	var err error
	if hs != nil {
		if err = hs.Shutdown(ctx); err != nil {
			hs.Close()
		}
	}
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.cancelBase() // handlers waiting on their context give up
		s.mu.Lock()
		for sc := range s.conns {
			sc.c.Close()
		}
		s.mu.Unlock()
		// Handlers that ignore their context may still run; Shutdown keeps
		// its deadline rather than wait for them.
	}
	if hs != nil {
		<-s.hsDone
	}
	s.cancelBase()
	return err
}

// Close stops the server at once: it cancels the contexts of calls in flight
// and closes every connection, then waits for the handlers still running to
// return (a fast-path call runs on its connection's goroutine). It is
// idempotent.
func (s *Server) Close() error {
	s.cancelBase()
	hs, _, conns := s.beginClose()
	for _, sc := range conns {
		sc.c.Close()
	}
	if hs != nil {
		hs.Close()
	}
	s.connWG.Wait()
	if hs != nil {
		<-s.hsDone
	}
	return nil
}

// reopen makes a server that has shut down servable again, with its
// handlers and options: a service started again after Stop keeps its Server.
func (s *Server) reopen() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		return
	}
	s.closed = false
	s.hs, s.h1ln, s.hsDone = nil, nil, nil
	s.closing.Store(false)
	s.draining.Store(false)
	s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
}

// ServerOption configures a [Server]. Every ServerOption is also a
// [ServiceOption] that configures the service's server.
type ServerOption interface {
	ServiceOption
	applyServer(*serverOptions)
}

// MaxBodySize bounds a request body (default 4 MiB); a larger one fails with
// [CodeResourceExhausted] before the handler runs.
func MaxBodySize(n int64) ServerOption {
	return rpcOption{server: func(o *serverOptions) {
		if n > 0 {
			o.maxBodySize = n
		}
	}}
}

// ReadHeaderTimeout bounds how long a client may take to send a request's
// headers (default 10s), so slow clients cannot hold connections.
func ReadHeaderTimeout(d time.Duration) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.readHeaderTimeout = d }}
}

// ReadTimeout bounds reading a unary request's body, and writing its reply
// (default 30s); the handler's own time does not count. Streams are not
// bound by it.
func ReadTimeout(d time.Duration) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.readTimeout = d }}
}

// IdleTimeout closes keep-alive connections idle for d (default 120s).
func IdleTimeout(d time.Duration) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.idleTimeout = d }}
}

// WrapHandler adds server middleware.
func WrapHandler(w ...HandlerWrapper) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.wrappers = append(o.wrappers, w...) }}
}

// serverName tells the server its service's name, for Request.Service.
func serverName(name string) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.name = name }}
}

// Client calls services: it resolves a service's nodes through a registry
// (cached and kept fresh by a watch), picks one with a balancer, and retries
// on another node when a node is down or unavailable. Close releases its
// connections and its watch. A Client is safe for concurrent use.
type Client struct {
	opts    clientOptions
	codecs  *codecSet
	hc      *http.Client // with WithTransport; else the fast path h1
	h1      *http1Client
	h2      *http.Client // streams: h2c, made on first use
	h2once  sync.Once
	ctx     context.Context // ends with Close: so do the client's streams
	stop    context.CancelFunc
	opening sync.WaitGroup // streams' opening goroutines
	openMu  sync.Mutex     // orders opening.Add before Close's Wait
	cache   *registryCache
	budget  *balancerRetryBudget
	call    CallFunc
	closed  atomic.Bool
}

type clientOptions struct {
	registry       Registry
	balancer       Balancer
	transport      http.RoundTripper
	wrappers       []CallWrapper
	streamWrappers []StreamCallWrapper
	codecs         []Codec
	logger         *slog.Logger
	maxRspSize     int64
	connsPerNode   int // 0: the fast path's default
	cacheTTL       time.Duration
	broker         Broker      // for Publish (broker.go)
	call           callOptions // defaults for every call
}

type callOptions struct {
	deadline    time.Time // the call's, when not in its context (set per call)
	nodes       []*Node   // from WithAddress
	timeout     time.Duration
	retries     int
	contentType string
	md          MD
	filters     []Filter
	rspHeader   *MD
}

// NewClient returns a client with the options. Without [WithRegistry] it can
// only make calls that name a node with [WithAddress].
func NewClient(opts ...ClientOption) *Client {
	c := &Client{
		opts: clientOptions{
			logger:     rpcDiscard,
			maxRspSize: 64 << 20,
			cacheTTL:   time.Minute,
			call: callOptions{
				timeout:     10 * time.Second,
				retries:     2,
				contentType: ContentTypeJSON,
			},
		},
	}
	c.ctx, c.stop = context.WithCancel(context.Background())
	c.apply(opts)
	return c
}

func (c *Client) apply(opts []ClientOption) {
	for _, o := range opts {
		o.applyClient(&c.opts)
	}
	if c.opts.balancer == nil {
		c.opts.balancer = NewBalancer(LeastInFlight)
	}
	c.codecs = &codecSet{}
	for _, codec := range c.opts.codecs {
		c.codecs.add(codec)
	}
	if c.cache != nil {
		c.cache.close()
		c.cache = nil
	}
	if c.opts.registry != nil {
		c.cache = newRegistryCache(c.opts.registry, c.opts.cacheTTL)
	}
	c.budget = newBalancerRetryBudget()
	if c.h1 != nil {
		c.h1.close()
		c.h1 = nil
	}
	if c.hc != nil {
		c.hc.CloseIdleConnections()
		c.hc = nil
	}
	if rt := c.opts.transport; rt != nil {
		c.hc = &http.Client{Transport: rt, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		}}
	} else {
		c.h1 = newHTTP1Client()
		switch n := c.opts.connsPerNode; {
		case n > 0:
			c.h1.maxConns = n
		case n < 0:
			c.h1.maxConns = math.MaxInt // never shared
		}
	}
	c.call = c.callService
	for i := len(c.opts.wrappers) - 1; i >= 0; i-- {
		c.call = c.opts.wrappers[i](c.call)
	}
}

// Call calls endpoint ("Greeter.Hello") of service with req and decodes the
// reply into rsp, which must be a pointer. A failure is an *Error: the
// handler's own error with its code, or one made here (CodeUnavailable when no
// node could be reached, CodeDeadlineExceeded when the deadline passed). A ctx
// that has already ended gets its error back at once (CodeCanceled or
// CodeDeadlineExceeded, wrapping ctx.Err()) and nothing is sent.
func (c *Client) Call(ctx context.Context, service, endpoint string, req, rsp any, opts ...CallOption) error {
	md, _ := ctx.Value(rpcOutgoingKey{}).(MD)
	if len(c.opts.wrappers) == 0 {
		r := Request{Service: service, Endpoint: endpoint, Body: req, Header: md} // read only, below
		return c.callService(ctx, &r, rsp, opts...)
	}
	r := &Request{Service: service, Endpoint: endpoint, Body: req}
	r.Header = make(MD, len(md)) // middleware may write to it: its own copy
	for k, v := range md {
		r.Header[k] = v
	}
	return c.call(ctx, r, rsp, opts...)
}

// callService resolves, balances, retries and calls: the CallFunc that the
// wrappers wrap.
func (c *Client) callService(ctx context.Context, req *Request, rsp any, opts ...CallOption) error {
	if c.closed.Load() {
		return &Error{Code: CodeCanceled, Message: "micro: client closed", cause: ErrClosed}
	}
	if err := ctx.Err(); err != nil { // ended already: nothing goes out, not even a lookup
		return AsError(err)
	}
	o := c.opts.call
	for _, opt := range opts {
		opt.applyCall(&o)
	}
	if !rpcValidEndpoint(req.Endpoint) {
		return Errorf(CodeInvalidArgument, "micro: bad endpoint %q; want \"Handler.Method\"", req.Endpoint)
	}
	dot := strings.LastIndexByte(req.Endpoint, '.')
	path := rpcTarget{handler: req.Endpoint[:dot], method: req.Endpoint[dot+1:]} // no string built
	if req.ContentType != "" {
		o.contentType = req.ContentType
	}
	codec := c.codecs.get(o.contentType)
	if codec == nil {
		return Errorf(CodeInvalidArgument, "micro: no codec for content type %q", o.contentType)
	}
	req.ContentType = codec.ContentType()
	body, err := codec.Marshal(req.Body)
	if err != nil {
		return Errorf(CodeInternal, "micro: encoding the request: %w", err)
	}
	deadline, ok := ctx.Deadline()
	if !ok && o.timeout > 0 {
		deadline = time.Now().Add(o.timeout)
		if c.h1 == nil { // net/http needs it in the context; the fast path uses it as is
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, deadline)
			defer cancel()
		}
	}
	o.deadline = deadline
	nodes, err := c.nodes(ctx, req.Service, &o)
	if err != nil {
		return err
	}
	md := req.Header
	if len(o.md) > 0 {
		md = MD{}
		for k, v := range req.Header {
			md[k] = v
		}
		for k, v := range o.md {
			md.Set(k, v)
		}
	}
	for k, v := range md {
		if !rpcSendable(k, v) {
			return Errorf(CodeInvalidArgument, "micro: metadata %q cannot be sent: a protocol header, or not a valid header", k)
		}
	}
	c.budget.deposit()
	var tried []string
	for attempt := 0; ; attempt++ {
		node, done, err := c.opts.balancer.Pick(ctx, rpcUntried(nodes, tried))
		if err != nil {
			return Errorf(CodeUnavailable, "micro: service %s: %w", req.Service, err)
		}
		err = c.attempt(ctx, deadline, node.Address, path, codec, body, md, rsp, &o)
		if done != nil {
			done(err)
		}
		if err == nil {
			return nil
		}
		if !rpcRetryable(err) || ctx.Err() != nil || attempt >= o.retries || !c.budget.withdraw() {
			return err
		}
		tried = append(tried, node.Address)
	}
}

// nodes returns the nodes that may serve a call.
func (c *Client) nodes(ctx context.Context, service string, o *callOptions) ([]*Node, error) {
	if len(o.nodes) > 0 {
		return o.nodes, nil
	}
	if c.cache == nil {
		return nil, Errorf(CodeFailedPrecondition, "micro: client has no registry; call with micro.WithAddress or create it with micro.WithRegistry")
	}
	services, ok := c.cache.peek(service)
	var err error
	if !ok {
		lctx := ctx
		if _, has := ctx.Deadline(); !has && !o.deadline.IsZero() { // the fast path carries its deadline aside
			var cancel context.CancelFunc
			lctx, cancel = context.WithDeadline(ctx, o.deadline)
			defer cancel()
		}
		services, err = c.cache.lookup(lctx, service)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, AsError(ctx.Err())
		}
		return nil, Errorf(CodeUnavailable, "micro: looking up %s: %w", service, err)
	}
	for _, f := range o.filters {
		services = f(services)
	}
	var nodes []*Node
	for _, s := range services {
		for _, n := range s.Nodes {
			if rpcValidAddr(n.Address) && !slices.ContainsFunc(nodes, func(m *Node) bool { return m.Address == n.Address }) {
				nodes = append(nodes, n)
			}
		}
	}
	if len(nodes) == 0 {
		return nil, Errorf(CodeUnavailable, "micro: service %s: %w", service, ErrNoNodes)
	}
	return nodes, nil
}

// Describe returns the full records of a service, one per version:
// endpoints and metadata as each version's first reachable node serves them
// at GET /micro/info (discovery records, mDNS's above all, carry only what
// finding a node needs), with the nodes the registry knows.
func (c *Client) Describe(ctx context.Context, service string) ([]*ServiceInfo, error) {
	if c.cache == nil {
		return nil, Errorf(CodeFailedPrecondition, "micro: client has no registry")
	}
	services, err := c.cache.lookup(ctx, service)
	if err != nil {
		return nil, err
	}
	hc := c.hc
	if hc == nil {
		hc = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	}
	var out []*ServiceInfo
	var errs []error
	for _, s := range services {
		full, err := c.describe(ctx, hc, s)
		if err != nil {
			errs = append(errs, err)
			full = s.Clone()
		}
		out = append(out, full)
	}
	if len(errs) == len(services) {
		return out, Errorf(CodeUnavailable, "micro: describing %s: %w", service, errors.Join(errs...))
	}
	return out, nil
}

func (c *Client) describe(ctx context.Context, hc *http.Client, s *ServiceInfo) (*ServiceInfo, error) {
	var errs []error
	for _, n := range s.Nodes {
		if !rpcValidAddr(n.Address) {
			continue
		}
		u := url.URL{Scheme: "http", Host: n.Address, Path: rpcInfoPath} // escapes an IPv6 zone
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		rsp, err := hc.Do(req)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var info ServiceInfo
		err = json.NewDecoder(io.LimitReader(rsp.Body, c.opts.maxRspSize)).Decode(&info)
		rsp.Body.Close()
		if err == nil && rsp.StatusCode != http.StatusOK {
			err = errors.New(rsp.Status)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n.Address, err))
			continue
		}
		full := s.Clone()
		full.Endpoints, full.Metadata = info.Endpoints, info.Metadata
		return full, nil
	}
	return nil, errors.Join(errs...)
}

// attempt makes one attempt at one node: over the HTTP/1.1 fast path, or
// through the http.RoundTripper given with WithTransport.
func (c *Client) attempt(ctx context.Context, deadline time.Time, addr string, path rpcTarget, codec Codec, body []byte, md MD, rsp any, o *callOptions) error {
	if c.h1 == nil {
		return c.roundTripHTTP(ctx, deadline, addr, path, codec, body, md, rsp, o)
	}
	call := http1Call{addr: addr, path: path, codec: codec, body: body, md: md, deadline: deadline}
	if !rpcValidAddr(addr) {
		return Errorf(CodeInvalidArgument, "micro: bad node address %q", addr)
	}
	head, out, sent, err := c.h1.roundTrip(ctx, &call, c.opts.maxRspSize, o.rspHeader != nil)
	if err != nil {
		return rpcTransportError(ctx, deadline, addr, err, !sent)
	}
	defer http1PutBuf(out)
	return c.finish(&head, *out, codec, rsp, o)
}

// roundTripHTTP makes an attempt through net/http.
func (c *Client) roundTripHTTP(ctx context.Context, deadline time.Time, addr string, path rpcTarget, codec Codec, body []byte, md MD, rsp any, o *callOptions) error {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path.String(), bytes.NewReader(body))
	if err != nil {
		return Errorf(CodeInvalidArgument, "micro: bad address %q: %w", addr, err)
	}
	for k, v := range md {
		hreq.Header.Set(k, v)
	}
	hreq.Header.Set("Content-Type", codec.ContentType())
	hreq.Header.Set("Connect-Protocol-Version", "1")
	if !deadline.IsZero() {
		ms := min(max(time.Until(deadline).Milliseconds(), 1), 9_999_999_999) // at most 10 digits
		hreq.Header.Set("Connect-Timeout-Ms", strconv.FormatInt(ms, 10))
	}
	hrsp, err := c.hc.Do(hreq)
	if err != nil {
		var op *net.OpError
		unsent := errors.As(err, &op) && op.Op == "dial"
		return rpcTransportError(ctx, deadline, addr, err, unsent)
	}
	defer hrsp.Body.Close()
	if hrsp.ContentLength > c.opts.maxRspSize {
		return Errorf(CodeResourceExhausted, "micro: response larger than %d bytes", c.opts.maxRspSize)
	}
	var buf bytes.Buffer
	if hrsp.ContentLength > 0 {
		buf.Grow(int(hrsp.ContentLength))
	}
	n, err := buf.ReadFrom(io.LimitReader(hrsp.Body, c.opts.maxRspSize+1))
	if err != nil {
		return rpcTransportError(ctx, deadline, addr, err, false)
	}
	if n > c.opts.maxRspSize {
		return Errorf(CodeResourceExhausted, "micro: response larger than %d bytes", c.opts.maxRspSize)
	}
	head := http1Head{status: hrsp.StatusCode, ctype: codecMediaType(hrsp.Header.Get("Content-Type")), header: hrsp.Header}
	return c.finish(&head, buf.Bytes(), codec, rsp, o)
}

// finish turns a reply into the call's result: an error from its status and
// body, or the decoded message.
func (c *Client) finish(head *http1Head, body []byte, codec Codec, rsp any, o *callOptions) error {
	if o.rspHeader != nil {
		*o.rspHeader = rpcResponseMetadata(head.header)
	}
	if head.status != http.StatusOK {
		return rpcReadError(head.status, head.header, body)
	}
	if head.ctype != codec.ContentType() {
		return Errorf(CodeInternal, "micro: response content type %q, want %q", head.ctype, codec.ContentType())
	}
	if err := codec.Unmarshal(body, rsp); err != nil {
		return Errorf(CodeInternal, "micro: decoding the response: %w", err)
	}
	return nil
}

// rpcUntried returns the nodes not yet tried by a call, or all of them if
// every one has been.
func rpcUntried(nodes []*Node, tried []string) []*Node {
	if len(tried) == 0 {
		return nodes
	}
	out := make([]*Node, 0, len(nodes))
	for _, n := range nodes {
		if !slices.Contains(tried, n.Address) {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nodes
	}
	return out
}

// rpcTransportError reports a failure to reach a node: the context's error if
// it ended, deadline_exceeded if the call's deadline passed, otherwise
// CodeUnavailable. Unsent says the request cannot have been served (the
// connection was refused, say), so it may be retried on another node.
func rpcTransportError(ctx context.Context, deadline time.Time, addr string, err error, unsent bool) error {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e
	case ctx.Err() != nil:
		return &Error{Code: CodeOf(ctx.Err()), Message: ctx.Err().Error(), cause: err}
	case !deadline.IsZero() && !time.Now().Before(deadline):
		return &Error{Code: CodeDeadlineExceeded, Message: "deadline passed calling node " + addr, cause: err}
	}
	return &Error{Code: CodeUnavailable, Message: "node " + addr + ": " + err.Error(), cause: err, retry: unsent}
}

// rpcRetryable reports whether a failed attempt may be repeated on another
// node: the request was never served (it could not be sent), or the node
// answered unavailable. A call that may have run is not repeated, so a
// handler does not run twice for one call.
func rpcRetryable(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.code() == CodeUnavailable && e.retry
}

// Close releases the client's idle connections and stops its registry
// watch. Calls after Close fail with ErrClosed. It is idempotent.
func (c *Client) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.openMu.Lock() // a stream that saw the client open has counted itself
	c.stop()        // ends the client's streams, and those still opening
	c.openMu.Unlock()
	c.opening.Wait() // whose goroutines end with it
	if c.cache != nil {
		c.cache.close()
	}
	if c.h1 != nil {
		c.h1.close()
	}
	if c.hc != nil {
		c.hc.CloseIdleConnections()
	}
	c.h2once.Do(func() {}) // no stream client after Close
	if c.h2 != nil {
		c.h2.CloseIdleConnections()
	}
	return nil
}

// ClientOption configures a [Client]. Every ClientOption is also a
// [ServiceOption] that configures the service's client.
type ClientOption interface {
	ServiceOption
	applyClient(*clientOptions)
}

// CallOption configures one call. Most are also ClientOptions, setting the
// default for every call of a client.
type CallOption interface {
	applyCall(*callOptions)
}

// ClientCallOption is an option for one call or, given to a client or
// service, for all of its calls.
type ClientCallOption interface {
	ClientOption
	CallOption
	PublishOption // those that mean something to a publish; see PublishOption
}

// WithBalancer sets the client's balancer (default NewBalancer(LeastInFlight)).
func WithBalancer(b Balancer) ClientOption {
	return rpcOption{client: func(o *clientOptions) { o.balancer = b }}
}

// WithTransport makes calls go through rt, a net/http transport (for a proxy
// or an instrumented RoundTripper), instead of the client's own HTTP/1.1 fast path (a pool
// of keep-alive connections per node, up to 256 idle, replies parsed in the
// calling goroutine).
func WithTransport(rt http.RoundTripper) ClientOption {
	return rpcOption{client: func(o *clientOptions) { o.transport = rt }}
}

// WrapCall adds client middleware.
func WrapCall(w ...CallWrapper) ClientOption {
	return rpcOption{client: func(o *clientOptions) { o.wrappers = append(o.wrappers, w...) }}
}

// ConnsPerNode sets how many connections to one node the HTTP/1.1 fast path
// keeps busy with one call each (default 4). Past that, concurrent calls
// share them by HTTP/1.1 pipelining: requests made together leave in one
// write and replies in one read, which is what makes many concurrent calls
// cheap. A call never waits behind one that has run for more than a
// millisecond; it gets another connection instead. A negative n turns
// sharing off: each concurrent call has a connection of its own. It does not
// apply with [WithTransport].
func ConnsPerNode(n int) ClientOption {
	return rpcOption{client: func(o *clientOptions) { o.connsPerNode = n }}
}

// MaxResponseSize bounds a reply the client reads (default 64 MiB).
func MaxResponseSize(n int64) ClientOption {
	return rpcOption{client: func(o *clientOptions) {
		if n > 0 {
			o.maxRspSize = n
		}
	}}
}

// WithAddress sends calls to these node addresses (host:port), skipping
// discovery; with several, they are balanced and retried like discovered
// nodes.
func WithAddress(addr ...string) ClientCallOption {
	nodes := make([]*Node, 0, len(addr)) // made once, shared by every call
	for _, a := range addr {
		if rpcValidAddr(a) {
			nodes = append(nodes, &Node{ID: a, Address: a})
		}
	}
	if len(nodes) == 0 {
		nodes = append(nodes, &Node{ID: "invalid", Address: ""}) // fails as a bad address, not as "no registry"
	}
	return rpcOption{call: func(o *callOptions) { o.nodes = nodes }}
}

// rpcValidAddr reports whether addr is a plausible host:port, with nothing
// that could break a request line.
func rpcValidAddr(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" || port == "" {
		return false
	}
	for i := 0; i < len(addr); i++ {
		c := addr[i]
		if !(c == '.' || c == '-' || c == ':' || c == '[' || c == ']' || c == '%' || c == '_' ||
			'0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// RequestTimeout bounds a call whose context has no deadline (default 10s; 0
// for none). Retries happen within it.
func RequestTimeout(d time.Duration) ClientCallOption {
	return rpcOption{call: func(o *callOptions) { o.timeout = d }}
}

// Retries sets how many times a call is retried on another node after a
// transport failure or CodeUnavailable (default 2). Other errors are never
// retried, and a client-wide budget stops retries when most calls fail.
func Retries(n int) ClientCallOption {
	return rpcOption{call: func(o *callOptions) { o.retries = max(n, 0) }}
}

// ContentType sets the codec calls are encoded with (default
// "application/json").
func ContentType(ct string) ClientCallOption {
	if o, ok := rpcContentTypeOptions[ct]; ok {
		return o
	}
	return rpcContentType(ct)
}

func rpcContentType(ct string) ClientCallOption {
	return rpcOption{call: func(o *callOptions) { o.contentType = ct }}
}

// rpcContentTypeOptions are ContentType's options for the built-in types,
// made once so that a call naming one allocates nothing. Never written after
// init.
var rpcContentTypeOptions = func() map[string]ClientCallOption {
	m := map[string]ClientCallOption{}
	for _, ct := range []string{ContentTypeJSON, ContentTypeProto, ContentTypeGob, ContentTypeBytes, ContentTypeText} {
		m[ct] = rpcContentType(ct)
	}
	return m
}()

// WithMetadata adds metadata (headers) to calls.
func WithMetadata(md MD) ClientCallOption {
	return rpcOption{call: func(o *callOptions) {
		merged := MD{}
		for k, v := range o.md {
			merged[k] = v
		}
		for k, v := range md {
			merged.Set(k, v)
		}
		o.md = merged
	}}
}

// WithFilter narrows the nodes calls may go to (see [FilterVersion] and
// [FilterMetadata]).
func WithFilter(f ...Filter) ClientCallOption {
	return rpcOption{call: func(o *callOptions) { o.filters = append(slices.Clip(o.filters), f...) }}
}

// ResponseHeader stores the reply's metadata (headers) in *md. It applies to
// one call only.
func ResponseHeader(md *MD) CallOption {
	return rpcOption{call: func(o *callOptions) { o.rspHeader = md }, callOnly: true}
}

// rpcOption is every option type: each func set says what it configures.
type rpcOption struct {
	service  func(*serviceOptions)
	server   func(*serverOptions)
	client   func(*clientOptions)
	call     func(*callOptions)
	callOnly bool // call is not a client default
}

func (o rpcOption) applyService(s *serviceOptions) {
	if o.service != nil {
		o.service(s)
	}
	if o.server != nil {
		s.serverOpts = append(s.serverOpts, o)
	}
	if o.client != nil || (o.call != nil && !o.callOnly) {
		s.clientOpts = append(s.clientOpts, o)
	}
}

func (o rpcOption) applyServer(s *serverOptions) {
	if o.server != nil {
		o.server(s)
	}
}

func (o rpcOption) applyClient(c *clientOptions) {
	if o.client != nil {
		o.client(c)
	}
	if o.call != nil && !o.callOnly {
		o.call(&c.call)
	}
}

func (o rpcOption) applyCall(c *callOptions) {
	if o.call != nil {
		o.call(c)
	}
}

var rpcDiscard = slog.New(slog.DiscardHandler)
