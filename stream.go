package micro

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Streaming RPC over the Connect streaming protocol
// (https://connectrpc.com/docs/protocol#streaming-rpcs): a POST with
// Content-Type application/connect+<codec> whose bodies are envelopes (a
// flags byte, a big-endian uint32 length, the message), the response ending
// with an end-of-stream envelope that carries the error and trailers as JSON.
// A client may compress its messages (Connect-Content-Encoding: gzip, and
// the envelope's compressed flag), which the server undoes within its size
// limit; the server's messages, and our client's, go uncompressed.
// Streams run over HTTP/2 (cleartext h2c on our ports), where each stream
// has its own flow control: a slow reader holds up its writer, no message is
// queued without bound, and one stream's failure leaves the others on the
// connection alone.

// Stream is one streaming call, seen from either end.
//
// On the server, a handler of the form
//
//	func (h *T) Chat(ctx context.Context, stream *micro.Stream) error
//
// serves client-, server- and bidirectional streams: Recv reads the
// caller's messages (io.EOF once the caller has closed its side) and Send
// writes replies. A server-streaming handler may take its one request as an
// argument instead:
//
//	func (h *T) Watch(ctx context.Context, req *Req, stream *micro.Stream) error
//
// Returning ends the stream, sending the error (with its code) or success.
//
// On the client, [Client.Stream] opens one; Send writes, CloseSend closes the
// sending side, and Recv reads until io.EOF (the handler returned nil) or the
// handler's error. A Stream is done when Recv has returned an error or Close
// was called; Close releases it early, and so does closing the Client. To a
// server-streaming endpoint, Send the one request and then CloseSend:
// connect-go servers wait for the end of the request before they answer.
//
// One goroutine may Send while another Recvs; two may not Send (or Recv) at
// once.
type Stream struct {
	ctx    context.Context
	cancel context.CancelFunc
	codec  Codec
	max    int64 // the largest message either way

	// reading
	r      io.Reader
	br     *bufio.Reader // reads r, made on the first Recv
	rhdr   [5]byte
	rbuf   []byte
	header MD   // the response's headers (client)
	gzipIn bool // server: the client may compress its messages (Connect-Content-Encoding: gzip)
	rmu    sync.Mutex
	rerr   error // the result once the stream has ended, for every later Recv
	trail  MD    // end-of-stream metadata (client: received; server: to send)

	// writing
	wmu     sync.Mutex
	w       io.Writer
	pw      *streamPipe
	wclosed bool
	wbuf    []byte

	server bool
	sealed bool          // server: trailers taken, under rmu
	done   func(error)   // client: the balancer's report
	body   io.Closer     // client: the response body
	ready  chan struct{} // client: closed once the response has begun (or failed)
	oerr   error         // client: why it could not open, once ready
	once   sync.Once
}

// streamMaxMessage is the default limit on one message (4 MiB).
const streamMaxMessage = 4 << 20

// streamReadBuffer is what a stream's reads gather: several small messages
// that arrived together are taken in one read of the body. (A message at
// least this large is read straight into its buffer.)
const streamReadBuffer = 16 << 10

// Context returns the stream's context: on the server the call's (it ends
// when the caller goes away or its deadline passes), on the client the one
// the stream was opened with.
func (s *Stream) Context() context.Context { return s.ctx }

// Header returns the metadata the server sent with its first message (client
// side). It waits for that, or for the stream to end.
func (s *Stream) Header() MD {
	if s.ready != nil {
		<-s.ready
	}
	return s.header
}

// Trailer returns the metadata the server sent at the end of the stream,
// once Recv has returned io.EOF or an error (client side).
func (s *Stream) Trailer() MD {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return s.trail
}

// SetTrailer adds metadata the caller receives at the end of the stream
// (server side; before the handler returns).
func (s *Stream) SetTrailer(key, value string) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if s.sealed {
		return // the stream has ended
	}
	if s.trail == nil {
		s.trail = MD{}
	}
	s.trail.Set(key, value)
}

