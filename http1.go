package micro

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The HTTP/1.1 fast path for unary calls.
//
// Server: Serve runs its own accept loop. Each connection's goroutine peeks
// at the next request's header block; a plain POST to a registered endpoint
// (Content-Length framing, no Transfer-Encoding, Upgrade or unusual Expect,
// headers within one buffer) is parsed by http1Classify and served right
// there, the reply written in one write. Anything else (HTTP/2
// prior knowledge, h2c upgrades, /health, chunked bodies, huge headers,
// HTTP/1.0) hands the connection, with every byte it has buffered, to an
// http.Server on the same port, which keeps it from then on.
//
// Replies to pipelined requests gather and leave in one write, before the
// connection is read again.
//
// Client: see http1_client.go. Its reply parsing is here.

// http1HeaderBuffer is the most header bytes the fast path reads; a larger
// header block goes to net/http, which applies MaxHeaderBytes.
const http1HeaderBuffer = 4096

// http1ReadBuffer is a connection's read buffer, on both sides: large enough
// that one read takes several pipelined requests or replies with their
// bodies.
const http1ReadBuffer = 16 << 10

var (
	http1Past      = time.Unix(1, 0)
	http1HeaderEnd = []byte("\r\n\r\n")
)

// http1BufPool holds buffers for request bodies and replies.
var http1BufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func http1GetBuf(n int) *[]byte {
	bp := http1BufPool.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, 0, n)
	}
	*bp = (*bp)[:0]
	return bp
}

func http1PutBuf(bp *[]byte) {
	if cap(*bp) <= 1<<20 { // huge ones go back to the GC
		http1BufPool.Put(bp)
	}
}

// http1ServerConn is one connection served by the fast path.
type http1ServerConn struct {
	s     *Server
	c     net.Conn
	src   http1ConnReader // what br reads from
	br    *bufio.Reader
	state atomic.Int32 // http1Idle, http1Active or http1Closed

	// A handler that waits on its context learns of a caller who hangs up
	// through a one-byte read in the background, started on its first Done.
	watchFn func(cancel func()) // sc.watch, made once per connection
	bgMu    sync.Mutex
	bgDone  chan struct{} // closed when the background read returns; nil if none
	bgStop  atomic.Bool   // the read is being stopped on purpose
	piped   bool          // the next request was already buffered: nothing to watch

	// Replies to pipelined requests gather in out and leave in one write:
	// before the connection is read again (src flushes), before it goes
	// idle, or from flushT when a handler runs longer than http1HoldReply
	// while earlier replies wait.
	outMu  sync.Mutex
	out    []byte
	werr   error       // a failed write: the connection is done
	flushT *time.Timer // made on first use
}

// http1HoldReply is how long a reply may wait for the next pipelined
// request's handler before it is written on its own.
const http1HoldReply = 50 * time.Microsecond

// http1ConnReader reads from the connection, first replaying a byte the
// background read took.
type http1ConnReader struct {
	sc      *http1ServerConn
	pending []byte
}

func (r *http1ConnReader) Read(p []byte) (int, error) {
	if len(r.pending) > 0 {
		n := copy(p, r.pending)
		r.pending = r.pending[n:]
		return n, nil
	}
	if !r.sc.flush() { // replies gathered so far leave before we wait for more
		return 0, r.sc.werr
	}
	return r.sc.c.Read(p)
}

func newHTTP1ServerConn(s *Server, c net.Conn) *http1ServerConn {
	sc := &http1ServerConn{s: s, c: c}
	sc.src.sc = sc
	sc.br = bufio.NewReaderSize(&sc.src, http1ReadBuffer)
	sc.watchFn = sc.watch
	return sc
}

// watch starts the background read that cancels a handler's context when
// the caller goes away. It runs at most once per request.
func (sc *http1ServerConn) watch(cancel func()) {
	if sc.piped {
		return // the next request is already here: the caller is still there
	}
	sc.bgMu.Lock()
	defer sc.bgMu.Unlock()
	if sc.bgDone != nil {
		return
	}
	done := make(chan struct{})
	sc.bgDone = done
	go func() {
		defer close(done)
		var b [1]byte
		n, err := sc.c.Read(b[:])
		if n == 1 { // a pipelined request begins: keep its byte
			sc.src.pending = append(sc.src.pending[:0], b[0])
			return
		}
		if err != nil && !sc.bgStop.Load() {
			cancel() // the caller hung up
		}
	}()
}

