package micro

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Echo has an endpoint per codec shape.
type Echo struct {
	deadline chan time.Duration // Wait reports the deadline it saw here
	expired  chan error         // and how its context ended
}

// Msg is a message every codec can carry: JSON and gob by reflection, proto
// through hand-written Marshal/Unmarshal (field 1 string, field 2 varint), as
// generated gogo types have.
type Msg struct {
	Text  string
	Count int64
}

func (m *Msg) Marshal() ([]byte, error) {
	b := binary.AppendUvarint([]byte{0x0a}, uint64(len(m.Text)))
	b = append(b, m.Text...)
	b = append(b, 0x10)
	return binary.AppendUvarint(b, uint64(m.Count)), nil
}

func (m *Msg) Unmarshal(b []byte) error {
	*m = Msg{}
	for len(b) > 0 {
		tag := b[0]
		b = b[1:]
		v, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("bad varint")
		}
		b = b[n:]
		switch tag {
		case 0x0a:
			if uint64(len(b)) < v {
				return errors.New("short string")
			}
			m.Text, b = string(b[:v]), b[v:]
		case 0x10:
			m.Count = int64(v)
		default:
			return fmt.Errorf("unknown tag %x", tag)
		}
	}
	return nil
}

func (e *Echo) Struct(ctx context.Context, req *Msg) (*Msg, error) {
	return &Msg{Text: req.Text + "!", Count: req.Count + 1}, nil
}

func (e *Echo) Bytes(ctx context.Context, req *[]byte) (*[]byte, error) {
	out := append([]byte("echo:"), *req...)
	return &out, nil
}

func (e *Echo) Text(ctx context.Context, req *string, rsp *string) error {
	*rsp = strings.ToUpper(*req)
	return nil
}

// ErrorRequest asks Fail for an error.
type ErrorRequest struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
	Plain   bool   `json:"plain"` // return a plain Go error
}

func (e *Echo) Fail(ctx context.Context, req *ErrorRequest) (*Msg, error) {
	if req.Plain {
		return nil, errors.New(req.Message)
	}
	err := NewError(req.Code, req.Message)
	err.Details = []ErrorDetail{{Type: "test.Detail", Value: []byte{0, 1, 2, 0xff}}}
	err.Meta = MD{"X-Retry-In": "5"}
	return nil, err
}

func (e *Echo) Panic(ctx context.Context, req *Msg) (*Msg, error) {
	panic("boom")
}

func (e *Echo) Wait(ctx context.Context, req *Msg) (*Msg, error) {
	dl, ok := ctx.Deadline()
	if !ok {
		e.deadline <- 0
	} else {
		e.deadline <- time.Until(dl)
	}
	<-ctx.Done()
	e.expired <- ctx.Err()
	return nil, ctx.Err()
}

func (e *Echo) Meta(ctx context.Context, req *Msg) (*Msg, error) {
	md, _ := FromContext(ctx)
	if err := SetHeader(ctx, "X-Answer", md.Get("x-question")+"?"); err != nil {
		return nil, err
	}
	return &Msg{Text: md.Get("X-Question")}, nil
}

// newTestServer serves handlers on 127.0.0.1:0 and returns its address.
func newTestServer(t *testing.T, opts []ServerOption, handlers ...any) (string, *Server) {
	t.Helper()
	srv := NewServer(opts...)
	for _, h := range handlers {
		assertNoError(t, RegisterHandler(srv, h))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln.Addr().String(), srv
}

func newTestClient(t *testing.T, opts ...ClientOption) *Client {
	c := NewClient(opts...)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestCurlStyleRawHTTP(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, &Greeter{id: "g"})
	conn, err := net.Dial("tcp", addr)
	assertNoError(t, err)
	defer conn.Close()
	body := `{"name":"ada"}`
	// What curl -H 'Content-Type: application/json' -d '{"name":"ada"}' sends,
	// twice on one keep-alive connection.
	req := "POST /Greeter/Hello HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n" +
		"Content-Type: application/json\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body
	br := bufio.NewReader(conn)
	for i := 0; i < 2; i++ {
		_, err = io.WriteString(conn, req)
		assertNoError(t, err)
		rsp, err := http.ReadResponse(br, nil)
		assertNoError(t, err)
		got, _ := io.ReadAll(rsp.Body)
		rsp.Body.Close()
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, rsp.Header.Get("Content-Type"), "application/json")
		assertEqual(t, strings.TrimSpace(string(got)), `{"message":"hello ada","node":"g"}`)
	}
}