// Send encodes msg and writes it to the peer; msg may be reused once Send
// returns. It blocks while the peer is not reading (flow control). On the
// client it returns io.EOF once the stream has ended; Recv then tells how.
func (s *Stream) Send(msg any) error {
	b, err := s.codec.Marshal(msg)
	if err != nil {
		return Errorf(CodeInternal, "micro: encoding a stream message: %w", err)
	}
	if int64(len(b)) > s.max {
		return Errorf(CodeResourceExhausted, "micro: stream message of %d bytes, larger than %d", len(b), s.max)
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.wclosed {
		return Errorf(CodeFailedPrecondition, "micro: Send after CloseSend")
	}
	s.wbuf = streamAppendEnvelope(s.wbuf[:0], 0, b)
	if _, err := s.w.Write(s.wbuf); err != nil {
		if !s.server {
			return io.EOF
		}
		return streamWireError(s.ctx, err)
	}
	return nil
}

// CloseSend closes the client's sending side: the handler's Recv returns
// io.EOF after the last message. It is idempotent. Servers end their side by
// returning from the handler.
func (s *Stream) CloseSend() error {
	if s.server {
		return errors.New("micro: CloseSend on a server stream; return from the handler instead")
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.wclosed {
		s.wclosed = true
		s.pw.Close()
	}
	return nil
}

// Recv reads the next message into msg. It returns io.EOF when the peer has
// finished cleanly (the caller closed its side, or the handler returned
// nil), and the peer's error (an *Error with its code) otherwise.
func (s *Stream) Recv(msg any) error {
	s.rmu.Lock()
	if s.rerr != nil {
		err := s.rerr
		s.rmu.Unlock()
		return err
	}
	s.rmu.Unlock()
	if s.ready != nil {
		<-s.ready // the server's reply has begun
		if s.oerr != nil {
			return s.end(s.oerr)
		}
	}
	if s.br == nil {
		// Every read of net/http's HTTP/2 body is a hand-off to the
		// connection's goroutine, and may send a WINDOW_UPDATE: read what
		// has arrived at once, not an envelope header and message apart.
		s.br = bufio.NewReaderSize(s.r, streamReadBuffer)
	}
	flags, data, err := streamReadEnvelope(s.br, &s.rhdr, &s.rbuf, s.max)
	switch {
	case err == io.EOF && s.server:
		return s.end(io.EOF) // the caller closed its side
	case err == io.EOF:
		return s.end(Errorf(CodeInternal, "micro: stream ended without an end-of-stream message"))
	case err != nil:
		var e *Error
		if errors.As(err, &e) {
			return s.end(e)
		}
		return s.end(streamWireError(s.ctx, err))
	}
	if flags&streamFlagEnd != 0 && s.server {
		return s.end(Errorf(CodeInvalidArgument, "micro: end-of-stream flag from a client"))
	}
	if flags&streamFlagCompressed != 0 {
		switch {
		case !s.server: // our client asks for no compression
			return s.end(Errorf(CodeInternal, "micro: protocol error: a compressed stream message, though none was asked for"))
		case !s.gzipIn:
			return s.end(Errorf(CodeInvalidArgument, "micro: a compressed stream message, with no Connect-Content-Encoding"))
		}
		if data, err = streamGunzip(data, s.max); err != nil {
			return s.end(err)
		}
	}
	if flags&streamFlagEnd != 0 {
		return s.end(s.readEnd(data))
	}
	if err := s.codec.Unmarshal(data, msg); err != nil {
		if s.server {
			return Errorf(CodeInvalidArgument, "micro: decoding a stream message: %v", err)
		}
		return s.end(Errorf(CodeInternal, "micro: decoding a stream message: %v", err)) // out of step: done
	}
	return nil
}

// end records the stream's result (every later Recv returns it) and, on the
// client, releases the stream.
func (s *Stream) end(err error) error {
	s.rmu.Lock()
	if s.rerr == nil {
		s.rerr = err
	}
	err = s.rerr
	s.rmu.Unlock()
	if !s.server {
		s.release(err)
	}
	return err
}

// readEnd parses an end-of-stream message: nil for success (returned as
// io.EOF), or the error.
func (s *Stream) readEnd(data []byte) error {
	var end streamEnd
	if err := json.Unmarshal(data, &end); err != nil {
		return Errorf(CodeInternal, "micro: malformed end-of-stream message: %v", err)
	}
	md := MD{}
	for k, vs := range end.Metadata {
		if len(vs) > 0 {
			md.Set(k, vs[0])
		}
	}
	s.rmu.Lock()
	s.trail = md
	s.rmu.Unlock()
	if end.Error == nil {
		return io.EOF
	}
	e := &Error{Message: end.Error.Message, Meta: md}
	code, ok := ParseCode(end.Error.Code)
	if !ok {
		code = CodeUnknown
	}
	e.Code = code
	for _, d := range end.Error.Details {
		if v, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(d.Value, "=")); err == nil {
			e.Details = append(e.Details, ErrorDetail{Type: d.Type, Value: v})
		}
	}
	return e
}

// Close ends a client stream early: the server's context is canceled and
// the stream's resources released. It is idempotent, and not needed once
// Recv has returned an error or io.EOF.
func (s *Stream) Close() error {
	if s.server {
		return nil
	}
	s.end(Errorf(CodeCanceled, "micro: stream closed"))
	return nil
}

// release frees a client stream once: the request is canceled, the body
// closed, the balancer told.
func (s *Stream) release(err error) {
	s.once.Do(func() {
		s.cancel()
		s.pw.CloseWithError(io.ErrClosedPipe)
		if s.ready != nil {
			<-s.ready // the opening goroutine has ended (the cancel ends it)
		}
		if s.body != nil {
			s.body.Close()
		}
		if s.done != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			s.done(err)
		}
	})
}

// streamEnd is the end-of-stream message.
type streamEnd struct {
	Error    *rpcWireError       `json:"error,omitempty"`
	Metadata map[string][]string `json:"metadata,omitempty"`
}

