package interop_test

// Tests of binary protobuf ("application/proto") both ways, with protoCodec.

import (
	"context"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/micro-kit/micro"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Strings is a micro handler whose messages are protobuf types, registered
// as "interop.v1.Strings".
type Strings struct{}

// Upper upper-cases a string; an empty one is an invalid argument.
func (Strings) Upper(ctx context.Context, req *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
	if req.GetValue() == "" {
		return nil, micro.NewError(micro.CodeInvalidArgument, "value is empty")
	}
	return wrapperspb.String(strings.ToUpper(req.GetValue())), nil
}

// newStringsServer serves Strings, with protoCodec, until the test ends and
// returns the base URL.
func newStringsServer(t *testing.T) string {
	t.Helper()
	srv := micro.NewServer(micro.WithCodec(protoCodec{}))
	if err := micro.RegisterHandler(srv, Strings{}, micro.HandlerName("interop.v1.Strings")); err != nil {
		t.Fatal(err)
	}
	return serve(t, srv)
}

func TestConnectClientProto(t *testing.T) {
	base := newStringsServer(t)
	// No codec option: connect-go sends binary protobuf by default.
	client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](newHTTPClient(t),
		base+"/interop.v1.Strings/Upper")
	rsp, err := client.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("ada")))
	if err != nil {
		t.Fatalf("CallUnary: %v", err)
	}
	if rsp.Msg.GetValue() != "ADA" {
		t.Errorf("value = %q, want ADA", rsp.Msg.GetValue())
	}
	if ct := rsp.Header().Get("Content-Type"); ct != "application/proto" {
		t.Errorf("Content-Type = %q, want application/proto", ct)
	}

	_, err = client.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("")))
	ce := asConnectError(t, err)
	if ce.Code() != connect.CodeInvalidArgument || ce.Message() != "value is empty" {
		t.Errorf("error = %v, want invalid_argument: value is empty", err)
	}
}

func TestClientConnectProto(t *testing.T) {
	addr, _ := newConnectServer(t)
	cli := newMicroClient(t, micro.WithCodec(protoCodec{}))
	out := &wrapperspb.StringValue{}
	err := cli.Call(context.Background(), "echo", "interop.v1.Echo.Upper", wrapperspb.String("ada"), out,
		micro.WithAddress(addr), micro.ContentType("application/proto"))
	if err != nil {
		t.Fatalf("Call: %v", err)
	}
	if out.GetValue() != "ADA" {
		t.Errorf("value = %q, want ADA", out.GetValue())
	}
}