func TestCodecsRoundTrip(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, []ServerOption{WithCodec(GobCodec{})}, &Echo{})
	client := newTestClient(t, WithAddress(addr))
	ctx := context.Background()
	for _, ct := range []string{ContentTypeJSON, ContentTypeProto, ContentTypeGob} {
		t.Run(ct, func(t *testing.T) {
			var rsp Msg
			assertNoError(t, client.Call(ctx, "echo", "Echo.Struct", &Msg{Text: "hi", Count: 41}, &rsp, ContentType(ct)))
			assertEqual(t, rsp, Msg{Text: "hi!", Count: 42})
		})
	}
	t.Run("bytes", func(t *testing.T) {
		var rsp []byte
		assertNoError(t, client.Call(ctx, "echo", "Echo.Bytes", []byte{0, 1, 0xfe}, &rsp, ContentType(ContentTypeBytes)))
		assertEqual(t, string(rsp), "echo:\x00\x01\xfe")
	})
	t.Run("text", func(t *testing.T) {
		var rsp string
		assertNoError(t, client.Call(ctx, "echo", "Echo.Text", "shout", &rsp, ContentType("text/plain; charset=utf-8")))
		assertEqual(t, rsp, "SHOUT")
	})
	t.Run("gob is opt-in for servers", func(t *testing.T) {
		plain, _ := newTestServer(t, nil, &Echo{})
		var rsp Msg
		err := newTestClient(t, WithAddress(plain)).Call(ctx, "echo", "Echo.Struct", &Msg{}, &rsp, ContentType(ContentTypeGob))
		assertCode(t, err, CodeInvalidArgument)
	})
	t.Run("proto without methods", func(t *testing.T) {
		var rsp HelloResponse
		err := client.Call(ctx, "echo", "Echo.Struct", &HelloRequest{}, &rsp, ContentType(ContentTypeProto))
		assertCode(t, err, CodeInternal)
		if !strings.Contains(err.Error(), "google.golang.org/protobuf") {
			t.Fatalf("error gives no hint: %v", err)
		}
	})
}

func TestErrorCodesSurviveTheWire(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, &Echo{})
	client := newTestClient(t, WithAddress(addr), Retries(0))
	for code := CodeCanceled; code <= CodeUnauthenticated; code++ {
		t.Run(code.String(), func(t *testing.T) {
			var rsp Msg
			var md MD
			err := client.Call(context.Background(), "echo", "Echo.Fail", &ErrorRequest{Code: code, Message: "because " + code.String()}, &rsp, ResponseHeader(&md))
			assertCode(t, err, code)
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("%T is not *Error", err)
			}
			assertEqual(t, e.Message, "because "+code.String())
			assertEqual(t, len(e.Details), 1)
			assertEqual(t, e.Details[0].Type, "test.Detail")
			assertEqual(t, string(e.Details[0].Value), "\x00\x01\x02\xff")
			assertEqual(t, e.Meta.Get("x-retry-in"), "5")
		})
	}
	t.Run("plain error", func(t *testing.T) {
		var rsp Msg
		err := client.Call(context.Background(), "echo", "Echo.Fail", &ErrorRequest{Plain: true, Message: "disk on fire"}, &rsp)
		assertCode(t, err, CodeUnknown)
		assertEqual(t, AsError(err).Message, "disk on fire")
	})
}

func TestDeadlineReachesTheHandlerAndExpiresThere(t *testing.T) {
	checkGoroutines(t)
	echo := &Echo{deadline: make(chan time.Duration, 1), expired: make(chan error, 1)}
	addr, _ := newTestServer(t, nil, echo)
	client := newTestClient(t, WithAddress(addr))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	var rsp Msg
	err := client.Call(ctx, "echo", "Echo.Wait", &Msg{}, &rsp)
	assertCode(t, err, CodeDeadlineExceeded)
	seen := <-echo.deadline
	if seen <= 0 || seen > 300*time.Millisecond {
		t.Fatalf("handler saw deadline in %v, want within the caller's 300ms", seen)
	}
	// Its context ended at the deadline: expired there, or canceled by the
	// caller hanging up in the same instant (the two are a millisecond
	// apart, by design: the header carries whole milliseconds, rounded down).
	if err := <-echo.expired; err == nil {
		t.Fatal("handler's context did not end")
	}

	// With no deadline on the caller's side, the header alone makes the
	// handler's context expire, and the reply says so.
	status, e, _ := rawCall(t, addr, "/Echo/Wait", "application/json", []byte(`{}`), map[string]string{"Connect-Timeout-Ms": "50"})
	assertEqual(t, status, 504)
	assertEqual(t, e.Code, CodeDeadlineExceeded)
	if seen := <-echo.deadline; seen <= 0 || seen > 50*time.Millisecond {
		t.Fatalf("handler saw deadline in %v, want within 50ms", seen)
	}
	if err := <-echo.expired; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("handler's context ended with %v, want the deadline", err)
	}
}