// streamGunzip undoes a message's compression, within limit.
func streamGunzip(data []byte, limit int64) ([]byte, error) {
	out, err := rpcDecodeBody(data, "gzip", limit)
	if CodeOf(err) == CodeResourceExhausted {
		return nil, Errorf(CodeResourceExhausted, "micro: stream message larger than %d bytes once decompressed", limit)
	}
	var e *Error
	if errors.As(err, &e) {
		return nil, Errorf(CodeInvalidArgument, "micro: compressed stream message: %s", e.Message)
	}
	return out, err
}

// The envelope flags.
const (
	streamFlagCompressed = 0x01
	streamFlagEnd        = 0x02
)

func streamAppendEnvelope(b []byte, flags byte, msg []byte) []byte {
	b = append(b, flags, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(b[len(b)-4:], uint32(len(msg)))
	return append(b, msg...)
}

// streamReadEnvelope reads one envelope. A clean end before it starts is
// io.EOF; a torn one, or one larger than limit, is an *Error. The message is
// read into *buf, grown as its bytes arrive.
func streamReadEnvelope(r io.Reader, hdr *[5]byte, buf *[]byte, limit int64) (flags byte, msg []byte, err error) {
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if err == io.EOF {
			return 0, nil, io.EOF
		}
		if err == io.ErrUnexpectedEOF {
			return 0, nil, Errorf(CodeInvalidArgument, "micro: truncated stream envelope")
		}
		return 0, nil, err
	}
	n := int64(binary.BigEndian.Uint32(hdr[1:]))
	if n > limit {
		return 0, nil, Errorf(CodeResourceExhausted, "micro: stream message of %d bytes, larger than %d", n, limit)
	}
	b := (*buf)[:0]
	for int64(len(b)) < n {
		if len(b) == cap(b) {
			b = append(b[:cap(b)], make([]byte, min(n-int64(len(b)), int64(max(cap(b), 4096))))...)[:len(b)]
		}
		m, err := r.Read(b[len(b):int(min(int64(cap(b)), n))])
		b = b[:len(b)+m]
		if err != nil && int64(len(b)) < n {
			*buf = b
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return 0, nil, Errorf(CodeInvalidArgument, "micro: truncated stream message")
			}
			return 0, nil, err
		}
	}
	*buf = b
	return hdr[0], b, nil
}

// streamWireError reports a broken stream: the context's error if it ended,
// otherwise unavailable.
func streamWireError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return &Error{Code: CodeOf(ctx.Err()), Message: ctx.Err().Error(), cause: err}
	}
	return &Error{Code: CodeUnavailable, Message: "micro: stream broken: " + err.Error(), cause: err}
}

// streamCodecName is the codec's name in a streaming content type:
// application/json → json, text/plain → plain.
func streamCodecName(contentType string) string {
	_, name, _ := strings.Cut(contentType, "/")
	return name
}

// streamCodec returns the codec for application/connect+<name>, or nil.
func streamCodec(set *codecSet, contentType string) Codec {
	name, ok := strings.CutPrefix(codecMediaType(contentType), "application/connect+")
	if !ok || name == "" {
		return nil
	}
	if c := set.get("application/" + name); c != nil {
		return c
	}
	return set.get("text/" + name)
}

// StreamHandlerFunc serves a stream; for a server-streaming endpoint,
// req.Body holds the one request.
type StreamHandlerFunc func(ctx context.Context, req *Request, stream *Stream) error

// StreamWrapper is server middleware for streams, as HandlerWrapper is for
// unary calls.
type StreamWrapper func(StreamHandlerFunc) StreamHandlerFunc

// StreamCallFunc opens a stream.
type StreamCallFunc func(ctx context.Context, req *Request, opts ...CallOption) (*Stream, error)

// StreamCallWrapper is client middleware for streams, as CallWrapper is for
// unary calls.
type StreamCallWrapper func(StreamCallFunc) StreamCallFunc

// WrapStream adds server middleware for streams.
func WrapStream(w ...StreamWrapper) ServerOption {
	return rpcOption{server: func(o *serverOptions) { o.streamWrappers = append(o.streamWrappers, w...) }}
}

// WrapStreamCall adds client middleware for streams.
func WrapStreamCall(w ...StreamCallWrapper) ClientOption {
	return rpcOption{client: func(o *clientOptions) { o.streamWrappers = append(o.streamWrappers, w...) }}
}

// The kinds of endpoint.
const (
	streamNone   = iota // unary
	streamBidi          // func(ctx, *Stream) error: client, server or both
	streamServer        // func(ctx, *Req, *Stream) error
)

var streamType = reflect.TypeFor[*Stream]()

// streamKind tells a method's stream form, if it has one.
func streamKind(mt reflect.Type) int {
	switch {
	case mt.NumIn() == 3 && mt.In(2) == streamType && mt.NumOut() == 1 && mt.Out(0) == rpcErrorType:
		return streamBidi
	case mt.NumIn() == 4 && mt.In(3) == streamType && mt.NumOut() == 1 && mt.Out(0) == rpcErrorType:
		return streamServer
	}
	return streamNone
}

