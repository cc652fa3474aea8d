package interop_test

// Tests of connect-go clients calling a micro server.

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/micro-kit/micro"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Greeter is the micro handler that connect-go clients call, registered as
// "interop.v1.Greeter".
type Greeter struct {
	waits chan waitSeen // Wait reports what it saw here; buffered
}

// waitSeen is what Wait saw of its context's deadline.
type waitSeen struct {
	ok   bool          // the context had a deadline
	left time.Duration // time left until it when Wait started
}

// FailRequest asks Fail for an error.
type FailRequest struct {
	Code    string `json:"code"`    // a Connect code name; empty for a plain Go error
	Message string `json:"message"` // the error's message
	Detail  string `json:"detail"`  // if set, sent as a google.protobuf.StringValue detail
	Reason  string `json:"reason"`  // if set, sent as the error's X-Reason header
}

// Hello greets by name, and echoes the X-Trace-Id request header as a
// response header.
func (g *Greeter) Hello(ctx context.Context, req *HelloRequest) (*HelloResponse, error) {
	if req.Name == "" {
		return nil, micro.NewError(micro.CodeInvalidArgument, "name is empty")
	}
	if md, ok := micro.FromContext(ctx); ok && md.Get("X-Trace-Id") != "" {
		if err := micro.SetHeader(ctx, "X-Trace-Id", md.Get("X-Trace-Id")); err != nil {
			return nil, err
		}
	}
	return &HelloResponse{Message: "hello, " + req.Name}, nil
}

// Fail returns the error the request describes.
func (g *Greeter) Fail(ctx context.Context, req *FailRequest) (*HelloResponse, error) {
	if req.Code == "" {
		return nil, errors.New(req.Message)
	}
	code, ok := micro.ParseCode(req.Code)
	if !ok {
		return nil, micro.Errorf(micro.CodeInvalidArgument, "bad code %q", req.Code)
	}
	e := micro.NewError(code, req.Message)
	if req.Detail != "" {
		b, err := proto.Marshal(wrapperspb.String(req.Detail))
		if err != nil {
			return nil, err
		}
		e.Details = append(e.Details, micro.ErrorDetail{Type: "google.protobuf.StringValue", Value: b})
	}
	if req.Reason != "" {
		e.Meta = micro.MD{}
		e.Meta.Set("X-Reason", req.Reason)
	}
	return nil, e
}

// Wait reports its deadline and blocks until its context ends. It has the
// (ctx, req, rsp) form, where Hello and Fail have the returning one.
func (g *Greeter) Wait(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	dl, ok := ctx.Deadline()
	g.waits <- waitSeen{ok: ok, left: time.Until(dl)}
	<-ctx.Done()
	return ctx.Err()
}

// newGreeterServer serves a Greeter until the test ends and returns the base
// URL and the handler.
func newGreeterServer(t *testing.T) (string, *Greeter) {
	t.Helper()
	srv := micro.NewServer()
	g := &Greeter{waits: make(chan waitSeen, 1)}
	if err := micro.RegisterHandler(srv, g, micro.HandlerName("interop.v1.Greeter")); err != nil {
		t.Fatal(err)
	}
	return serve(t, srv), g
}

// newStruct builds a structpb.Struct or fails the test.
func newStruct(t *testing.T, fields map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(fields)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConnectClientCallsServer(t *testing.T) {
	base, _ := newGreeterServer(t)
	for _, tc := range []struct {
		name string
		hc   *http.Client
	}{
		{"http1", newHTTPClient(t)},
		{"h2c", newH2CClient(t)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := connect.NewClient[structpb.Struct, structpb.Struct](tc.hc,
				base+"/interop.v1.Greeter/Hello", connect.WithProtoJSON())
			rsp, err := client.CallUnary(context.Background(),
				connect.NewRequest(newStruct(t, map[string]any{"name": "Ada"})))
			if err != nil {
				t.Fatalf("CallUnary: %v", err)
			}
			if got := rsp.Msg.GetFields()["message"].GetStringValue(); got != "hello, Ada" {
				t.Errorf("message = %q, want %q (response %v)", got, "hello, Ada", rsp.Msg)
			}
			if ct := rsp.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
		})
	}
}