func TestHandlerPanicIsInternalAndServerLives(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, &Echo{})
	client := newTestClient(t, WithAddress(addr))
	var rsp Msg
	assertCode(t, client.Call(context.Background(), "echo", "Echo.Panic", &Msg{}, &rsp), CodeInternal)
	assertNoError(t, client.Call(context.Background(), "echo", "Echo.Struct", &Msg{Text: "still"}, &rsp))
	assertEqual(t, rsp.Text, "still!")
}

// rawCall posts body to path and returns the status and the decoded error.
func rawCall(t *testing.T, addr, path, contentType string, body []byte, header map[string]string) (int, *Error, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", contentType)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	rsp, err := http.DefaultTransport.RoundTrip(req)
	assertNoError(t, err)
	defer rsp.Body.Close()
	b, _ := io.ReadAll(rsp.Body)
	if rsp.StatusCode == 200 {
		return 200, nil, b
	}
	return rsp.StatusCode, rpcReadError(rsp.StatusCode, rsp.Header, b), b
}

func TestBadRequests(t *testing.T) {
	addr, _ := newTestServer(t, []ServerOption{MaxBodySize(1024), WithCodec(GobCodec{})}, &Echo{}, &Greeter{id: "g"})
	big := bytes.Repeat([]byte("a"), 2048)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"name":"` + strings.Repeat("z", 4096) + `"}`)) // small on the wire, big unpacked
	zw.Close()
	tests := []struct {
		name        string
		path, ct    string
		body        []byte
		status      int
		code        Code
		messageHint string
		header      map[string]string
	}{
		{"malformed json", "/Greeter/Hello", "application/json", []byte(`{"name":`), 400, CodeInvalidArgument, "malformed", nil},
		{"wrong json type", "/Greeter/Hello", "application/json", []byte(`{"name":7}`), 400, CodeInvalidArgument, "malformed", nil},
		{"body over the limit", "/Greeter/Hello", "application/json", big, 429, CodeResourceExhausted, "larger than 1024", nil},
		{"gzip bomb over the limit", "/Greeter/Hello", "application/json", gz.Bytes(), 429, CodeResourceExhausted, "larger than 1024", map[string]string{"Content-Encoding": "gzip"}},
		{"unknown endpoint", "/Greeter/Goodbye", "application/json", []byte(`{}`), 501, CodeUnimplemented, "no endpoint", nil},
		{"unknown service", "/Nope/Hello", "application/json", []byte(`{}`), 501, CodeUnimplemented, "no endpoint", nil},
		{"unknown content type", "/Greeter/Hello", "application/xml", []byte(`<a/>`), 415, CodeInvalidArgument, "unsupported content type", nil},
		{"bad timeout", "/Greeter/Hello", "application/json", []byte(`{}`), 400, CodeInvalidArgument, "Connect-Timeout-Ms", map[string]string{"Connect-Timeout-Ms": "-5"}},
		{"unknown encoding", "/Greeter/Hello", "application/json", []byte(`{}`), 501, CodeUnimplemented, "Content-Encoding", map[string]string{"Content-Encoding": "br"}},
		{"bad gzip", "/Greeter/Hello", "application/json", []byte(`not gzip`), 400, CodeInvalidArgument, "gzip", map[string]string{"Content-Encoding": "gzip"}},
		{"garbage gob", "/Echo/Struct", "application/gob", []byte{0x03, 0xff, 0xff, 0xff, 0xff, 0x07}, 400, CodeInvalidArgument, "malformed", nil},
		{"garbage proto", "/Echo/Struct", "application/proto", []byte{0x0a, 0xff}, 400, CodeInvalidArgument, "malformed", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, e, raw := rawCall(t, addr, tt.path, tt.ct, tt.body, tt.header)
			assertEqual(t, status, tt.status)
			if e == nil {
				t.Fatalf("no error body: %s", raw)
			}
			assertEqual(t, e.Code, tt.code)
			if !strings.Contains(e.Message, tt.messageHint) {
				t.Fatalf("message %q lacks %q", e.Message, tt.messageHint)
			}
		})
	}
	t.Run("client sees the same", func(t *testing.T) {
		client := newTestClient(t, WithAddress(addr))
		var rsp HelloResponse
		assertCode(t, client.Call(context.Background(), "g", "Greeter.Hello", &HelloRequest{Name: string(big)}, &rsp), CodeResourceExhausted)
		assertCode(t, client.Call(context.Background(), "g", "Greeter.Goodbye", &HelloRequest{}, &rsp), CodeUnimplemented)
		assertCode(t, client.Call(context.Background(), "g", "NoDot", &HelloRequest{}, &rsp), CodeInvalidArgument)
	})
	t.Run("GET is refused", func(t *testing.T) {
		rsp, err := http.Get("http://" + addr + "/Greeter/Hello")
		assertNoError(t, err)
		rsp.Body.Close()
		assertEqual(t, rsp.StatusCode, http.StatusMethodNotAllowed)
		assertEqual(t, rsp.Header.Get("Allow"), "POST")
	})
}

func TestGzipRequestAndHealth(t *testing.T) {
	addr, srv := newTestServer(t, nil, &Greeter{id: "g"})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"name":"zip"}`))
	zw.Close()
	status, _, body := rawCall(t, addr, "/Greeter/Hello", "application/json", gz.Bytes(), map[string]string{"Content-Encoding": "gzip"})
	assertEqual(t, status, 200)
	assertEqual(t, strings.TrimSpace(string(body)), `{"message":"hello zip","node":"g"}`)

	rsp, err := http.Get("http://" + addr + "/health")
	assertNoError(t, err)
	b, _ := io.ReadAll(rsp.Body)
	rsp.Body.Close()
	assertEqual(t, rsp.StatusCode, 200)
	assertEqual(t, string(b), `{"status":"serving"}`)

	rec := httptest.NewRecorder()
	srv.draining.Store(true)
	srv.ServeHTTP(rec, httptest.NewRequest("GET", "/health", nil))
	assertEqual(t, rec.Code, 503)
}