// callStream invokes a stream method.
func (m *rpcMethod) callStream(ctx context.Context, req *Request, stream *Stream) error {
	args := []reflect.Value{m.recv, reflect.ValueOf(ctx)}
	if m.stream == streamServer {
		args = append(args, reflect.ValueOf(req.Body))
	}
	out := m.fn.Call(append(args, reflect.ValueOf(stream)))
	err, _ := out[0].Interface().(error)
	return err
}

// serveStream serves a Connect streaming call to m through net/http.
func (s *Server) serveStream(w http.ResponseWriter, r *http.Request, m *rpcMethod) {
	ct := r.Header.Get("Content-Type")
	codec := streamCodec(s.codecs, ct)
	if codec == nil || m.stream == streamNone {
		w.Header().Set("Accept-Post", "application/connect+json, application/connect+proto")
		why := fmt.Sprintf("unsupported content type %q", ct)
		if m.stream == streamNone {
			why = m.name + " is a unary endpoint; call it with application/json or application/proto"
		}
		rpcWriteReply(w, rpcErrorReply(http.StatusUnsupportedMediaType, NewError(CodeInvalidArgument, why)))
		return
	}
	rc := http.NewResponseController(w)
	if r.ProtoMajor == 1 {
		rc.EnableFullDuplex() // bidi over HTTP/1.1: read and write at once
	}
	rc.SetReadDeadline(time.Time{}) // a stream lives as long as its caller wants
	rc.SetWriteDeadline(time.Time{})
	head := &rpcHead{header: r.Header}
	call := &rpcCall{parent: r.Context(), head: head}
	defer call.finish()
	var early error
	if v := r.Header.Get("Connect-Timeout-Ms"); v != "" {
		ms, ok := rpcParseTimeout(v)
		if !ok {
			early = Errorf(CodeInvalidArgument, "bad Connect-Timeout-Ms %q: want 1 to 10 digits", v)
		}
		call.deadline = time.Now().Add(time.Duration(ms) * time.Millisecond)
	}
	gzipIn := false
	switch enc := r.Header.Get("Connect-Content-Encoding"); enc {
	case "", "identity":
	case "gzip":
		gzipIn = true
	default:
		early = Errorf(CodeUnimplemented, "unsupported Connect-Content-Encoding %q; use gzip or identity", enc)
	}
	// Messages may come compressed with these; ours go out uncompressed.
	w.Header().Set("Connect-Accept-Encoding", "gzip")
	// Headers go out with the first message or the end of the stream, after
	// a server stream's request has been read, as connect-go's server does.
	w.Header().Set("Content-Type", "application/connect+"+streamCodecName(codec.ContentType()))

	// Send queues into a bounded pipe; one goroutine writes all that is
	// queued and flushes once, so messages sent while a flush runs leave
	// together in one frame and write (net/http's HTTP/2 writes a frame and
	// a syscall for every Flush). A full pipe holds Send back.
	out := newStreamPipe(streamPipeBuffer)
	flushed := make(chan struct{})
	// Before the first write (headers go out with it), the metadata the
	// handler set with SetHeader joins them; the flusher is the only
	// goroutine that touches w.
	headers := func() {
		call.mu.Lock()
		for k, v := range call.out {
			if rpcSendable(k, v) {
				w.Header().Set(k, v)
			}
		}
		call.sealed = true
		call.mu.Unlock()
	}
	go streamFlusher(out, w, headers, rc.Flush, flushed)
	st := &Stream{ctx: call, codec: codec, max: min(s.opts.maxBodySize, streamMaxMessage), r: r.Body, w: out, server: true, gzipIn: gzipIn}
	req := &Request{Service: s.opts.name, Endpoint: m.name, ContentType: codec.ContentType()}
	if len(s.opts.streamWrappers) > 0 {
		req.Header = call.incoming()
	}
	err := early
	if err == nil {
		err = s.invokeStream(call, m, req, st)
	}
	if err != nil && call.Err() != nil && CodeOf(err) == CodeUnknown {
		err = call.Err()
	}
	call.finish() // goroutines the handler left see its context end now, not after the drain
	st.rmu.Lock()
	st.sealed = true // a late SetTrailer is ignored
	trail := st.trail
	st.rmu.Unlock()
	st.wmu.Lock()
	defer st.wmu.Unlock()
	out.Write(streamAppendEnvelope(nil, streamFlagEnd, streamEndMessage(err, trail)))
	out.Close()
	select {
	case <-flushed: // everything sent has been written
	case <-r.Context().Done(): // the caller is gone: the flusher's write fails and it ends
		out.CloseWithError(r.Context().Err())
		<-flushed
	}
}

// streamFlusher writes what a server stream queues, all that has gathered at
// each turn, and flushes it. If the caller has gone, the pipe ends with the
// error, so a blocked Send returns.
func streamFlusher(p *streamPipe, w io.Writer, headers func(), flush func() error, done chan<- struct{}) {
	defer close(done)
	buf := make([]byte, 32<<10)
	for first := true; ; first = false {
		n, err := p.Read(buf)
		if first {
			headers()
		}
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				p.CloseWithError(werr)
				return
			}
			if ferr := flush(); ferr != nil {
				p.CloseWithError(ferr)
				return
			}
		}
		if err != nil {
			if first { // nothing was written: at least the headers go out
				flush()
			}
			return // io.EOF once the stream's end has been written
		}
	}
}

