package micro

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type Num struct {
	N int    `json:"n"`
	S string `json:"s,omitempty"`
}

// Chat has a handler per streaming shape.
type Chat struct {
	started chan struct{}
	ended   chan error
	seen    chan time.Duration // Block reports the deadline it saw
}

// Echo sends back every message until the caller closes its side.
func (c *Chat) Echo(ctx context.Context, stream *Stream) error {
	for {
		var m Num
		if err := stream.Recv(&m); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if err := stream.Send(&m); err != nil {
			return err
		}
	}
}

// Count streams req.N numbered messages.
func (c *Chat) Count(ctx context.Context, req *Num, stream *Stream) error {
	if err := SetHeader(ctx, "X-Count", fmt.Sprint(req.N)); err != nil {
		return err
	}
	for i := 0; i < req.N; i++ {
		if err := stream.Send(&Num{N: i}); err != nil {
			return err
		}
	}
	stream.SetTrailer("X-Sent", fmt.Sprint(req.N))
	return nil
}

// Sum adds what the caller sends and answers once it has closed its side,
// with how many messages came before io.EOF.
func (c *Chat) Sum(ctx context.Context, stream *Stream) error {
	sum, n := 0, 0
	for {
		var m Num
		err := stream.Recv(&m)
		if err == io.EOF {
			return stream.Send(&Num{N: sum, S: fmt.Sprint(n)})
		}
		if err != nil {
			return err
		}
		sum += m.N
		n++
	}
}

// Fail sends req.N messages, then fails.
func (c *Chat) Fail(ctx context.Context, req *Num, stream *Stream) error {
	for i := 0; i < req.N; i++ {
		if err := stream.Send(&Num{N: i}); err != nil {
			return err
		}
	}
	e := NewError(CodeFailedPrecondition, "out of numbers")
	e.Meta = MD{"X-Why": "empty"}
	return e
}

// Stop reads one message and ends the stream with an error.
func (c *Chat) Stop(ctx context.Context, stream *Stream) error {
	var m Num
	stream.Recv(&m)
	return NewError(CodeAborted, "enough")
}

// Block waits for its context to end.
func (c *Chat) Block(ctx context.Context, stream *Stream) error {
	dl, _ := ctx.Deadline()
	c.seen <- time.Until(dl)
	c.started <- struct{}{}
	<-ctx.Done()
	c.ended <- ctx.Err()
	return ctx.Err()
}

func newChat() *Chat {
	return &Chat{started: make(chan struct{}, 1), ended: make(chan error, 1), seen: make(chan time.Duration, 1)}
}

func TestStreamBidiEcho10000Interleaved(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, newChat())
	client := newTestClient(t, WithAddress(addr))
	st, err := client.Stream(context.Background(), "chat", "Chat.Echo")
	assertNoError(t, err)
	const n = 10000
	sendErr := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if err := st.Send(&Num{N: i}); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- st.CloseSend()
	}()
	for i := 0; i < n; i++ {
		var m Num
		assertNoError(t, st.Recv(&m))
		if m.N != i {
			t.Fatalf("message %d came back as %d", i, m.N)
		}
	}
	var m Num
	if err := st.Recv(&m); err != io.EOF {
		t.Fatalf("after the last echo: %v, want io.EOF", err)
	}
	assertNoError(t, <-sendErr)
}

func TestStreamServerStreaming1000(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, newChat())
	client := newTestClient(t, WithAddress(addr))
	st, err := client.Stream(context.Background(), "chat", "Chat.Count")
	assertNoError(t, err)
	assertNoError(t, st.Send(&Num{N: 1000}))
	assertNoError(t, st.CloseSend())
	for i := 0; i < 1000; i++ {
		var m Num
		assertNoError(t, st.Recv(&m))
		assertEqual(t, m.N, i)
	}
	var m Num
	if err := st.Recv(&m); err != io.EOF {
		t.Fatalf("end: %v", err)
	}
	assertEqual(t, st.Trailer().Get("X-Sent"), "1000")
	if err := st.Recv(&m); err != io.EOF {
		t.Fatalf("Recv after the end: %v", err)
	}
}