// unwatch stops the background read, if one runs, before the connection is
// read or written again.
func (sc *http1ServerConn) unwatch() {
	sc.bgMu.Lock()
	done := sc.bgDone
	sc.bgDone = nil
	sc.bgMu.Unlock()
	if done == nil {
		return
	}
	sc.bgStop.Store(true)
	sc.c.SetReadDeadline(http1Past)
	<-done
	sc.bgStop.Store(false)
}

const (
	http1Idle int32 = iota
	http1Active
	http1Closed
)

// serve runs the connection until it closes or is handed to net/http.
func (sc *http1ServerConn) serve() {
	s := sc.s
	defer func() {
		sc.outMu.Lock()
		if sc.flushT != nil {
			sc.flushT.Stop()
		}
		sc.outMu.Unlock()
		s.untrackConn(sc)
	}()
	for {
		if s.closing.Load() && sc.br.Buffered() == 0 {
			sc.c.Close()
			return
		}
		if d := s.opts.idleTimeout; d > 0 {
			sc.c.SetReadDeadline(time.Now().Add(d))
		} else {
			sc.c.SetReadDeadline(time.Time{})
		}
		if _, err := sc.br.Peek(1); err != nil {
			sc.c.Close()
			return
		}
		if !sc.state.CompareAndSwap(http1Idle, http1Active) && sc.state.Load() != http1Active {
			sc.c.Close() // Shutdown closed it while idle
			return
		}
		if d := s.opts.readHeaderTimeout; d > 0 {
			sc.c.SetReadDeadline(time.Now().Add(d))
		}
		req, verdict, err := s.http1Classify(sc.br)
		if err != nil {
			sc.c.Close() // slow or broken header: cut off
			return
		}
		switch verdict {
		case http1Reject:
			sc.outMu.Lock()
			sc.out = append(sc.out, "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"...)
			sc.outMu.Unlock()
			sc.flush()
			sc.c.Close()
			return
		case http1Handoff:
			sc.handoff()
			return
		}
		if !sc.serveOne(&req) {
			sc.flush()
			sc.c.Close()
			return
		}
		if sc.br.Buffered() > 0 {
			// The next request is here, pipelined: it is served, and
			// its reply joins this one, before the connection counts as
			// idle again. A shutdown serves it too, with Connection: close,
			// so the caller knows the requests after it were not served.
			continue
		}
		if !sc.flush() || s.closing.Load() {
			sc.c.Close()
			return
		}
		sc.state.Store(http1Idle)
	}
}

// flush writes the replies gathered in out and reports whether the
// connection is still good.
func (sc *http1ServerConn) flush() bool {
	sc.outMu.Lock()
	defer sc.outMu.Unlock()
	if sc.werr == nil && len(sc.out) > 0 {
		if d := sc.s.opts.readTimeout; d > 0 {
			sc.c.SetWriteDeadline(time.Now().Add(d))
		}
		_, sc.werr = sc.c.Write(sc.out)
		sc.out = sc.out[:0]
		if cap(sc.out) > 64<<10 {
			sc.out = nil
		}
	}
	return sc.werr == nil
}

// flushLater flushes out unless stop is called within http1HoldReply: a
// reply does not wait for long behind the next request's handler.
func (sc *http1ServerConn) flushLater() (stop func() bool) {
	sc.outMu.Lock()
	waiting := len(sc.out) > 0
	sc.outMu.Unlock()
	if !waiting {
		return nil
	}
	if sc.flushT == nil {
		sc.flushT = time.AfterFunc(http1HoldReply, func() { sc.flush() })
	} else {
		sc.flushT.Reset(http1HoldReply)
	}
	return sc.flushT.Stop
}