// invokeStream reads a server stream's one request, then runs the stream
// handler chain; a panic in either (a codec's or the handler's) becomes an
// internal error.
func (s *Server) invokeStream(ctx context.Context, m *rpcMethod, req *Request, st *Stream) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.opts.logger.Error("micro: stream handler panic", "endpoint", m.name, "panic", p, "stack", string(debug.Stack()))
			err = NewError(CodeInternal, "internal error: handler "+m.name+" panicked")
		}
	}()
	if m.stream == streamServer {
		ptr := codecNew(m.reqType)
		if err := st.Recv(ptr.Interface()); err == io.EOF {
			return Errorf(CodeInvalidArgument, "%s takes one request message; none came", m.name)
		} else if err != nil {
			return err
		}
		req.Body = ptr.Interface()
		if m.reqType.Kind() != reflect.Pointer {
			req.Body = ptr.Elem().Interface()
		}
	}
	h := m.callStream
	for i := len(s.opts.streamWrappers) - 1; i >= 0; i-- {
		h = s.opts.streamWrappers[i](h)
	}
	return h(ctx, req, st)
}

// streamEndMessage encodes the end-of-stream message for err (nil:
// success) and the trailers.
func streamEndMessage(err error, trailers MD) []byte {
	var end streamEnd
	md := trailers
	if err != nil {
		e := AsError(err)
		wire := rpcErrorReply(0, e) // the same JSON as a unary error
		var we rpcWireError
		json.Unmarshal(wire.body, &we)
		end.Error = &we
		md = rpcMergeMD(trailers, e.Meta)
	}
	for k, v := range md {
		if rpcSendable(k, v) {
			if end.Metadata == nil {
				end.Metadata = map[string][]string{}
			}
			end.Metadata[k] = []string{v}
		}
	}
	b, _ := json.Marshal(end)
	return b
}

// Stream opens a stream to endpoint ("Chat.Talk") of service, resolved and
// balanced as Call is. It returns at once: the request goes out in the
// background, and Recv and Header wait for the server's reply to begin (a
// Connect server may answer only when it first sends). A node that cannot be
// reached is replaced by another as long as no message has gone out; after
// that nothing is retried. The stream's context is ctx: a stream has no
// default timeout (the client's RequestTimeout is for calls), but a
// RequestTimeout given here bounds it. A ctx that has already ended gets its
// error back at once (CodeCanceled or CodeDeadlineExceeded, wrapping
// ctx.Err()) and no stream. Read the stream to its end or Close it, so that
// its resources are released.
func (c *Client) Stream(ctx context.Context, service, endpoint string, opts ...CallOption) (*Stream, error) {
	md, _ := ctx.Value(rpcOutgoingKey{}).(MD)
	req := &Request{Service: service, Endpoint: endpoint, Header: make(MD, len(md))}
	for k, v := range md {
		req.Header[k] = v
	}
	open := c.openStream
	for i := len(c.opts.streamWrappers) - 1; i >= 0; i-- {
		open = c.opts.streamWrappers[i](open)
	}
	return open(ctx, req, opts...)
}

// openStream resolves, balances and opens: the StreamCallFunc the wrappers
// wrap.
func (c *Client) openStream(ctx context.Context, req *Request, opts ...CallOption) (*Stream, error) {
	if c.closed.Load() {
		return nil, &Error{Code: CodeCanceled, Message: "micro: client closed", cause: ErrClosed}
	}
	if err := ctx.Err(); err != nil { // ended already: nothing goes out, not even a lookup
		return nil, AsError(err)
	}
	o := c.opts.call
	o.timeout = 0 // a stream lives as long as its caller wants: no default timeout
	for _, opt := range opts {
		opt.applyCall(&o)
	}
	if !rpcValidEndpoint(req.Endpoint) {
		return nil, Errorf(CodeInvalidArgument, "micro: bad endpoint %q; want \"Handler.Method\"", req.Endpoint)
	}
	if req.ContentType != "" {
		o.contentType = req.ContentType
	}
	codec := c.codecs.get(o.contentType)
	if codec == nil {
		return nil, Errorf(CodeInvalidArgument, "micro: no codec for content type %q", o.contentType)
	}
	req.ContentType = codec.ContentType()
	md := rpcMergeMD(req.Header, o.md)
	for k, v := range md {
		if !rpcSendable(k, v) {
			return nil, Errorf(CodeInvalidArgument, "micro: metadata %q cannot be sent: a protocol header, or not a valid header", k)
		}
	}
	var cancelTimeout context.CancelFunc = func() {}
	if _, ok := ctx.Deadline(); !ok && o.timeout > 0 {
		ctx, cancelTimeout = context.WithTimeout(ctx, o.timeout)
	}
	nodes, err := c.nodes(ctx, req.Service, &o)
	if err != nil {
		cancelTimeout()
		return nil, err
	}
	c.budget.deposit()
	sctx, cancel := context.WithCancel(ctx)
	pw := newStreamPipe(streamPipeBuffer)
	// net/http's HTTP/2 transport notices a canceled request only when its
	// read of the body returns: end the pipe with the context, so the stream
	// is reset and the handler's context ends too.
	unhook := context.AfterFunc(sctx, func() { pw.CloseWithError(context.Cause(sctx)) })
	unhookClient := context.AfterFunc(c.ctx, cancel) // Close ends the stream too
	st := &Stream{
		ctx: ctx, cancel: func() { cancel(); cancelTimeout(); unhook(); unhookClient() },
		codec: codec, max: min(c.opts.maxRspSize, streamMaxMessage),
		w: pw, pw: pw, ready: make(chan struct{}),
	}
	c.openMu.Lock()
	if c.closed.Load() {
		c.openMu.Unlock()
		st.cancel()
		return nil, &Error{Code: CodeCanceled, Message: "micro: client closed", cause: ErrClosed}
	}
	c.opening.Add(1)
	c.openMu.Unlock()
	go func() {
		defer c.opening.Done()
		c.runStream(sctx, st, pw, nodes, req, codec, md, &o)
	}()
	return st, nil
}