func TestMetadataBothWays(t *testing.T) {
	addr, _ := newTestServer(t, nil, &Echo{})
	client := newTestClient(t, WithAddress(addr))
	ctx := NewContext(context.Background(), MD{"x-question": "why"})
	var rsp Msg
	var md MD
	assertNoError(t, client.Call(ctx, "echo", "Echo.Meta", &Msg{}, &rsp, ResponseHeader(&md)))
	assertEqual(t, rsp.Text, "why")
	assertEqual(t, md.Get("X-Answer"), "why?")
	// Call options add to the context's metadata.
	assertNoError(t, client.Call(ctx, "echo", "Echo.Meta", &Msg{}, &rsp, WithMetadata(MD{"X-Question": "how"})))
	assertEqual(t, rsp.Text, "how")
	if err := SetHeader(context.Background(), "a", "b"); err == nil {
		t.Fatal("SetHeader outside a handler succeeded")
	}
}

func TestMiddlewareOrder(t *testing.T) {
	// Client and server wrappers run in different goroutines, ordered by
	// the network, which the race detector does not see: hence the lock.
	var mu sync.Mutex
	var trace []string
	note := func(s string) {
		mu.Lock()
		trace = append(trace, s)
		mu.Unlock()
	}
	hw := func(name string) HandlerWrapper {
		return func(next HandlerFunc) HandlerFunc {
			return func(ctx context.Context, req *Request) (any, error) {
				note(name + ">" + req.Endpoint)
				rsp, err := next(ctx, req)
				note(name + "<")
				return rsp, err
			}
		}
	}
	cw := func(name string) CallWrapper {
		return func(next CallFunc) CallFunc {
			return func(ctx context.Context, req *Request, rsp any, opts ...CallOption) error {
				note(name + ">" + req.Service)
				err := next(ctx, req, rsp, opts...)
				note(name + "<")
				return err
			}
		}
	}
	deny := func(next HandlerFunc) HandlerFunc {
		return func(ctx context.Context, req *Request) (any, error) {
			if req.Header.Get("Authorization") == "" {
				return nil, NewError(CodeUnauthenticated, "no token")
			}
			return next(ctx, req)
		}
	}
	addr, _ := newTestServer(t, []ServerOption{WrapHandler(hw("s1"), hw("s2"), deny)}, &Greeter{id: "g"})
	client := newTestClient(t, WithAddress(addr), WrapCall(cw("c1"), cw("c2")))
	var rsp HelloResponse
	assertCode(t, client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp), CodeUnauthenticated)
	mu.Lock()
	trace = nil
	mu.Unlock()
	ctx := NewContext(context.Background(), MD{"Authorization": "Bearer x"})
	assertNoError(t, client.Call(ctx, "greeter", "Greeter.Hello", &HelloRequest{}, &rsp))
	mu.Lock()
	defer mu.Unlock()
	assertEqual(t, strings.Join(trace, " "), "c1>greeter c2>greeter s1>Greeter.Hello s2>Greeter.Hello s2< s1< c2< c1<")
}

type badValueReceiver struct{}

func (*badValueReceiver) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	return nil
}

type badShapes struct{}

func (badShapes) Hello(ctx context.Context, req *HelloRequest, rsp HelloResponse) error { return nil }
func (badShapes) Bye(ctx context.Context, req *HelloRequest) *HelloResponse             { return nil }