func TestStreamClientStreamingAndHalfClose(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, newChat())
	client := newTestClient(t, WithAddress(addr))
	st, err := client.Stream(context.Background(), "chat", "Chat.Sum")
	assertNoError(t, err)
	for i := 1; i <= 100; i++ {
		assertNoError(t, st.Send(&Num{N: i}))
	}
	assertNoError(t, st.CloseSend())
	assertNoError(t, st.CloseSend()) // idempotent
	if err := st.Send(&Num{}); CodeOf(err) != CodeFailedPrecondition {
		t.Fatalf("Send after CloseSend: %v", err)
	}
	var m Num
	assertNoError(t, st.Recv(&m))
	assertEqual(t, m.N, 5050)
	assertEqual(t, m.S, "100") // the handler's Recv saw io.EOF after all 100, not before
	if err := st.Recv(&m); err != io.EOF {
		t.Fatalf("end: %v", err)
	}
}

func TestStreamErrorArrivesAfterMessages(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, newChat())
	client := newTestClient(t, WithAddress(addr))
	st, err := client.Stream(context.Background(), "chat", "Chat.Fail")
	assertNoError(t, err)
	assertNoError(t, st.Send(&Num{N: 3}))
	for i := 0; i < 3; i++ {
		var m Num
		assertNoError(t, st.Recv(&m))
		assertEqual(t, m.N, i)
	}
	var m Num
	err = st.Recv(&m)
	assertCode(t, err, CodeFailedPrecondition)
	assertEqual(t, AsError(err).Message, "out of numbers")
	assertEqual(t, AsError(err).Meta.Get("X-Why"), "empty")
	// Every later Recv says the same; Send says the stream is over.
	assertCode(t, st.Recv(&m), CodeFailedPrecondition)
	if err := st.Send(&Num{}); err != io.EOF {
		t.Fatalf("Send after the end: %v", err)
	}
}