// streamPipeBuffer bounds what a client stream queues for the transport.
const streamPipeBuffer = 64 << 10

// streamPipe is a client stream's request body. Send appends to a bounded
// buffer and the transport takes all that is queued in one read, so messages
// sent together leave in one HTTP/2 frame (io.Pipe would hand over one
// message a read, a frame and a write each). A full buffer blocks Send until
// the transport, held back by HTTP/2 flow control, takes more: the writer
// waits for its reader, and nothing queues past the bound.
type streamPipe struct {
	mu     sync.Mutex
	cond   sync.Cond
	buf    []byte
	off    int // buf[off:] is what is queued
	max    int
	closed bool        // CloseSend: the transport reads io.EOF once buf is empty
	err    error       // the stream ended: both sides get err
	sent   bool        // the transport has taken bytes: the stream is not retried
	reader *streamBody // the attempt that may read; others get io.ErrClosedPipe
}

func newStreamPipe(max int) *streamPipe {
	p := &streamPipe{max: max}
	p.cond.L = &p.mu
	return p
}

// Write queues b; it blocks while the buffer is full. (A message larger than
// the buffer goes in when the buffer is empty.)
func (p *streamPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.err == nil && !p.closed && len(p.buf)-p.off > 0 && len(p.buf)-p.off+len(b) > p.max {
		p.cond.Wait()
	}
	switch {
	case p.err != nil:
		return 0, p.err
	case p.closed:
		return 0, io.ErrClosedPipe
	}
	if p.off > 0 && (p.off == len(p.buf) || len(p.buf)+len(b) > cap(p.buf)) {
		// Move what is queued to the front rather than let append copy the
		// bytes already taken too: a reader that never quite catches up
		// would otherwise have the buffer grow and be copied without end.
		n := copy(p.buf, p.buf[p.off:])
		p.buf, p.off = p.buf[:n], 0
	}
	p.buf = append(p.buf, b...)
	p.cond.Broadcast()
	return len(b), nil
}

// Read gives the transport everything queued, up to len(b).
func (p *streamPipe) Read(b []byte) (int, error) { return p.read(nil, b) }

// read serves reader h (nil: any). A retired attempt's reader never takes
// bytes meant for the attempt after it.
func (p *streamPipe) read(h *streamBody, b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.buf) == p.off && !p.closed && p.err == nil && (h == nil || p.reader == h) {
		p.cond.Wait()
	}
	switch {
	case h != nil && p.reader != h:
		return 0, io.ErrClosedPipe
	case p.err != nil:
		return 0, p.err
	case len(p.buf) > p.off:
		n := copy(b, p.buf[p.off:])
		p.off += n
		if p.off == len(p.buf) {
			p.buf, p.off = p.buf[:0], 0
			if cap(p.buf) > 4*p.max { // a huge message passed: give its memory back
				p.buf = nil
			}
		}
		p.sent = true
		p.cond.Broadcast()
		return n, nil
	}
	return 0, io.EOF
}

// Close ends the sending side: what is queued still goes out, then EOF.
func (p *streamPipe) Close() error {
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	p.mu.Unlock()
	return nil
}

// CloseWithError ends the stream for both sides.
func (p *streamPipe) CloseWithError(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
		p.buf, p.off = nil, 0
	}
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *streamPipe) taken() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent
}

// streamBody is one attempt's view of the pipe, as the transport's request
// body. Only the current attempt reads. Closing a retired attempt's body does
// nothing (the stream may go to another node); closing the body of the
// attempt that opened the stream means the transport is done sending
// (the server ended the stream, say), so the pipe ends and a blocked Send
// returns io.EOF. A Close that comes before the attempt is known to have
// opened counts once it is.
type streamBody struct {
	p      *streamPipe
	closed bool // under p.mu
	won    bool // under p.mu: this attempt opened the stream
}