type notEndpoints struct{}

func (notEndpoints) Helper(s string) string { return s }

func TestRegisterHandlerErrorsSayHowToFix(t *testing.T) {
	tests := []struct {
		name string
		h    any
		opts []HandlerOption
		want string
	}{
		{"nil", nil, nil, "handler is nil"},
		{"value with pointer methods", badValueReceiver{}, nil, "hint: pass a pointer"},
		{"response not a pointer", badShapes{}, nil, "hint: use *micro.HelloResponse"},
		{"no endpoint methods", notEndpoints{}, nil, "no exported method of the form"},
		{"anonymous type", &struct{ Greeter }{}, nil, "pass HandlerName"},
		{"bad name", &Greeter{}, []HandlerOption{HandlerName("a/b")}, "use ASCII letters"},
		{"name with CRLF", &Greeter{}, []HandlerOption{HandlerName("a\r\nX: y")}, "use ASCII letters"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := RegisterHandler(NewServer(), tt.h, tt.opts...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want it to say %q", err, tt.want)
			}
		})
	}
	srv := NewServer()
	assertNoError(t, RegisterHandler(srv, &Greeter{}, HandlerName("helloworld.Greeter")))
	if err := RegisterHandler(srv, &Greeter{}, HandlerName("helloworld.Greeter")); err == nil {
		t.Fatal("registered one endpoint twice")
	}
	eps := srv.Endpoints()
	assertEqual(t, eps[0].Name, "helloworld.Greeter.Hello")
}

func TestClientWithoutRegistryOrNodes(t *testing.T) {
	client := newTestClient(t)
	var rsp HelloResponse
	assertCode(t, client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp), CodeFailedPrecondition)
	reg := NewMemoryRegistry()
	defer reg.Close()
	client2 := newTestClient(t, WithRegistry(reg))
	err := client2.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp)
	assertCode(t, err, CodeUnavailable)
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("%v does not wrap ErrNotFound", err)
	}
	client.Close()
	if err := client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: %v", err)
	}
}

// FuzzServeUnary sends arbitrary requests through the server: it must never
// panic, and every reply must be a success or a well-formed Connect error.
func FuzzServeUnary(f *testing.F) {
	f.Add("/Greeter/Hello", "application/json", "", "", []byte(`{"name":"ada"}`))
	f.Add("/Echo/Struct", "application/proto", "", "", []byte{0x0a, 0x02, 'h', 'i', 0x10, 0x05})
	f.Add("/Echo/Struct", "application/gob", "", "", []byte{0x1f, 0xff, 0x81, 0x03, 0x01})
	f.Add("/Echo/Bytes", "application/octet-stream", "100", "", []byte{0})
	f.Add("/Echo/Text", "text/plain; charset=utf-8", "", "gzip", []byte("\x1f\x8b"))
	f.Add("/Greeter/Hello", "application/json", "99999999999", "identity", []byte(`[`))
	srv := NewServer(MaxBodySize(4096), WithCodec(GobCodec{}))
	if err := RegisterHandler(srv, &Greeter{id: "f"}); err != nil {
		f.Fatal(err)
	}
	if err := RegisterHandler(srv, &Echo{}); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, path, ct, timeout, encoding string, body []byte) {
		if strings.Contains(path, "Wait") || strings.Contains(path, "Slow") {
			return // they block until told, by design
		}
		req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
		req.URL.Path = path
		req.Header.Set("Content-Type", ct)
		if timeout != "" {
			req.Header.Set("Connect-Timeout-Ms", timeout)
		}
		if encoding != "" {
			req.Header.Set("Content-Encoding", encoding)
		}
		testServeConnect(t, srv, req)
	})
}