func TestConnectClientMetadata(t *testing.T) {
	base, _ := newGreeterServer(t)
	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		base+"/interop.v1.Greeter/Hello", connect.WithProtoJSON())
	req := connect.NewRequest(newStruct(t, map[string]any{"name": "Ada"}))
	req.Header().Set("X-Trace-Id", "trace-42")
	rsp, err := client.CallUnary(context.Background(), req)
	if err != nil {
		t.Fatalf("CallUnary: %v", err)
	}
	if got := rsp.Header().Get("X-Trace-Id"); got != "trace-42" {
		t.Errorf("response X-Trace-Id = %q, want trace-42", got)
	}
}

func TestConnectClientErrors(t *testing.T) {
	base, _ := newGreeterServer(t)
	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		base+"/interop.v1.Greeter/Fail", connect.WithProtoJSON())
	type errorCase struct {
		name     string
		code     string // sent to Fail; "" for a plain Go error
		message  string
		wantCode connect.Code
	}
	var cases []errorCase
	for c := micro.CodeCanceled; c <= micro.CodeUnauthenticated; c++ {
		cases = append(cases, errorCase{
			name:     c.String(),
			code:     c.String(),
			message:  c.String() + `: "quoted" <&> ✓`,
			wantCode: connect.Code(c),
		})
	}
	cases = append(cases, errorCase{name: "plain", message: "disk on fire", wantCode: connect.CodeUnknown})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := client.CallUnary(context.Background(), connect.NewRequest(newStruct(t, map[string]any{
				"code": tc.code, "message": tc.message,
			})))
			if err == nil {
				t.Fatal("CallUnary succeeded, want an error")
			}
			ce := asConnectError(t, err)
			if ce.Code() != tc.wantCode {
				t.Errorf("code = %v, want %v (error %v)", ce.Code(), tc.wantCode, err)
			}
			if ce.Code().String() != tc.wantCode.String() {
				t.Errorf("code name = %q, want %q", ce.Code().String(), tc.wantCode.String())
			}
			if ce.Message() != tc.message {
				t.Errorf("message = %q, want %q", ce.Message(), tc.message)
			}
		})
	}
}

func TestConnectClientErrorDetail(t *testing.T) {
	base, _ := newGreeterServer(t)
	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		base+"/interop.v1.Greeter/Fail", connect.WithProtoJSON())
	_, err := client.CallUnary(context.Background(), connect.NewRequest(newStruct(t, map[string]any{
		"code": "not_found", "message": "no user ada", "detail": "users/ada", "reason": "gone",
	})))
	ce := asConnectError(t, err)
	if ce.Code() != connect.CodeNotFound || ce.Message() != "no user ada" {
		t.Errorf("error = %v, want not_found: no user ada", err)
	}
	if got := ce.Meta().Get("X-Reason"); got != "gone" {
		t.Errorf("error metadata X-Reason = %q, want gone", got)
	}
	details := ce.Details()
	if len(details) != 1 {
		t.Fatalf("got %d details, want 1", len(details))
	}
	if got := details[0].Type(); got != "google.protobuf.StringValue" {
		t.Errorf("detail type = %q, want google.protobuf.StringValue", got)
	}
	v, err := details[0].Value()
	if err != nil {
		t.Fatalf("detail Value: %v", err)
	}
	sv, ok := v.(*wrapperspb.StringValue)
	if !ok {
		t.Fatalf("detail value is %T, want *wrapperspb.StringValue", v)
	}
	if sv.GetValue() != "users/ada" {
		t.Errorf("detail value = %q, want users/ada", sv.GetValue())
	}
}

func TestConnectClientUnknownProcedure(t *testing.T) {
	base, _ := newGreeterServer(t)
	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		base+"/interop.v1.Greeter/Missing", connect.WithProtoJSON())
	_, err := client.CallUnary(context.Background(), connect.NewRequest(&structpb.Struct{}))
	if got := connect.CodeOf(err); got != connect.CodeUnimplemented {
		t.Errorf("code = %v, want unimplemented (error %v)", got, err)
	}
}

func TestConnectClientDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	base, g := newGreeterServer(t)
	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		base+"/interop.v1.Greeter/Wait", connect.WithProtoJSON())
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := client.CallUnary(ctx, connect.NewRequest(newStruct(t, map[string]any{"name": "Ada"})))
	if got := connect.CodeOf(err); got != connect.CodeDeadlineExceeded {
		t.Errorf("code = %v, want deadline_exceeded (error %v)", got, err)
	}
	seen := awaitWait(t, g.waits)
	if !seen.ok {
		t.Fatal("the handler's context had no deadline; Connect-Timeout-Ms was not applied")
	}
	if seen.left <= 0 || seen.left > timeout {
		t.Errorf("the handler had %v left, want within (0, %v]", seen.left, timeout)
	}
}

// TestConnectClientGzip sends gzip-compressed requests. The server is mounted
// as a plain http.Handler behind a recorder, which proves the bodies really
// arrived compressed.
func TestConnectClientGzip(t *testing.T) {
	srv := micro.NewServer()
	if err := micro.RegisterHandler(srv, &Greeter{}, micro.HandlerName("interop.v1.Greeter")); err != nil {
		t.Fatal(err)
	}
	var gzipped atomic.Int32
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Content-Encoding") == "gzip" {
			gzipped.Add(1)
		}
		srv.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)

	client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t),
		ts.URL+"/interop.v1.Greeter/Hello", connect.WithProtoJSON(), connect.WithSendGzip())
	name := strings.Repeat("Ada ", 1000) // large enough that any compression threshold is passed
	rsp, err := client.CallUnary(context.Background(), connect.NewRequest(newStruct(t, map[string]any{"name": name})))
	if err != nil {
		t.Fatalf("CallUnary: %v", err)
	}
	if got := rsp.Msg.GetFields()["message"].GetStringValue(); got != "hello, "+name {
		t.Errorf("message has %d bytes, want %d", len(got), len("hello, "+name))
	}
	if gzipped.Load() != 1 {
		t.Errorf("%d requests arrived gzipped, want 1", gzipped.Load())
	}
}

// TestConnectClientGet: a connect-go client with WithHTTPGet calls a method
// marked NoSideEffects with GET (the request in the query): JSON, URL-encoded
// as it is, and gzip-compressed, in base64; the recorder in front proves the
// calls were GETs.
func TestConnectClientGet(t *testing.T) {
	srv := micro.NewServer()
	if err := micro.RegisterHandler(srv, &Greeter{}, micro.HandlerName("interop.v1.Greeter"), micro.NoSideEffects("Hello")); err != nil {
		t.Fatal(err)
	}
	var gets, gzipped atomic.Int32
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			gets.Add(1)
			if q := r.URL.Query(); q.Get("compression") == "gzip" && q.Get("base64") == "1" {
				gzipped.Add(1)
			}
		}
		srv.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"json", []connect.ClientOption{connect.WithProtoJSON()}},
		// connect-go compresses a GET only when its URL would pass the
		// size given; then the message goes in base64.
		{"json gzip", []connect.ClientOption{connect.WithProtoJSON(), connect.WithSendGzip(), connect.WithHTTPGetMaxURLSize(1024, false)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, beforeGz := gets.Load(), gzipped.Load()
			opts := append([]connect.ClientOption{connect.WithHTTPGet(), connect.WithIdempotency(connect.IdempotencyNoSideEffects)}, tc.opts...)
			client := connect.NewClient[structpb.Struct, structpb.Struct](newHTTPClient(t), ts.URL+"/interop.v1.Greeter/Hello", opts...)
			name := "Ada"
			if strings.Contains(tc.name, "gzip") {
				name = strings.Repeat("Ada ", 1000) // over any compression threshold
			}
			rsp, err := client.CallUnary(context.Background(), connect.NewRequest(newStruct(t, map[string]any{"name": name})))
			if err != nil {
				t.Fatalf("CallUnary: %v", err)
			}
			if got := rsp.Msg.GetFields()["message"].GetStringValue(); got != "hello, "+name {
				t.Errorf("message has %d bytes, want %d", len(got), len("hello, "+name))
			}
			if n := gets.Load() - before; n != 1 {
				t.Errorf("%d GET calls, want 1", n)
			}
			if n, want := gzipped.Load()-beforeGz, int32(strings.Count(tc.name, "gzip")); n != want {
				t.Errorf("%d GET calls with a gzip-compressed, base64 message; want %d", n, want)
			}
		})
	}
}