func (b *streamBody) Read(buf []byte) (int, error) { return b.p.read(b, buf) }

func (b *streamBody) Close() error {
	b.p.mu.Lock()
	b.closed = true
	won := b.won && b.p.reader == b
	b.p.mu.Unlock()
	if won {
		b.p.CloseWithError(errStreamSendEnded)
	}
	return nil
}

// errStreamSendEnded ends a client stream's sending side once the server has
// ended the stream.
var errStreamSendEnded = errors.New("micro: the stream has ended")

// attempt makes a new body the one that reads, retiring the last.
func (p *streamPipe) attempt() *streamBody {
	b := &streamBody{p: p}
	p.mu.Lock()
	p.reader = b
	p.cond.Broadcast() // a retired reader waiting in read gives up
	p.mu.Unlock()
	return b
}

// opened marks b's attempt as the one that opened the stream; if the
// transport closed b already, the pipe ends now.
func (b *streamBody) opened() {
	b.p.mu.Lock()
	b.won = true
	closed := b.closed
	b.p.mu.Unlock()
	if closed {
		b.p.CloseWithError(errStreamSendEnded)
	}
}

// retire takes b off the pipe before another attempt; its late Close is
// ignored and its reader gives up.
func (b *streamBody) retire() {
	b.p.mu.Lock()
	if b.p.reader == b {
		b.p.reader = nil
	}
	b.p.cond.Broadcast()
	b.p.mu.Unlock()
}

// runStream opens the stream's HTTP/2 request and waits for the server's
// reply to begin, which may be only after the caller has sent messages:
// Connect servers reply when they first send. A node that cannot be reached
// before any message bytes went out is replaced by another.
func (c *Client) runStream(ctx context.Context, st *Stream, pipe *streamPipe, nodes []*Node, req *Request, codec Codec, md MD, o *callOptions) {
	defer close(st.ready)
	fail := func(err error) {
		st.oerr = err
		st.pw.CloseWithError(err) // a blocked Send returns io.EOF; Recv tells why
	}
	var tried []string
	for attempt := 0; ; attempt++ {
		node, done, err := c.opts.balancer.Pick(ctx, rpcUntried(nodes, tried))
		if err != nil {
			fail(Errorf(CodeUnavailable, "micro: service %s: %w", req.Service, err))
			return
		}
		body := pipe.attempt()
		hrsp, err := c.streamRequest(ctx, node.Address, req, codec, md, body)
		if err == nil {
			body.opened()
			st.done = done
			st.r, st.body, st.header = hrsp.Body, hrsp.Body, rpcResponseMetadata(hrsp.Header)
			return
		}
		if done != nil {
			done(err)
		}
		body.retire() // before looking: its reader can no longer take bytes
		if !rpcRetryable(err) || pipe.taken() || ctx.Err() != nil || attempt >= o.retries || !c.budget.withdraw() {
			fail(err)
			return
		}
		tried = append(tried, node.Address)
	}
}

// streamRequest sends the stream's request to addr and returns the reply
// once it has begun.
func (c *Client) streamRequest(ctx context.Context, addr string, req *Request, codec Codec, md MD, body io.ReadCloser) (*http.Response, error) {
	if !rpcValidAddr(addr) {
		return nil, Errorf(CodeInvalidArgument, "micro: bad node address %q", addr)
	}
	dot := strings.LastIndexByte(req.Endpoint, '.')
	url := "http://" + addr + "/" + req.Endpoint[:dot] + "/" + req.Endpoint[dot+1:]
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url, body)
	if err != nil {
		return nil, Errorf(CodeInvalidArgument, "micro: bad address %q: %w", addr, err)
	}
	for k, v := range md {
		hreq.Header.Set(k, v)
	}
	want := "application/connect+" + streamCodecName(codec.ContentType())
	hreq.Header.Set("Content-Type", want)
	hreq.Header.Set("Connect-Protocol-Version", "1")
	if dl, ok := ctx.Deadline(); ok {
		hreq.Header.Set("Connect-Timeout-Ms", strconv.FormatInt(min(max(time.Until(dl).Milliseconds(), 1), 9_999_999_999), 10))
	}
	hc := c.streamClient()
	if hc == nil || c.closed.Load() {
		return nil, &Error{Code: CodeCanceled, Message: "micro: client closed", cause: ErrClosed}
	}
	hrsp, err := hc.Do(hreq)
	if err != nil {
		var op *net.OpError
		unsent := errors.As(err, &op) && op.Op == "dial"
		return nil, rpcTransportError(ctx, time.Time{}, addr, err, unsent)
	}
	if hrsp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(hrsp.Body, 64<<10))
		hrsp.Body.Close()
		return nil, rpcReadError(hrsp.StatusCode, hrsp.Header, b)
	}
	if got := codecMediaType(hrsp.Header.Get("Content-Type")); got != want {
		hrsp.Body.Close()
		return nil, Errorf(CodeInternal, "micro: stream content type %q, want %q", got, want)
	}
	return hrsp, nil
}