// BenchmarkCall measures a whole unary call, client and server, over
// loopback TCP in one process: allocations are both sides' together.
func BenchmarkCall(b *testing.B) {
	srv := NewServer()
	if err := RegisterHandler(srv, &Echo{}); err != nil {
		b.Fatal(err)
	}
	if err := RegisterHandler(srv, &Greeter{}); err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	client := NewClient(WithAddress(ln.Addr().String()))
	defer client.Close()
	payload := bytes.Repeat([]byte("x"), 64)
	b.Run("bytes-64B", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			var rsp []byte
			for pb.Next() {
				if err := client.Call(context.Background(), "echo", "Echo.Bytes", payload, &rsp, ContentType(ContentTypeBytes)); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("bytes-64B-x32", func(b *testing.B) { // 16 callers a CPU: connections are shared
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			var rsp []byte
			for pb.Next() {
				if err := client.Call(context.Background(), "echo", "Echo.Bytes", payload, &rsp, ContentType(ContentTypeBytes)); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("json-64B", func(b *testing.B) {
		b.ReportAllocs()
		req := &HelloRequest{Name: string(payload)}
		b.RunParallel(func(pb *testing.PB) {
			var rsp HelloResponse
			for pb.Next() {
				if err := client.Call(context.Background(), "greeter", "Greeter.Hello", req, &rsp); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// BenchmarkServeHTTP measures the server's side alone: decode, dispatch,
// handler, encode, with no network.
func BenchmarkServeHTTP(b *testing.B) {
	srv := NewServer()
	if err := RegisterHandler(srv, &Greeter{}); err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"name":"` + strings.Repeat("x", 64) + `"}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		req := httptest.NewRequest(http.MethodPost, "/Greeter/Hello", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		if rec.Code != 200 {
			b.Fatal(rec.Code)
		}
	}
}

func TestCleartextHTTP2(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, &Greeter{id: "h2"})
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true) // prior knowledge, as gRPC-style clients speak it
	tr := &http.Transport{Protocols: protocols}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/Greeter/Hello", strings.NewReader(`{"name":"h2"}`))
	req.Header.Set("Content-Type", "application/json")
	rsp, err := tr.RoundTrip(req)
	assertNoError(t, err)
	defer rsp.Body.Close()
	body, _ := io.ReadAll(rsp.Body)
	assertEqual(t, rsp.ProtoMajor, 2)
	assertEqual(t, rsp.StatusCode, 200)
	assertEqual(t, strings.TrimSpace(string(body)), `{"message":"hello h2","node":"h2"}`)
}

func TestCallContextSemantics(t *testing.T) {
	checkGoroutines(t)
	parent, cancelParent := context.WithCancel(context.Background())
	defer cancelParent()
	t.Run("deadline without a timer", func(t *testing.T) {
		c := &rpcCall{parent: parent, deadline: time.Now().Add(-time.Millisecond), head: &rpcHead{}}
		dl, ok := c.Deadline()
		assertEqual(t, ok, true)
		assertEqual(t, dl, c.deadline)
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatalf("Err %v", c.Err())
		}
		<-c.Done() // a real context now, already expired
		if !errors.Is(c.Err(), context.DeadlineExceeded) {
			t.Fatalf("Err after Done %v", c.Err())
		}
	})
	t.Run("children hook on and end with the handler", func(t *testing.T) {
		c := &rpcCall{parent: parent, deadline: time.Now().Add(time.Hour), head: &rpcHead{header: http.Header{"X-A": {"b"}}}}
		type testKey struct{}
		child, cancel := context.WithCancel(context.WithValue(c, testKey{}, 1))
		defer cancel()
		md, ok := FromContext(child) // found through the children
		assertEqual(t, ok, true)
		assertEqual(t, md.Get("x-a"), "b")
		assertEqual(t, c.Err(), nil)
		c.finish()
		<-child.Done()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("Err after finish %v", c.Err())
		}
	})
	t.Run("parent cancellation", func(t *testing.T) {
		p, cancel := context.WithCancel(context.Background())
		c := &rpcCall{parent: p, head: &rpcHead{}}
		_, ok := c.Deadline()
		assertEqual(t, ok, false)
		cancel()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("Err %v", c.Err())
		}
		<-c.Done()
		c.finish()
	})
	t.Run("Done after finish is closed", func(t *testing.T) {
		c := &rpcCall{parent: parent, head: &rpcHead{}}
		c.finish()
		<-c.Done()
	})
}

// TestEndedContextSendsNothing calls and opens streams with a context that
// has already been canceled or run out, on clients whose connections are
// up: each returns the context's error as its code says, and nothing
// reaches the server, neither a request nor a new connection.
func TestEndedContextSendsNothing(t *testing.T) {
	checkGoroutines(t)
	var handled atomic.Int32
	count := func(next HandlerFunc) HandlerFunc {
		return func(ctx context.Context, req *Request) (any, error) {
			handled.Add(1)
			return next(ctx, req)
		}
	}
	countStream := func(next StreamHandlerFunc) StreamHandlerFunc {
		return func(ctx context.Context, req *Request, st *Stream) error {
			handled.Add(1)
			return next(ctx, req, st)
		}
	}
	srv := NewServer(WrapHandler(count), WrapStream(countStream))
	assertNoError(t, RegisterHandler(srv, &Greeter{id: "g"}))
	assertNoError(t, RegisterHandler(srv, newChat()))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	cl := &countingListener{Listener: ln}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(cl) }()
	t.Cleanup(func() { srv.Close(); <-done })
	addr := ln.Addr().String()
	passThrough := func(next CallFunc) CallFunc { return next }
	clients := map[string]*Client{
		"fast path": newTestClient(t, WithAddress(addr)),
		"transport": newTestClient(t, WithAddress(addr), WithTransport(&http.Transport{})),
		"wrapped":   newTestClient(t, WithAddress(addr), WrapCall(passThrough)),
	}
	for _, c := range clients { // connections up, for streams and for calls
		st, err := c.Stream(context.Background(), "chat", "Chat.Echo")
		assertNoError(t, err)
		assertNoError(t, st.Send(&Num{N: 1}))
		var m Num
		assertNoError(t, st.Recv(&m))
		assertNoError(t, st.Close())
		var rsp HelloResponse
		assertNoError(t, c.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "x"}, &rsp))
	}
	wantHandled, wantConns := handled.Load(), cl.n.Load()
	if wantHandled != 2*int32(len(clients)) {
		t.Fatalf("%d calls and streams handled, want %d", wantHandled, 2*len(clients))
	}

	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for name, c := range clients {
		for _, tc := range []struct {
			ctx  context.Context
			want Code
			is   error
		}{{canceled, CodeCanceled, context.Canceled}, {expired, CodeDeadlineExceeded, context.DeadlineExceeded}} {
			var rsp HelloResponse
			err := c.Call(tc.ctx, "greeter", "Greeter.Hello", &HelloRequest{Name: "x"}, &rsp)
			if CodeOf(err) != tc.want || !errors.Is(err, tc.is) {
				t.Errorf("%s: Call with an ended context: %v, want %v", name, err, tc.want)
			}
			st, err := c.Stream(tc.ctx, "chat", "Chat.Echo")
			if st != nil {
				t.Errorf("%s: Stream with an ended context opened a stream", name)
				st.Close()
			} else if CodeOf(err) != tc.want || !errors.Is(err, tc.is) {
				t.Errorf("%s: Stream with an ended context: %v, want %v", name, err, tc.want)
			}
		}
	}
	// A live call on each client after them: once it is handled, anything
	// the ended ones sent down the same connection has been handled too.
	for _, c := range clients {
		var rsp HelloResponse
		assertNoError(t, c.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "x"}, &rsp))
	}
	if n, conns := handled.Load()-int32(len(clients)), cl.n.Load(); n != wantHandled || conns != wantConns {
		t.Fatalf("ended contexts reached the server: %d handled, %d connections; want %d and %d",
			n, conns, wantHandled, wantConns)
	}
}

