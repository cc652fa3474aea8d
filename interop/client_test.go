package interop_test

// Tests of a micro client calling connect-go handlers.

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/micro-kit/micro"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// connectEcho holds the connect-go handlers a micro client calls, at
// /interop.v1.Echo/*. Every one requires the Connect-Protocol-Version header,
// so the tests also prove that micro sends it.
type connectEcho struct {
	waits chan waitSeen // Wait reports what it saw here; buffered
}

// hello greets by name and echoes the X-Trace-Id request header.
func (e *connectEcho) hello(_ context.Context, req *connect.Request[structpb.Struct]) (*connect.Response[structpb.Struct], error) {
	name := req.Msg.GetFields()["name"].GetStringValue()
	msg, err := structpb.NewStruct(map[string]any{"message": "hello, " + name})
	if err != nil {
		return nil, err
	}
	rsp := connect.NewResponse(msg)
	if id := req.Header().Get("X-Trace-Id"); id != "" {
		rsp.Header().Set("X-Trace-Id", id)
	}
	return rsp, nil
}

// fail returns a connect error with the code and message asked for, and a
// StringValue detail and an X-Reason header when asked.
func (e *connectEcho) fail(_ context.Context, req *connect.Request[structpb.Struct]) (*connect.Response[structpb.Struct], error) {
	f := req.Msg.GetFields()
	var code connect.Code
	if err := code.UnmarshalText([]byte(f["code"].GetStringValue())); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	ce := connect.NewError(code, errors.New(f["message"].GetStringValue()))
	if d := f["detail"].GetStringValue(); d != "" {
		detail, err := connect.NewErrorDetail(wrapperspb.String(d))
		if err != nil {
			return nil, err
		}
		ce.AddDetail(detail)
	}
	if r := f["reason"].GetStringValue(); r != "" {
		ce.Meta().Set("X-Reason", r)
	}
	return nil, ce
}

// wait reports its deadline and blocks until its context ends.
func (e *connectEcho) wait(ctx context.Context, _ *connect.Request[structpb.Struct]) (*connect.Response[structpb.Struct], error) {
	dl, ok := ctx.Deadline()
	e.waits <- waitSeen{ok: ok, left: time.Until(dl)}
	<-ctx.Done()
	return nil, ctx.Err()
}

// upper upper-cases a StringValue; it is called with binary protobuf.
func (e *connectEcho) upper(_ context.Context, req *connect.Request[wrapperspb.StringValue]) (*connect.Response[wrapperspb.StringValue], error) {
	return connect.NewResponse(wrapperspb.String(strings.ToUpper(req.Msg.GetValue()))), nil
}

// newConnectServer serves the connect-go handlers on a loopback httptest
// server until the test ends and returns its host:port and the handlers.
func newConnectServer(t *testing.T) (string, *connectEcho) {
	t.Helper()
	e := &connectEcho{waits: make(chan waitSeen, 1)}
	opt := connect.WithRequireConnectProtocolHeader()
	mux := http.NewServeMux()
	mux.Handle("/interop.v1.Echo/Hello", connect.NewUnaryHandler("/interop.v1.Echo/Hello", e.hello, opt))
	mux.Handle("/interop.v1.Echo/Fail", connect.NewUnaryHandler("/interop.v1.Echo/Fail", e.fail, opt))
	mux.Handle("/interop.v1.Echo/Wait", connect.NewUnaryHandler("/interop.v1.Echo/Wait", e.wait, opt))
	mux.Handle("/interop.v1.Echo/Upper", connect.NewUnaryHandler("/interop.v1.Echo/Upper", e.upper, opt))
	ts := httptest.NewServer(mux)
	t.Cleanup(ts.Close)
	return ts.Listener.Addr().String(), e
}

func TestClientCallsConnectHandler(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t)
	ctx := micro.NewContext(context.Background(), micro.MD{"X-Trace-Id": "trace-7"})
	var rsp HelloResponse
	var hdr micro.MD
	err := cli.Call(ctx, "echo", "interop.v1.Echo.Hello", &HelloRequest{Name: "Ada"}, &rsp,
		micro.WithAddress(addr), micro.ResponseHeader(&hdr))
	if err != nil {
		t.Fatalf("Call: %v", err)
	}
	if rsp.Message != "hello, Ada" {
		t.Errorf("message = %q, want %q", rsp.Message, "hello, Ada")
	}
	if got := hdr.Get("X-Trace-Id"); got != "trace-7" {
		t.Errorf("response X-Trace-Id = %q, want trace-7", got)
	}
}