// streamClient returns the HTTP client streams use: HTTP/2 over cleartext
// TCP (h2c, prior knowledge), made on first use, or the WithTransport one.
func (c *Client) streamClient() *http.Client {
	c.h2once.Do(func() {
		if c.hc != nil {
			c.h2 = c.hc
			return
		}
		protocols := new(http.Protocols)
		protocols.SetUnencryptedHTTP2(true)
		dialer := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
		c.h2 = &http.Client{Transport: &http.Transport{
			Protocols: protocols,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				conn, err := dialer.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return newStreamConn(conn), nil
			},
			DisableCompression: true,
			IdleConnTimeout:    90 * time.Second,
		}}
	})
	return c.h2
}

// streamConn is a client's HTTP/2 connection. It reads through a buffer
// larger than the transport's own (4 KiB), so a frame of a 4 KiB message,
// with its header, arrives in one read instead of two, and a batch of frames
// in one. Its writes are gathered (see streamWriter).
type streamConn struct {
	net.Conn
	br *bufio.Reader
	w  streamWriter
}

// streamConnReadBuffer is a client connection's read buffer.
const streamConnReadBuffer = 32 << 10

func newStreamConn(c net.Conn) *streamConn {
	sc := &streamConn{Conn: c, br: bufio.NewReaderSize(c, streamConnReadBuffer)}
	sc.w.init(c)
	return sc
}

func (c *streamConn) Read(p []byte) (int, error)  { return c.br.Read(p) }
func (c *streamConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *streamConn) Close() error                { return c.w.close() }

// streamWriter gathers an HTTP/2 connection's writes. net/http's HTTP/2
// writes and flushes frame by frame: its transport flushes every DATA frame
// apiece, with the connection's write lock held, and its server flushes a
// WINDOW_UPDATE apart from the reply that follows it and splits a 4 KiB
// message's frame over two writes (its write buffer is 4 KiB). Write queues
// instead and returns; a goroutine, started when the queue fills from empty
// and ending when it is empty again, writes all that has gathered in one
// syscall. Past streamWriterQueue queued bytes Write blocks, as a write to a
// full socket would. A write error is kept, returned by every later Write,
// and closes the connection, so that its reader sees the failure too. Close
// lets what is queued go out first, as the kernel does with what a closed
// socket holds: readers get EOF at once, the connection closes once the
// queue is written, within streamWriterLinger.
type streamWriter struct {
	c       net.Conn
	mu      sync.Mutex
	cond    sync.Cond
	queue   []byte
	spare   []byte
	writing bool  // the goroutine is running
	closed  bool  // Close was called: no more writes
	err     error // the first write error
}

// streamWriterQueue bounds what a streamWriter queues; between bursts it
// keeps buffers of up to streamWriterKeep bytes. streamWriterLinger bounds
// how long a closed connection's queue may take to go out.
const (
	streamWriterQueue  = 64 << 10
	streamWriterKeep   = 2 * streamWriterQueue
	streamWriterLinger = time.Second
)

func (w *streamWriter) init(c net.Conn) {
	w.c = c
	w.cond.L = &w.mu
}

func (w *streamWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.err == nil && !w.closed && len(w.queue) > 0 && len(w.queue)+len(p) > streamWriterQueue {
		w.cond.Wait()
	}
	switch {
	case w.err != nil:
		return 0, w.err
	case w.closed:
		return 0, net.ErrClosed
	}
	w.queue = append(w.queue, p...)
	if !w.writing {
		w.writing = true
		go w.run()
	}
	return len(p), nil
}

// run writes what gathers until nothing is queued, and closes the
// connection if Close came meanwhile.
func (w *streamWriter) run() {
	w.mu.Lock()
	for len(w.queue) > 0 && w.err == nil {
		b := w.queue
		w.queue = w.spare[:0]
		w.mu.Unlock()
		_, err := w.c.Write(b)
		w.mu.Lock()
		w.spare = b[:0]
		if err != nil && w.err == nil {
			w.err = err
			w.c.Close()
		}
		w.cond.Broadcast() // room in the queue
	}
	w.writing = false
	w.queue = w.queue[:0]
	if cap(w.queue) > streamWriterKeep { // an idle connection keeps little
		w.queue, w.spare = nil, nil
	}
	if w.closed {
		w.c.Close()
	}
	w.cond.Broadcast() // for flush
	w.mu.Unlock()
}

// flush waits until everything queued has been written.
func (w *streamWriter) flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.writing {
		w.cond.Wait()
	}
	return w.err
}

// close closes the connection, at once if nothing is queued, otherwise once
// the queue is written (the reading side shuts now).
func (w *streamWriter) close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return net.ErrClosed
	}
	w.closed = true
	linger := w.writing
	w.cond.Broadcast()
	w.mu.Unlock()
	if !linger {
		return w.c.Close()
	}
	if cr, ok := w.c.(interface{ CloseRead() error }); ok {
		cr.CloseRead()
	}
	w.c.SetWriteDeadline(time.Now().Add(streamWriterLinger))
	return nil
}