// TestGetNoSideEffects: methods marked NoSideEffects answer Connect's unary
// GET (the request in the query) as they answer POST; others refuse GET.
func TestGetNoSideEffects(t *testing.T) {
	srv := NewServer(MaxBodySize(1024), ReadTimeout(20*time.Millisecond))
	g := &Greeter{id: "g", started: make(chan struct{}, 1), release: make(chan struct{})}
	assertNoError(t, RegisterHandler(srv, g, NoSideEffects("Hello", "Slow")))
	assertNoError(t, RegisterHandler(srv, &Echo{}))
	err := RegisterHandler(NewServer(), &Greeter{}, NoSideEffects("Nope"))
	if err == nil || !strings.Contains(err.Error(), `NoSideEffects("Nope")`) {
		t.Fatalf("NoSideEffects of a missing method: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	defer func() { srv.Close(); <-done }()
	base := "http://" + ln.Addr().String()

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`{"name":"zip"}`))
	zw.Close()
	b64 := func(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
	for _, tc := range []struct {
		name, path, query string
		status            int
		body              string // the reply, or the error code
	}{
		{"json", "/Greeter/Hello", "encoding=json&message=" + url.QueryEscape(`{"name":"Ada"}`), 200, `{"message":"hello Ada","node":"g"}`},
		{"all of it", "/Greeter/Hello", "connect=v1&encoding=json&base64=1&message=" + b64([]byte(`{"name":"Bo"}`)), 200, `{"message":"hello Bo","node":"g"}`},
		{"padded base64", "/Greeter/Hello", "encoding=json&base64=1&message=" + base64.URLEncoding.EncodeToString([]byte(`{"name":"C"}`)), 200, `{"message":"hello C","node":"g"}`},
		{"gzip", "/Greeter/Hello", "encoding=json&base64=1&compression=gzip&message=" + b64(gz.Bytes()), 200, `{"message":"hello zip","node":"g"}`},
		{"empty message", "/Greeter/Hello", "encoding=json&message=", 200, `{"message":"hello ","node":"g"}`},
		{"no message", "/Greeter/Hello", "encoding=json", 400, "invalid_argument"},
		{"malformed query", "/Greeter/Hello", "encoding=json&message=%ZZ", 400, "invalid_argument"},
		{"no encoding", "/Greeter/Hello", "message=%7B%7D", 400, "invalid_argument"},
		{"unknown encoding", "/Greeter/Hello", "encoding=yaml&message=x", 415, "invalid_argument"}, // as for POST
		{"another version", "/Greeter/Hello", "connect=v2&encoding=json", 400, "invalid_argument"},
		{"bad base64", "/Greeter/Hello", "encoding=json&base64=1&message=!!", 400, "invalid_argument"},
		{"too big", "/Greeter/Hello", "encoding=json&message=" + strings.Repeat("x", 1100), 429, "resource_exhausted"},
		{"not marked", "/Echo/Struct", "encoding=json&message=%7B%7D", 405, "unimplemented"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rsp, err := http.Get(base + tc.path + "?" + tc.query)
			assertNoError(t, err)
			body, _ := io.ReadAll(rsp.Body)
			rsp.Body.Close()
			assertEqual(t, rsp.StatusCode, tc.status)
			if tc.status == 405 {
				assertEqual(t, rsp.Header.Get("Allow"), "POST")
			}
			if tc.status == 200 {
				assertEqual(t, strings.TrimSpace(string(body)), tc.body)
				return
			}
			var e struct{ Code string }
			assertNoError(t, json.Unmarshal(body, &e))
			assertEqual(t, e.Code, tc.body)
		})
	}
	rsp, err := http.Head(base + "/Greeter/Hello")
	assertNoError(t, err)
	rsp.Body.Close()
	assertEqual(t, rsp.StatusCode, http.StatusMethodNotAllowed)
	assertEqual(t, rsp.Header.Get("Allow"), "GET, POST")

	// ReadTimeout (20 ms here) bounds writing the reply, not the handler:
	// one that takes longer still gets its reply out, by GET and by POST
	// through net/http (chunked, so not on the fast path).
	for _, call := range []func() (*http.Response, error){
		func() (*http.Response, error) {
			return http.Get(base + "/Greeter/Slow?encoding=json&message=" + url.QueryEscape(`{"name":"late"}`))
		},
		func() (*http.Response, error) {
			body := io.MultiReader(strings.NewReader(`{"name":`), strings.NewReader(`"late"}`)) // no length: chunked
			return http.Post(base+"/Greeter/Slow", "application/json", body)
		},
	} {
		var rsp *http.Response
		var body []byte
		done := make(chan error, 1)
		go func() {
			var err error
			if rsp, err = call(); err == nil {
				body, err = io.ReadAll(rsp.Body)
				rsp.Body.Close()
			}
			done <- err
		}()
		<-g.started
		<-time.After(60 * time.Millisecond) // the slow handler: three times ReadTimeout
		g.release <- struct{}{}
		assertNoError(t, <-done)
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, strings.TrimSpace(string(body)), `{"message":"done late","node":"g"}`)
	}
}

