package bench

import (
	"context"
	"io"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// grpcImpl is grpc-go over cleartext HTTP/2 on loopback, with a hand-written
// service descriptor (no protoc here) and BytesValue messages. The client is
// one ClientConn, as grpc-go intends: calls multiplex on one connection.
type grpcImpl struct{}

func init() {
	benchImpls.register("grpc", 20, "grpc-go, insecure HTTP/2, wrapperspb.BytesValue, one ClientConn", grpcImpl{})
}

// grpcEchoServer is what grpcServiceDesc's HandlerType names.
type grpcEchoServer interface {
	Echo(context.Context, *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error)
}

type grpcEcho struct{}

func (grpcEcho) Echo(_ context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	return in, nil
}

// grpcServiceDesc is what protoc-gen-go-grpc would generate for
// service Echo { rpc Echo(BytesValue) returns (BytesValue); } in package bench.
var grpcServiceDesc = grpc.ServiceDesc{
	ServiceName: "bench.Echo",
	HandlerType: (*grpcEchoServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler:    grpcEchoHandler,
	}},
	Metadata: "bench.proto",
}

func grpcEchoHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := new(wrapperspb.BytesValue)
	if err := dec(in); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(grpcEchoServer).Echo(ctx, in)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: "/bench.Echo/Echo"}
	handler := func(ctx context.Context, req any) (any, error) {
		return srv.(grpcEchoServer).Echo(ctx, req.(*wrapperspb.BytesValue))
	}
	return interceptor(ctx, in, info, handler)
}

func (grpcImpl) serve(l net.Listener) (io.Closer, error) {
	return grpcServe(l, &grpcServiceDesc, grpcEcho{}), nil
}

// grpcServe serves the service desc describes, implemented by impl, on l
// with a default grpc.Server, as grpc and its streaming twin do.
func grpcServe(l net.Listener, desc *grpc.ServiceDesc, impl any) io.Closer {
	srv := grpc.NewServer()
	srv.RegisterService(desc, impl)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l) // returns when Stop is called
	}()
	return benchCloserFunc(func() error {
		srv.Stop()
		<-done
		return nil
	})
}

// grpcDial returns a ClientConn to addr, insecure, that does not resolve
// the address.
func grpcDial(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

func (grpcImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	conn, err := grpcDial(addr)
	if err != nil {
		return nil, nil, err
	}
	call := func(ctx context.Context, payload []byte) ([]byte, error) {
		out := new(wrapperspb.BytesValue)
		if err := conn.Invoke(ctx, "/bench.Echo/Echo", wrapperspb.Bytes(payload), out); err != nil {
			return nil, err
		}
		return out.Value, nil
	}
	return call, conn, nil
}