// serveOne serves one request on the fast path, its head already parsed by
// http1Classify, and reports whether the connection may carry another.
func (sc *http1ServerConn) serveOne(req *http1Request) bool {
	s := sc.s
	sc.br.Discard(req.headLen)
	limit := s.opts.maxBodySize
	if req.length > limit {
		// The body is not read, so the connection cannot go on. Unless the
		// caller said it would wait (100-continue), it is writing the body
		// now: closing at once would reset the connection under its write,
		// and it would never read the reply. So half-close and read the body
		// away, within a bound, as net/http does.
		sc.write(rpcErrorReply(0, rpcTooBig(limit)), false)
		sc.flush()
		if !req.expect {
			sc.drain(req.length)
		}
		return false
	}
	if req.expect && int64(sc.br.Buffered()) < req.length {
		sc.outMu.Lock()
		sc.out = append(sc.out, "HTTP/1.1 100 Continue\r\n\r\n"...)
		sc.outMu.Unlock()
		if !sc.flush() {
			return false
		}
	}
	if d := s.opts.readTimeout; d > 0 && int64(sc.br.Buffered()) < req.length {
		sc.c.SetReadDeadline(time.Now().Add(d)) // more of the body is to come
	}
	bp := http1GetBuf(0)
	if err := http1ReadN(sc.br, bp, req.length); err != nil {
		http1PutBuf(bp)
		return false
	}
	sc.piped = sc.br.Buffered() > 0
	req.head.watch = sc.watchFn
	stop := sc.flushLater()
	rep := s.unary(s.baseCtx, req.m, &req.head, *bp)
	if stop != nil {
		stop()
	}
	sc.unwatch()
	http1PutBuf(bp)
	keep := !req.close && !s.closing.Load()
	return sc.write(rep, keep) && keep
}

// http1DrainLimit and http1DrainTime bound how much of a refused body is read
// away before the connection closes.
const (
	http1DrainLimit = 64 << 20
	http1DrainTime  = 2 * time.Second
)

// drain half-closes the connection and discards up to n bytes of the request
// body, within http1DrainLimit and http1DrainTime.
func (sc *http1ServerConn) drain(n int64) {
	if cw, ok := sc.c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	sc.c.SetReadDeadline(time.Now().Add(http1DrainTime))
	io.CopyN(io.Discard, sc.br, min(n, http1DrainLimit))
}

// write adds a reply to out; a large one, or one that would take out past
// 64 KiB, is written at once, by writev after what out holds, its body
// uncopied.
func (sc *http1ServerConn) write(rep rpcReply, keep bool) bool {
	sc.outMu.Lock()
	defer sc.outMu.Unlock()
	if sc.werr != nil {
		return false
	}
	sc.out = http1AppendReplyHeader(sc.out, rep, keep)
	if len(rep.body) <= 64<<10 && len(sc.out)+len(rep.body) <= 64<<10 {
		sc.out = append(sc.out, rep.body...)
		return true
	}
	if d := sc.s.opts.readTimeout; d > 0 {
		sc.c.SetWriteDeadline(time.Now().Add(d))
	}
	bufs := net.Buffers{sc.out, rep.body}
	_, sc.werr = bufs.WriteTo(sc.c)
	sc.out = sc.out[:0]
	return sc.werr == nil
}

// handoff gives the connection, with the bytes already buffered, to the
// http.Server that serves everything but fast-path calls.
func (sc *http1ServerConn) handoff() {
	s := sc.s
	if !sc.flush() {
		sc.c.Close()
		return
	}
	buffered, _ := sc.br.Peek(sc.br.Buffered())
	conn := &http1PrefixConn{Conn: sc.c, prefix: bytes.Clone(buffered)}
	if bytes.HasPrefix(buffered, http1H2Preface) {
		conn.br = bufio.NewReaderSize(sc.c, http1H2ReadBuffer)
		conn.w = new(streamWriter)
		conn.w.init(sc.c)
	}
	sc.c.SetDeadline(time.Time{})
	if !s.h1ln.push(conn) {
		sc.c.Close()
	}
}

// http1Request is a request head the fast path will serve.
type http1Request struct {
	m       *rpcMethod
	headLen int   // bytes of request line and headers, blank line included
	length  int64 // Content-Length
	expect  bool  // Expect: 100-continue
	close   bool  // Connection: close
	head    rpcHead
}

// The verdicts of http1Classify.
const (
	http1Fast    = iota // serve it here
	http1Handoff        // give the connection to net/http
	http1Reject         // refuse it and close
)