// FuzzServeGet sends arbitrary queries to methods that answer GET: the
// reply is a result or a well-formed Connect error, never a panic.
func FuzzServeGet(f *testing.F) {
	f.Add("/Greeter/Hello", "encoding=json&message="+url.QueryEscape(`{"name":"ada"}`))
	f.Add("/Greeter/Hello", "connect=v1&encoding=json&base64=1&message=eyJuYW1lIjoiYiJ9")
	f.Add("/Greeter/Hello", "encoding=json&base64=1&compression=gzip&message=H4sIAAAAAAAA_w")
	f.Add("/Echo/Struct", "encoding=gob&message=%1f%ff")
	f.Add("/Echo/Bytes", "encoding=octet-stream&message=%00;x")
	srv := NewServer(MaxBodySize(4096), WithCodec(GobCodec{}))
	if err := RegisterHandler(srv, &Greeter{id: "f"}, NoSideEffects("Hello")); err != nil {
		f.Fatal(err)
	}
	if err := RegisterHandler(srv, &Echo{}, NoSideEffects("Struct", "Bytes", "Text")); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, path, query string) {
		if strings.Contains(path, "Wait") || strings.Contains(path, "Slow") {
			return // they block until told, by design
		}
		req := httptest.NewRequest(http.MethodGet, "/", nil)
		req.URL.Path, req.URL.RawQuery = path, query
		testServeConnect(t, srv, req)
	})
}

// testServeConnect serves req and checks that the reply is a result or a
// well-formed Connect error.
func testServeConnect(t *testing.T, srv *Server, req *http.Request) {
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	if rec.Code == 200 {
		return
	}
	var wire rpcWireError
	if err := json.Unmarshal(rec.Body.Bytes(), &wire); err != nil {
		t.Fatalf("status %d with a body that is not a Connect error: %q", rec.Code, rec.Body.String())
	}
	if _, ok := ParseCode(wire.Code); !ok {
		t.Fatalf("unknown code %q", wire.Code)
	}
}