// FailArgs asks the connect-go fail handler for an error.
type FailArgs struct {
	Code    connect.Code `json:"code"` // sent by name ("not_found"): Code is a TextMarshaler
	Message string       `json:"message"`
	Detail  string       `json:"detail,omitempty"`
	Reason  string       `json:"reason,omitempty"`
}

func TestClientConnectErrors(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t, micro.WithAddress(addr), micro.Retries(0))
	for c := connect.CodeCanceled; c <= connect.CodeUnauthenticated; c++ {
		t.Run(c.String(), func(t *testing.T) {
			msg := c.String() + `: "quoted" <&> ✓`
			err := cli.Call(context.Background(), "echo", "interop.v1.Echo.Fail",
				&FailArgs{Code: c, Message: msg}, &HelloResponse{})
			if got := micro.CodeOf(err); got != micro.Code(c) {
				t.Errorf("code = %v, want %v (error %v)", got, c, err)
			}
			if me := asMicroError(t, err); me.Message != msg {
				t.Errorf("message = %q, want %q", me.Message, msg)
			}
		})
	}
}

func TestClientConnectPermissionDenied(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t)
	err := cli.Call(context.Background(), "echo", "interop.v1.Echo.Fail",
		&FailArgs{Code: connect.CodePermissionDenied, Message: "ada may not read this"}, &HelloResponse{},
		micro.WithAddress(addr))
	if micro.CodeOf(err) != micro.CodePermissionDenied {
		t.Errorf("code = %v, want permission_denied (error %v)", micro.CodeOf(err), err)
	}
	if me := asMicroError(t, err); me.Message != "ada may not read this" {
		t.Errorf("message = %q, want %q", me.Message, "ada may not read this")
	}
}

func TestClientConnectErrorDetail(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t)
	err := cli.Call(context.Background(), "echo", "interop.v1.Echo.Fail",
		&FailArgs{Code: connect.CodeNotFound, Message: "no user ada", Detail: "users/ada", Reason: "gone"},
		&HelloResponse{}, micro.WithAddress(addr))
	me := asMicroError(t, err)
	if me.Code != micro.CodeNotFound || me.Message != "no user ada" {
		t.Errorf("error = %v, want not_found: no user ada", err)
	}
	if got := me.Meta.Get("X-Reason"); got != "gone" {
		t.Errorf("error metadata X-Reason = %q, want gone", got)
	}
	if len(me.Details) != 1 {
		t.Fatalf("got %d details, want 1", len(me.Details))
	}
	if got := me.Details[0].Type; got != "google.protobuf.StringValue" {
		t.Errorf("detail type = %q, want google.protobuf.StringValue", got)
	}
	var sv wrapperspb.StringValue
	if err := proto.Unmarshal(me.Details[0].Value, &sv); err != nil {
		t.Fatalf("decoding the detail: %v", err)
	}
	if sv.GetValue() != "users/ada" {
		t.Errorf("detail value = %q, want users/ada", sv.GetValue())
	}
}

func TestClientConnectDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	addr, e := newConnectServer(t)
	cli := newMicroClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := cli.Call(ctx, "echo", "interop.v1.Echo.Wait", &HelloRequest{Name: "Ada"}, &HelloResponse{},
		micro.WithAddress(addr))
	if got := micro.CodeOf(err); got != micro.CodeDeadlineExceeded {
		t.Errorf("code = %v, want deadline_exceeded (error %v)", got, err)
	}
	seen := awaitWait(t, e.waits)
	if !seen.ok {
		t.Fatal("the connect-go handler's context had no deadline; micro sent no Connect-Timeout-Ms")
	}
	if seen.left <= 0 || seen.left > timeout {
		t.Errorf("the handler had %v left, want within (0, %v]", seen.left, timeout)
	}
}

func TestClientConnectUnknownProcedure(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t)
	// The mux answers 404 with a plain-text body; the Connect protocol maps
	// that status to unimplemented.
	err := cli.Call(context.Background(), "echo", "interop.v1.Echo.Missing", &HelloRequest{}, &HelloResponse{},
		micro.WithAddress(addr))
	if got := micro.CodeOf(err); got != micro.CodeUnimplemented {
		t.Errorf("code = %v, want unimplemented (error %v)", got, err)
	}
}