// http1Classify reads ahead to the end of the next request's header block and
// parses it, when it is a request the fast path serves: POST HTTP/1.1 to a
// registered endpoint, one Content-Length, a Host, every header a token and a
// clean value, nothing folded, no Transfer-Encoding or Upgrade, Expect only
// 100-continue, all within one buffer. Anything else is handed to net/http,
// except ambiguous framing (Content-Length beside Transfer-Encoding: a
// request smuggling attempt, which RFC 9112 §6.3 lets a server refuse),
// which is refused. An error means the header did not arrive.
func (s *Server) http1Classify(br *bufio.Reader) (req http1Request, verdict int, err error) {
	hdr, err := http1PeekHead(br, http1HeaderBuffer)
	if err != nil {
		return req, 0, err
	}
	if hdr == nil {
		return req, http1Handoff, nil // a big header: net/http's limits apply
	}
	req.headLen = len(hdr) + 2
	line, rest, _ := bytes.Cut(hdr, []byte("\r\n"))
	lengths, hosts, chunked, odd, meta := 0, 0, false, false, false
	var seen [5]bool // content-type, connect-timeout-ms, content-encoding, connection, expect
	once := func(i int) {
		if seen[i] {
			odd = true // a repeated header: proxies and net/http read the first; let net/http judge
		}
		seen[i] = true
	}
	for len(rest) > 0 {
		var l []byte
		l, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok || len(name) == 0 || !http1Token(name) {
			odd = true // folding, a space before the colon, a bare LF: let net/http judge
			continue
		}
		value = bytes.Trim(value, " \t")
		for _, c := range value {
			if (c < ' ' && c != '\t') || c == 0x7f {
				odd = true
			}
		}
		switch {
		case http1EqualFold(name, "content-length"):
			lengths++
			req.length = http1ParseLength(value)
			if req.length < 0 {
				odd = true
			}
		case http1EqualFold(name, "transfer-encoding"):
			chunked = true
		case http1EqualFold(name, "content-type"):
			once(0)
			req.head.contentType = http1Intern(value)
		case http1EqualFold(name, "connect-timeout-ms"):
			once(1)
			if ms, ok := rpcParseTimeout(string(value)); ok { // no allocation: the conversion stays on the stack
				req.head.timeoutMS = ms
			} else {
				req.head.timeout = string(value) // refused in unary, with the value quoted
			}
		case http1EqualFold(name, "content-encoding"):
			once(2)
			req.head.encoding = string(value)
		case http1EqualFold(name, "host"):
			hosts++
			if !http1ValidHost(value) {
				odd = true
			}
		case http1EqualFold(name, "connection"):
			once(3)
			switch {
			case http1EqualFold(value, "close"):
				req.close = true
			case len(value) > 0 && !http1EqualFold(value, "keep-alive"):
				odd = true // a list of options: net/http reads those
			}
		case http1EqualFold(name, "upgrade"):
			odd = true
		case http1EqualFold(name, "expect"):
			once(4)
			if !http1EqualFold(value, "100-continue") {
				odd = true
			}
			req.expect = true
		case !http1EqualFold(name, "content-length") && !http1Protocol(name):
			meta = true
		}
	}
	if chunked && lengths > 0 {
		return req, http1Reject, nil
	}
	method, line, ok1 := bytes.Cut(line, []byte(" "))
	target, proto, ok2 := bytes.Cut(line, []byte(" "))
	if odd || chunked || lengths > 1 || hosts != 1 || !ok1 || !ok2 ||
		string(method) != http.MethodPost || string(proto) != "HTTP/1.1" {
		return req, http1Handoff, nil
	}
	s.mu.RLock()
	req.m = s.methods[string(target)]
	s.mu.RUnlock()
	if req.m == nil || req.m.stream != streamNone {
		return req, http1Handoff, nil // streams are served by net/http
	}
	if meta { // the handler may ask for its metadata: keep the lines
		_, lines, _ := bytes.Cut(hdr, []byte("\r\n"))
		req.head.raw = bytes.Clone(lines)
	}
	return req, http1Fast, nil
}