func TestStreamCancelAndDeadline(t *testing.T) {
	checkGoroutines(t)
	chat := newChat()
	addr, _ := newTestServer(t, nil, chat)
	client := newTestClient(t, WithAddress(addr), RequestTimeout(0))

	t.Run("caller cancels", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		st, err := client.Stream(ctx, "chat", "Chat.Block")
		assertNoError(t, err)
		<-chat.seen
		<-chat.started
		cancel()
		if err := <-chat.ended; !errors.Is(err, context.Canceled) {
			t.Fatalf("handler's context ended with %v", err)
		}
		var m Num
		assertCode(t, st.Recv(&m), CodeCanceled)
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		st, err := client.Stream(ctx, "chat", "Chat.Block")
		assertNoError(t, err)
		if seen := <-chat.seen; seen <= 0 || seen > 300*time.Millisecond {
			t.Fatalf("handler saw a deadline in %v", seen)
		}
		<-chat.started
		if err := <-chat.ended; err == nil {
			t.Fatal("handler's context did not end")
		}
		var m Num
		assertCode(t, st.Recv(&m), CodeDeadlineExceeded)
	})
	t.Run("Close ends it early", func(t *testing.T) {
		st, err := client.Stream(context.Background(), "chat", "Chat.Block")
		assertNoError(t, err)
		<-chat.seen
		<-chat.started
		assertNoError(t, st.Close())
		assertNoError(t, st.Close())
		if err := <-chat.ended; !errors.Is(err, context.Canceled) {
			t.Fatalf("handler's context ended with %v", err)
		}
	})
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func TestStreamLimitsAndManyStreamsOnOneConnection(t *testing.T) {
	checkGoroutines(t)
	srv := NewServer(MaxBodySize(1024))
	assertNoError(t, RegisterHandler(srv, newChat()))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	defer func() { srv.Close(); <-done }()
	client := newTestClient(t, WithAddress(ln.Addr().String()))

	// The connections the streams went out on, as net/http reports them.
	// (Not the connections the server accepted: net/http hands a new HTTP/2
	// connection to the request that dialed it before it lists it as idle,
	// and a request in between dials again; the spare connection is closed
	// unused, but the server has accepted it.)
	var connMu sync.Mutex
	conns := map[net.Conn]int{}
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) {
			connMu.Lock()
			conns[info.Conn]++
			connMu.Unlock()
		},
	})

	// A stream kept open across the oversized one; its first echo means the
	// connection is up, so the streams below share it.
	keep, err := client.Stream(ctx, "chat", "Chat.Echo")
	assertNoError(t, err)
	assertNoError(t, keep.Send(&Num{N: 1}))
	var m Num
	assertNoError(t, keep.Recv(&m))

	big, err := client.Stream(ctx, "chat", "Chat.Echo")
	assertNoError(t, err)
	assertNoError(t, big.Send(&Num{S: strings.Repeat("x", 2000)}))
	assertCode(t, big.Recv(&m), CodeResourceExhausted)

	// The other stream on the connection goes on.
	assertNoError(t, keep.Send(&Num{N: 2}))
	assertNoError(t, keep.Recv(&m))
	assertEqual(t, m.N, 2)
	assertNoError(t, keep.CloseSend())
	if err := keep.Recv(&m); err != io.EOF {
		t.Fatalf("end: %v", err)
	}

	// A hundred at once, all on the one HTTP/2 connection.
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.Stream(ctx, "chat", "Chat.Echo")
			if err != nil {
				t.Error(err)
				return
			}
			defer st.Close()
			for j := 0; j < 10; j++ {
				if err := st.Send(&Num{N: i*100 + j}); err != nil {
					t.Error(err)
					return
				}
				var m Num
				if err := st.Recv(&m); err != nil || m.N != i*100+j {
					t.Errorf("stream %d: %v %v", i, m, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	connMu.Lock()
	defer connMu.Unlock()
	streams := 0
	for _, n := range conns {
		streams += n
	}
	if len(conns) != 1 || streams < 102 {
		t.Fatalf("102 streams went out %d times on %d connections, want all on one", streams, len(conns))
	}
}

func TestStreamMiddlewareBothSides(t *testing.T) {
	var mu sync.Mutex
	var trace []string
	note := func(s string) {
		mu.Lock()
		trace = append(trace, s)
		mu.Unlock()
	}
	sw := func(next StreamHandlerFunc) StreamHandlerFunc {
		return func(ctx context.Context, req *Request, st *Stream) error {
			note("server " + req.Endpoint + " " + req.Header.Get("X-Who"))
			return next(ctx, req, st)
		}
	}
	cw := func(next StreamCallFunc) StreamCallFunc {
		return func(ctx context.Context, req *Request, opts ...CallOption) (*Stream, error) {
			note("client " + req.Endpoint)
			req.Header.Set("X-Who", "tester")
			return next(ctx, req, opts...)
		}
	}
	addr, _ := newTestServer(t, []ServerOption{WrapStream(sw)}, newChat())
	client := newTestClient(t, WithAddress(addr), WrapStreamCall(cw))
	st, err := client.Stream(context.Background(), "chat", "Chat.Sum")
	assertNoError(t, err)
	assertNoError(t, st.CloseSend())
	var m Num
	assertNoError(t, st.Recv(&m))
	assertEqual(t, strings.Join(trace, "; "), "client Chat.Sum; server Chat.Sum tester")
}

// envelope builds a stream body from raw messages.
func envelope(msgs ...string) []byte {
	var b []byte
	for _, m := range msgs {
		b = streamAppendEnvelope(b, 0, []byte(m))
	}
	return b
}

// serveStreamRaw runs a streaming request through the server's handler and
// returns the messages and the end-of-stream message of the reply.
func serveStreamRaw(t testing.TB, srv *Server, path, ct string, body []byte) (int, []string, *streamEnd) {
	return serveStreamRawHeader(t, srv, path, ct, nil, body)
}

// serveStreamRawHeader is serveStreamRaw with more request headers.
func serveStreamRawHeader(t testing.TB, srv *Server, path, ct string, more http.Header, body []byte) (int, []string, *streamEnd) {
	req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
	req.Header.Set("Content-Type", ct)
	for k, v := range more {
		req.Header[k] = v
	}
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	if rec.Code != 200 {
		return rec.Code, nil, nil
	}
	var msgs []string
	r := bytes.NewReader(rec.Body.Bytes())
	var hdr [5]byte
	var buf []byte
	for {
		flags, data, err := streamReadEnvelope(r, &hdr, &buf, 1<<20)
		if err != nil {
			t.Fatalf("reply is not envelopes: %v (%q)", err, rec.Body.String())
		}
		if flags&streamFlagEnd != 0 {
			var end streamEnd
			if err := json.Unmarshal(data, &end); err != nil {
				t.Fatalf("bad end-of-stream %q: %v", data, err)
			}
			return 200, msgs, &end
		}
		msgs = append(msgs, string(data))
	}
}

func TestStreamBadInputAndHTTP1(t *testing.T) {
	srv := NewServer(MaxBodySize(1024))
	assertNoError(t, RegisterHandler(srv, newChat()))
	assertNoError(t, RegisterHandler(srv, &Greeter{}))
	tests := []struct {
		name, path, ct string
		body           []byte
		status         int
		msgs           int
		code           string
	}{
		{"server streaming over HTTP/1.1", "/Chat/Count", "application/connect+json", envelope(`{"n":3}`), 200, 3, ""},
		{"truncated envelope", "/Chat/Echo", "application/connect+json", envelope(`{"n":1}`)[:7], 200, 0, "invalid_argument"},
		{"truncated header", "/Chat/Echo", "application/connect+json", []byte{0, 0, 0}, 200, 0, "invalid_argument"},
		{"garbage message", "/Chat/Echo", "application/connect+json", envelope(`{"n":"x"}`), 200, 0, "invalid_argument"},
		{"oversized envelope", "/Chat/Echo", "application/connect+json", []byte{0, 0xff, 0, 0, 0}, 200, 0, "resource_exhausted"},
		{"compressed flag, no encoding said", "/Chat/Echo", "application/connect+json", append([]byte{1, 0, 0, 0, 2}, "{}"...), 200, 0, "invalid_argument"},
		{"end flag from a client", "/Chat/Echo", "application/connect+json", append([]byte{2, 0, 0, 0, 2}, "{}"...), 200, 0, "invalid_argument"},
		{"no request for server streaming", "/Chat/Count", "application/connect+json", nil, 200, 0, "invalid_argument"},
		{"unknown codec", "/Chat/Echo", "application/connect+xml", nil, 415, 0, ""},
		{"unary content type on a stream", "/Chat/Echo", "application/json", nil, 415, 0, ""},
		{"stream content type on unary", "/Greeter/Hello", "application/connect+json", envelope(`{}`), 415, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, msgs, end := serveStreamRaw(t, srv, tt.path, tt.ct, tt.body)
			assertEqual(t, status, tt.status)
			if status != 200 {
				return
			}
			assertEqual(t, len(msgs), tt.msgs)
			got := ""
			if end.Error != nil {
				got = end.Error.Code
			}
			assertEqual(t, got, tt.code)
		})
	}
}

// FuzzStreamEnvelopes sends arbitrary bodies to each streaming handler: the
// reply is always envelopes ending in a well-formed end-of-stream message.
func FuzzStreamEnvelopes(f *testing.F) {
	f.Add("/Chat/Echo", envelope(`{"n":1}`, `{"n":2}`))
	f.Add("/Chat/Sum", envelope(`{"n":1}`)[:6])
	f.Add("/Chat/Count", envelope(`{"n":2}`))
	f.Add("/Chat/Fail", []byte{0, 0, 0, 0, 0})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"n":3}`))
	zw.Close()
	f.Add("/Chat/Echo", append(streamAppendEnvelope(nil, streamFlagCompressed, gz.Bytes()), 0)) // odd length: gzip said
	srv := NewServer(MaxBodySize(4096))
	if err := RegisterHandler(srv, newChat()); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, path string, body []byte) {
		if strings.Contains(path, "Block") || bytes.Contains(body, []byte(`"n":`)) && len(body) > 64 {
			return // Block waits by design; huge counts only take time
		}
		if _, err := http.ReadRequest(bufio.NewReader(strings.NewReader("POST " + path + " HTTP/1.0\r\n\r\n"))); err != nil {
			return // not a request target at all: net/http refuses it before us
		}
		var hdr http.Header
		if len(body)%2 == 1 { // half the inputs say their messages may be compressed
			hdr = http.Header{"Connect-Content-Encoding": {"gzip"}}
		}
		status, _, end := serveStreamRawHeader(t, srv, path, "application/connect+json", hdr, body)
		if status == 200 && end == nil {
			t.Fatal("no end-of-stream message")
		}
		if end != nil && end.Error != nil {
			if _, ok := ParseCode(end.Error.Code); !ok {
				t.Fatalf("unknown code %q", end.Error.Code)
			}
		}
	})
}

func TestStreamOverRealHTTP1(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, newChat())
	tr := &http.Transport{} // HTTP/1.1 only, as curl or a browser's fetch would call
	defer tr.CloseIdleConnections()
	for _, tt := range []struct {
		path string
		body []byte
		want []string
	}{
		{"/Chat/Count", envelope(`{"n":3}`), []string{`{"n":0}`, `{"n":1}`, `{"n":2}`}}, // server streaming
		{"/Chat/Sum", envelope(`{"n":2}`, `{"n":40}`), []string{`{"n":42,"s":"2"}`}},    // client streaming
	} {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+tt.path, bytes.NewReader(tt.body))
		req.Header.Set("Content-Type", "application/connect+json")
		rsp, err := tr.RoundTrip(req)
		assertNoError(t, err)
		assertEqual(t, rsp.ProtoMajor, 1)
		assertEqual(t, rsp.StatusCode, 200)
		var got []string
		var hdr [5]byte
		var buf []byte
		for {
			flags, data, err := streamReadEnvelope(rsp.Body, &hdr, &buf, 1<<20)
			assertNoError(t, err)
			if flags&streamFlagEnd != 0 {
				assertEqual(t, string(data) == "{}" || strings.Contains(string(data), "metadata"), true)
				break
			}
			got = append(got, string(data))
		}
		rsp.Body.Close()
		assertEqual(t, strings.Join(got, " "), strings.Join(tt.want, " "))
	}
}

func TestStreamPipe(t *testing.T) {
	p := newStreamPipe(10)
	// Messages queued together leave in one read.
	for _, m := range []string{"ab", "cd", "ef"} {
		n, err := p.Write([]byte(m))
		assertNoError(t, err)
		assertEqual(t, n, 2)
	}
	buf := make([]byte, 64)
	n, err := p.Read(buf)
	assertNoError(t, err)
	assertEqual(t, string(buf[:n]), "abcdef")
	assertEqual(t, p.taken(), true)

	// A full buffer holds the writer until the reader takes some.
	_, err = p.Write([]byte("0123456789"))
	assertNoError(t, err)
	wrote := make(chan error, 1)
	go func() {
		_, err := p.Write([]byte("xy"))
		wrote <- err
	}()
	n, err = p.Read(buf[:4])
	assertNoError(t, err)
	assertEqual(t, string(buf[:n]), "0123")
	assertNoError(t, <-wrote)
	n, _ = p.Read(buf)
	assertEqual(t, string(buf[:n]), "456789xy")

	// CloseSend: what is queued still goes out, then EOF; no more writes.
	p.Write([]byte("z"))
	p.Close()
	if _, err := p.Write([]byte("late")); err == nil {
		t.Fatal("Write after Close succeeded")
	}
	n, _ = p.Read(buf)
	assertEqual(t, string(buf[:n]), "z")
	if _, err := p.Read(buf); err != io.EOF {
		t.Fatalf("after the last byte: %v", err)
	}

	// A reader that never quite catches up: what is queued moves to the
	// front, the buffer stays within the bound, and the bytes keep their
	// order.
	r := newStreamPipe(16)
	want := []byte{0xff}
	r.Write(want)
	var got []byte
	for i := 0; i < 1000; i++ {
		m := []byte{byte(i), byte(i >> 8), byte(i >> 16)}
		want = append(want, m...)
		_, err := r.Write(m)
		assertNoError(t, err)
		n, err := r.Read(buf[:3]) // one byte stays behind
		assertNoError(t, err)
		got = append(got, buf[:n]...)
		if cap(r.buf) > 64 {
			t.Fatalf("after %d writes the buffer holds %d bytes for %d queued", i+1, cap(r.buf), len(r.buf)-r.off)
		}
	}
	r.Close()
	rest, err := io.ReadAll(r)
	assertNoError(t, err)
	assertEqual(t, string(append(got, rest...)), string(want))

	// CloseWithError: both sides get the error, queued bytes are dropped.
	q := newStreamPipe(10)
	q.Write([]byte("lost"))
	q.CloseWithError(context.Canceled)
	if _, err := q.Read(buf); !errors.Is(err, context.Canceled) {
		t.Fatalf("Read: %v", err)
	}
	if _, err := q.Write([]byte("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Write: %v", err)
	}
}

func TestStreamReviewRegressions(t *testing.T) {
	checkGoroutines(t)
	chat := newChat()
	addr, _ := newTestServer(t, nil, chat)
	t.Run("closing the client while a stream opens", func(t *testing.T) {
		client := NewClient(WithAddress(addr))
		st, err := client.Stream(context.Background(), "chat", "Chat.Block")
		assertNoError(t, err)
		assertNoError(t, client.Close()) // no panic; the stream ends
		var m Num
		if err := st.Recv(&m); err == nil {
			t.Fatal("Recv on a stream of a closed client succeeded")
		}
		select { // the handler, if it had started, sees the end
		case <-chat.seen:
			<-chat.started
			<-chat.ended
		default:
		}
		if _, err := client.Stream(context.Background(), "chat", "Chat.Echo"); !errors.Is(err, ErrClosed) {
			t.Fatalf("Stream after Close: %v", err)
		}
	})
	t.Run("Send ends once the server has ended the stream", func(t *testing.T) {
		client := newTestClient(t, WithAddress(addr))
		st, err := client.Stream(context.Background(), "chat", "Chat.Stop")
		assertNoError(t, err)
		big := strings.Repeat("x", 1000)
		var sendErr error
		for i := 0; i < 5000 && sendErr == nil; i++ { // far past every buffer on the way
			sendErr = st.Send(&Num{S: big})
		}
		if sendErr != io.EOF {
			t.Fatalf("Send: %v, want io.EOF once the server ended the stream", sendErr)
		}
		var m Num
		assertCode(t, st.Recv(&m), CodeAborted)
	})
	t.Run("SetHeader in a stream handler reaches the caller", func(t *testing.T) {
		client := newTestClient(t, WithAddress(addr))
		st, err := client.Stream(context.Background(), "chat", "Chat.Count")
		assertNoError(t, err)
		assertNoError(t, st.Send(&Num{N: 2}))
		assertNoError(t, st.CloseSend())
		assertEqual(t, st.Header().Get("X-Count"), "2")
		var m Num
		for st.Recv(&m) == nil {
		}
	})
	t.Run("a message the client cannot decode ends the stream", func(t *testing.T) {
		client := newTestClient(t, WithAddress(addr))
		st, err := client.Stream(context.Background(), "chat", "Chat.Count")
		assertNoError(t, err)
		assertNoError(t, st.Send(&Num{N: 3}))
		assertNoError(t, st.CloseSend())
		var wrong []string // {"n":0} is not a list
		assertCode(t, st.Recv(&wrong), CodeInternal)
		var m Num
		assertCode(t, st.Recv(&m), CodeInternal) // done, not half-read
	})
}

// streamCountingConn counts the reads that reach the connection.
type streamCountingConn struct {
	*net.TCPConn
	reads int
}

func (c *streamCountingConn) Read(p []byte) (int, error) {
	c.reads++
	return c.TCPConn.Read(p)
}

func TestStreamHandedOffH2ConnReadsThroughABuffer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	assertNoError(t, err)
	defer peer.Close()
	raw, err := ln.Accept()
	assertNoError(t, err)
	defer raw.Close()
	under := &streamCountingConn{TCPConn: raw.(*net.TCPConn)}
	prefix := []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	c := &http1PrefixConn{Conn: under, prefix: prefix, br: bufio.NewReaderSize(under, http1H2ReadBuffer)}

	// The prefix comes first, then frames: 9-byte headers and payloads,
	// which one read of the connection brings in.
	frames := bytes.Repeat([]byte("123456789abcdefghijklmnopqrstuvwxyz"), 100)
	_, err = peer.Write(frames)
	assertNoError(t, err)
	got := make([]byte, len(prefix))
	_, err = io.ReadFull(c, got)
	assertNoError(t, err)
	assertEqual(t, string(got), string(prefix))
	assertEqual(t, under.reads, 0)
	var all []byte
	for len(all) < len(frames) {
		h := make([]byte, 9)
		_, err := io.ReadFull(c, h)
		assertNoError(t, err)
		p := make([]byte, 26)
		_, err = io.ReadFull(c, p)
		assertNoError(t, err)
		all = append(append(all, h...), p...)
	}
	assertEqual(t, string(all), string(frames))
	if under.reads > 3 { // one, unless the bytes arrived in pieces
		t.Errorf("%d reads of the connection for %d bytes in 200 small reads", under.reads, len(frames))
	}

	// A read at least as large as the buffer, with nothing buffered, goes
	// straight to the connection.
	big := bytes.Repeat([]byte{7}, 3*http1H2ReadBuffer)
	go peer.Write(big)
	reads := under.reads
	p := make([]byte, len(big))
	_, err = io.ReadFull(c, p)
	assertNoError(t, err)
	assertEqual(t, bytes.Equal(p, big), true)
	if c.br.Buffered() != 0 {
		t.Errorf("%d bytes left in the buffer", c.br.Buffered())
	}
	t.Logf("%d reads for %d bytes", under.reads-reads, len(big))

	// Deadlines still apply, and the write side still half-closes.
	assertNoError(t, c.SetReadDeadline(time.Now().Add(-time.Second)))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v", err)
	}
	assertNoError(t, c.CloseWrite())
	if n, err := peer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("peer read after CloseWrite: %d, %v", n, err)
	}
}

// streamGateConn is a connection whose writes wait for the test: each
// announces itself on started and returns when gate lets it.
type streamGateConn struct {
	net.Conn // unused methods
	started  chan string
	gate     chan error
	closed   chan struct{}
	mu       sync.Mutex
	readShut bool
	deadline time.Time
}

func newStreamGateConn() *streamGateConn {
	return &streamGateConn{started: make(chan string), gate: make(chan error), closed: make(chan struct{})}
}

func (c *streamGateConn) Write(p []byte) (int, error) {
	c.started <- string(p)
	if err := <-c.gate; err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *streamGateConn) Close() error { close(c.closed); return nil }

func (c *streamGateConn) CloseRead() error {
	c.mu.Lock()
	c.readShut = true
	c.mu.Unlock()
	return nil
}

func (c *streamGateConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}

func TestStreamWriterGathersWritesAndClosesAfterThem(t *testing.T) {
	checkGoroutines(t)
	c := newStreamGateConn()
	var w streamWriter
	w.init(c)

	// While one write is under way, later ones gather into the next.
	w.Write([]byte("a"))
	assertEqual(t, <-c.started, "a")
	for _, s := range []string{"b", "c", "d"} {
		n, err := w.Write([]byte(s))
		assertNoError(t, err)
		assertEqual(t, n, 1)
	}
	c.gate <- nil
	assertEqual(t, <-c.started, "bcd")
	c.gate <- nil
	assertNoError(t, w.flush())

	// Close with a write under way: readers stop at once, later writes
	// fail, and the connection closes once the queue is out, within the
	// linger.
	w.Write([]byte("e"))
	assertEqual(t, <-c.started, "e")
	w.Write([]byte("f"))
	assertNoError(t, w.close())
	if _, err := w.Write([]byte("late")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close: %v", err)
	}
	c.mu.Lock()
	assertEqual(t, c.readShut, true)
	if c.deadline.IsZero() {
		t.Error("no write deadline bounds the queue's last writes")
	}
	c.mu.Unlock()
	select {
	case <-c.closed:
		t.Fatal("closed before the queue went out")
	default:
	}
	c.gate <- nil
	assertEqual(t, <-c.started, "f")
	c.gate <- nil
	<-c.closed
	if err := w.close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}

	// A write error closes the connection and comes back from every later
	// Write.
	c2 := newStreamGateConn()
	var w2 streamWriter
	w2.init(c2)
	w2.Write([]byte("x"))
	<-c2.started
	w2.Write([]byte("y"))
	boom := errors.New("boom")
	c2.gate <- boom
	<-c2.closed
	if err := w2.flush(); err != boom {
		t.Fatalf("flush after the failure: %v", err)
	}
	if _, err := w2.Write([]byte("z")); err != boom {
		t.Fatalf("Write after the failure: %v", err)
	}
}

func TestStreamWriterKeepsOrderUnderLoad(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	defer ln.Close()
	raw, err := net.Dial("tcp", ln.Addr().String())
	assertNoError(t, err)
	peer, err := ln.Accept()
	assertNoError(t, err)
	defer peer.Close()
	c := newStreamConn(raw)
	// Writers in turn under a lock, as net/http's writers are, with more
	// than the queue holds in all.
	var mu sync.Mutex
	var want bytes.Buffer
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				mu.Lock()
				m := fmt.Appendf(nil, "<%d:%d:%s>", g, i, strings.Repeat("x", i%300))
				want.Write(m)
				_, err := c.Write(m)
				mu.Unlock()
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	wg.Wait()
	assertNoError(t, c.Close()) // what is queued still goes out
	b := <-got
	if !bytes.Equal(b, want.Bytes()) {
		t.Fatalf("the peer read %d bytes, not the %d written in order", len(b), want.Len())
	}
}

// TestStreamGzipMessages: a client may compress its stream messages
// (Connect-Content-Encoding: gzip, and the envelope's compressed flag, per
// message); the server takes them within its size limit.
func TestStreamGzipMessages(t *testing.T) {
	srv := NewServer(MaxBodySize(1024))
	assertNoError(t, RegisterHandler(srv, newChat()))
	gz := func(msg string) []byte {
		var b bytes.Buffer
		zw := gzip.NewWriter(&b)
		zw.Write([]byte(msg))
		zw.Close()
		return b.Bytes()
	}
	compressed := func(msgs ...[]byte) []byte {
		var b []byte
		for _, m := range msgs {
			b = streamAppendEnvelope(b, streamFlagCompressed, m)
		}
		return b
	}
	gzipHdr := http.Header{"Connect-Content-Encoding": {"gzip"}}
	big := gz(`{"s":"` + strings.Repeat("x", 2000) + `"}`) // small on the wire, 2 KB once open
	for _, tc := range []struct {
		name string
		hdr  http.Header
		body []byte
		msgs []string
		code Code // of the end-of-stream error; 0 for none
	}{
		{"compressed", gzipHdr, compressed(gz(`{"n":1}`), gz(`{"n":2}`)), []string{`{"n":1}`, `{"n":2}`}, 0},
		{"mixed", gzipHdr, append(envelope(`{"n":1}`), compressed(gz(`{"n":2}`))...), []string{`{"n":1}`, `{"n":2}`}, 0},
		{"no encoding said", nil, compressed(gz(`{"n":1}`)), nil, CodeInvalidArgument},
		{"larger than the limit once open", gzipHdr, compressed(big), nil, CodeResourceExhausted},
		{"not gzip", gzipHdr, compressed([]byte("not gzip at all")), nil, CodeInvalidArgument},
		{"unknown encoding", http.Header{"Connect-Content-Encoding": {"br"}}, envelope(`{"n":1}`), nil, CodeUnimplemented},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, msgs, end := serveStreamRawHeader(t, srv, "/Chat/Echo", "application/connect+json", tc.hdr, tc.body)
			assertEqual(t, status, 200)
			for i := range msgs {
				msgs[i] = strings.TrimSpace(msgs[i])
			}
			assertEqual(t, strings.Join(msgs, " "), strings.Join(tc.msgs, " "))
			switch {
			case tc.code == 0 && end.Error != nil:
				t.Fatalf("end: %+v", end.Error)
			case tc.code != 0 && (end.Error == nil || end.Error.Code != tc.code.String()):
				t.Fatalf("end: %+v, want %s", end.Error, tc.code)
			}
		})
	}
}

// TestStreamClientRefusesUnaskedCompression: our client asks for no
// compression, so a compressed message from a server is a protocol error
// (internal), not something the caller did wrong.
func TestStreamClientRefusesUnaskedCompression(t *testing.T) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"n":1}`))
	zw.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st := &Stream{ctx: ctx, cancel: cancel, codec: JSONCodec{}, max: 1 << 20,
		r: bytes.NewReader(streamAppendEnvelope(nil, streamFlagCompressed, gz.Bytes())), pw: newStreamPipe(1)}
	var m Num
	assertCode(t, st.Recv(&m), CodeInternal)
}