// http1ValidHost reports whether a Host value is a plain host[:port]
// (net/http refuses anything else with 400).
func http1ValidHost(v []byte) bool {
	for _, c := range v {
		if !(c == '.' || c == '-' || c == ':' || c == '[' || c == ']' || c == '%' || c == '_' ||
			'0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// http1ParseLength parses a Content-Length: digits only, or -1.
func http1ParseLength(v []byte) int64 {
	if len(v) == 0 || len(v) > 18 {
		return -1
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// http1Interned are header values common enough to keep one string of.
var http1Interned = map[string]string{
	ContentTypeJSON: ContentTypeJSON, ContentTypeProto: ContentTypeProto, ContentTypeBytes: ContentTypeBytes,
	ContentTypeGob: ContentTypeGob, ContentTypeText: ContentTypeText, "application/json; charset=utf-8": "application/json; charset=utf-8",
}

// http1Intern returns v as a string, without allocating for common values.
func http1Intern(v []byte) string {
	if s, ok := http1Interned[string(v)]; ok {
		return s
	}
	return string(v)
}

// http1Protocol reports whether a header name is one of the protocol's own
// (not metadata), so a request with nothing else keeps no header bytes.
func http1Protocol(name []byte) bool {
	for _, p := range [...]string{"host", "content-type", "content-length", "accept", "accept-encoding",
		"user-agent", "connect-protocol-version", "connect-timeout-ms", "connection", "te", "date"} {
		if http1EqualFold(name, p) {
			return true
		}
	}
	return false
}

// http1EqualFold compares b with s, ignoring ASCII case.
func http1EqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// http1AppendReplyHeader appends the status line and headers of a reply.
func http1AppendReplyHeader(b []byte, rep rpcReply, keep bool) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(rep.status), 10)
	b = append(b, ' ')
	b = append(b, http.StatusText(rep.status)...)
	b = append(b, "\r\nContent-Type: "...)
	b = append(b, rep.contentType...)
	b = append(b, "\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(rep.body)), 10)
	b = append(b, "\r\nDate: "...)
	b = append(b, http1Date()...)
	for k, v := range rep.md {
		if rpcSendable(k, v) {
			b = append(b, "\r\n"...)
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
		}
	}
	if !keep {
		b = append(b, "\r\nConnection: close"...)
	}
	return append(b, "\r\n\r\n"...)
}

// http1Date returns the Date header value, formatted once a second.
func http1Date() string {
	now := time.Now()
	sec := now.Unix()
	if d := http1DateCache.Load(); d != nil && d.sec == sec {
		return d.text
	}
	d := &http1DateValue{sec: sec, text: now.UTC().Format(http.TimeFormat)}
	http1DateCache.Store(d)
	return d.text
}

type http1DateValue struct {
	sec  int64
	text string
}

var http1DateCache atomic.Pointer[http1DateValue]

// http1ValidHeader reports whether k: v can be sent: k a token, v without
// control characters other than tab. Metadata that is not is never sent, so
// it cannot split a message.
func http1ValidHeader(k, v string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if !http1TokenChar[k[i]] {
			return false
		}
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// http1PrefixConn replays bytes already read from a connection before
// reading on. An HTTP/2 connection reads on through br: net/http's HTTP/2
// server reads each frame's 9-byte header and then its payload straight from
// the connection, two reads a frame, which the buffer makes one read for as
// many frames as have arrived. (A read at least as large as the buffer, with
// nothing buffered, goes straight to the connection, uncopied.)
type http1PrefixConn struct {
	net.Conn
	prefix []byte
	br     *bufio.Reader // nil: unbuffered (HTTP/1, whose server buffers)
	w      *streamWriter // HTTP/2: writes gathered; nil: straight through
}

// http1H2Preface starts an HTTP/2 prior-knowledge connection (RFC 9113
// §3.4); http1H2ReadBuffer is the read buffer such a connection gets.
var http1H2Preface = []byte("PRI * HTTP/2.0\r\n")

const http1H2ReadBuffer = 32 << 10

func (c *http1PrefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	if c.br != nil {
		return c.br.Read(p)
	}
	return c.Conn.Read(p)
}

func (c *http1PrefixConn) Write(p []byte) (int, error) {
	if c.w != nil {
		return c.w.Write(p)
	}
	return c.Conn.Write(p)
}

func (c *http1PrefixConn) Close() error {
	if c.w != nil {
		return c.w.close()
	}
	return c.Conn.Close()
}

// CloseWrite lets net/http half-close the connection, as it does for a
// *net.TCPConn.
func (c *http1PrefixConn) CloseWrite() error {
	if c.w != nil {
		c.w.flush()
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// http1Listener feeds handed-off connections to the http.Server.
type http1Listener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newHTTP1Listener() *http1Listener {
	return &http1Listener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *http1Listener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *http1Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *http1Listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *http1Listener) Addr() net.Addr {
	if l.addr == nil {
		return &net.TCPAddr{IP: net.IPv4zero}
	}
	return l.addr
}

// http1Head is what a client needs of a reply's head.
type http1Head struct {
	status int
	length int64       // Content-Length; -1 if none
	close  bool        // the connection carries nothing more after this reply
	final  bool        // the server said so (Connection: close, or HTTP/1.0 without keep-alive): it served no request after this one
	ctype  string      // media type of Content-Type, without parameters
	header http.Header // every header, when asked for or not 200; else nil
}

// http1ReadHead reads a reply's status line and headers. Replies framed by
// Content-Length (our servers' and most others') are parsed here without
// allocating, and their body is left to read. Anything else (chunked or
// close-delimited bodies, odd headers) goes through http.ReadResponse, whose
// body is read here and returned as pre. The media type is wantCT itself when
// it matches, so a normal reply costs no string.
func http1ReadHead(br *bufio.Reader, wantCT string, headers bool, maxRsp int64) (h http1Head, pre []byte, err error) {
	h.length = -1
	hdr, err := http1PeekHead(br, br.Size())
	if err != nil {
		return h, nil, err
	}
	if hdr != nil && http1ParseHead(hdr, wantCT, headers, &h) {
		br.Discard(len(hdr) + 2)
		return h, nil, nil
	}
	// net/http reads this one, through a limit (its header reading has
	// none of its own), and the connection is closed after it: its reader
	// may have taken bytes past the reply.
	lim := bufio.NewReader(&io.LimitedReader{R: br, N: http1MaxForeignHead + maxRsp})
	var rsp *http.Response
	for informational := 0; ; informational++ {
		if rsp, err = http.ReadResponse(lim, nil); err != nil {
			return h, nil, err
		}
		if rsp.StatusCode >= 200 || rsp.StatusCode == http.StatusSwitchingProtocols || informational == 5 {
			break
		}
	}
	h = http1Head{status: rsp.StatusCode, length: rsp.ContentLength, close: true, final: rsp.Close, header: rsp.Header}
	h.ctype = codecMediaType(rsp.Header.Get("Content-Type"))
	if h.ctype == wantCT {
		h.ctype = wantCT
	}
	if rsp.StatusCode < 200 {
		return h, nil, nil
	}
	if rsp.ContentLength > maxRsp {
		return h, nil, Errorf(CodeResourceExhausted, "micro: response larger than %d bytes", maxRsp)
	}
	// Never drained on an error: the connection is closed instead.
	pre, err = io.ReadAll(io.LimitReader(rsp.Body, maxRsp+1))
	if err == nil && int64(len(pre)) > maxRsp {
		err = Errorf(CodeResourceExhausted, "micro: response larger than %d bytes", maxRsp)
	}
	if pre == nil {
		pre = []byte{}
	}
	h.length = int64(len(pre))
	return h, pre, err
}

// http1MaxForeignHead bounds the head of a reply that goes through net/http.
const http1MaxForeignHead = 1 << 20

// http1PeekHead returns the buffered header block up to its final CRLF
// (without the blank line), reading more as needed, or nil if it does not
// fit in limit bytes (or the buffer).
func http1PeekHead(br *bufio.Reader, limit int) ([]byte, error) {
	limit = min(limit, br.Size())
	for {
		b, _ := br.Peek(br.Buffered())
		if i := bytes.Index(b, http1HeaderEnd); i >= 0 && i+4 <= limit {
			return b[:i+2], nil
		}
		if len(b) >= limit {
			return nil, nil
		}
		if _, err := br.Peek(len(b) + 1); err != nil {
			return nil, err
		}
	}
}

// http1ParseHead parses a simple reply head into h, or returns false to let
// net/http parse it.
func http1ParseHead(hdr []byte, wantCT string, headers bool, h *http1Head) bool {
	line, rest, _ := bytes.Cut(hdr, []byte("\r\n"))
	if len(line) < 12 || line[8] != ' ' || (len(line) > 12 && line[12] != ' ') {
		return false
	}
	old := false // HTTP/1.0: persistent only with Connection: keep-alive
	switch string(line[:8]) {
	case "HTTP/1.1":
	case "HTTP/1.0":
		// Not reused either way; final unless it says keep-alive (RFC 9112
		// §C.2.2), as net/http's Response.Close reads it: a keep-alive
		// server may have served the calls pipelined after this one, and
		// they must not be sent again.
		old, h.close, h.final = true, true, true
	default:
		return false
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return false
		}
		h.status = h.status*10 + int(c-'0')
	}
	if h.status < 100 {
		return false // not a status: net/http decides what it is
	}
	for _, c := range line[12:] { // the reason phrase: no control bytes, no bare LF
		if (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	if headers || h.status != http.StatusOK {
		h.header = make(http.Header, 8)
	}
	for len(rest) > 0 {
		var l []byte
		l, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok || len(name) == 0 || !http1Token(name) {
			return false
		}
		value = bytes.Trim(value, " \t")
		for _, c := range value {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return false
			}
		}
		switch {
		case http1EqualFold(name, "content-length"):
			if h.length >= 0 || len(value) == 0 || len(value) > 18 {
				return false
			}
			h.length = 0
			for _, c := range value {
				if c < '0' || c > '9' {
					return false
				}
				h.length = h.length*10 + int64(c-'0')
			}
		case http1EqualFold(name, "transfer-encoding"):
			return false
		case http1EqualFold(name, "connection"):
			switch {
			case http1EqualFold(value, "close"):
				h.close, h.final, old = true, true, false
			case http1EqualFold(value, "keep-alive"):
				if old {
					h.final = false
				}
			case len(value) > 0:
				return false // a list of options: net/http reads those
			}
		case http1EqualFold(name, "content-type"):
			mt, _, _ := bytes.Cut(value, []byte(";"))
			mt = bytes.TrimSpace(mt)
			if http1EqualFold(mt, wantCT) {
				h.ctype = wantCT
			} else {
				h.ctype = strings.ToLower(string(mt))
			}
		}
		if h.header != nil {
			h.header.Add(string(name), string(value))
		}
	}
	if h.status < 200 || h.status == http.StatusNoContent || h.status == http.StatusNotModified {
		h.length = 0 // never a body, whatever the header says (RFC 9112 §6.3)
		return true
	}
	return h.length >= 0 // no length: let net/http read it
}

// http1Token reports whether b is an HTTP token (a header name).
func http1Token(b []byte) bool {
	for _, c := range b {
		if !http1TokenChar[c] {
			return false
		}
	}
	return true
}

// http1TokenChar marks the bytes a token may hold (RFC 9110 §5.6.2). Never
// written after init.
var http1TokenChar = func() (t [256]bool) {
	for c := '!'; c <= '~'; c++ {
		t[c] = !strings.ContainsRune("\"(),/:;<=>?@[\\]{}", c)
	}
	return t
}()

// http1ReadN reads exactly n bytes into *bp, growing it as the bytes arrive
// rather than trusting n up front.
func http1ReadN(br *bufio.Reader, bp *[]byte, n int64) error {
	b := (*bp)[:0]
	for int64(len(b)) < n {
		if len(b) == cap(b) {
			b = slices.Grow(b, int(min(n-int64(len(b)), int64(max(cap(b), 4096)))))
		}
		m, err := br.Read(b[len(b):int(min(int64(cap(b)), n))])
		b = b[:len(b)+m]
		if err != nil {
			*bp = b
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	*bp = b
	return nil
}

// http1Stale reports whether an error on a reused connection means the server
// had closed it before our request: the request was not served.
func http1Stale(err error) bool {
	return errors.Is(err, io.EOF) || http1Reset(err)
}

// http1AppendRequest appends a call's request line and headers.
func http1AppendRequest(b []byte, call *http1Call) []byte {
	b = append(b, "POST /"...)
	b = append(b, call.path.handler...)
	b = append(b, '/')
	b = append(b, call.path.method...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, call.addr...)
	b = append(b, "\r\nContent-Type: "...)
	b = append(b, call.codec.ContentType()...)
	b = append(b, "\r\nConnect-Protocol-Version: 1\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(call.body)), 10)
	if !call.deadline.IsZero() {
		b = append(b, "\r\nConnect-Timeout-Ms: "...)
		b = strconv.AppendInt(b, min(max(time.Until(call.deadline).Milliseconds(), 1), 9_999_999_999), 10)
	}
	for k, v := range call.md {
		b = append(b, "\r\n"...)
		b = append(b, k...)
		b = append(b, ": "...)
		b = append(b, v...)
	}
	return append(b, "\r\n\r\n"...)
}
