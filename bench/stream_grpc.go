package bench

import (
	"context"
	"io"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// streamGRPCImpl is grpc-go's bidirectional streaming over cleartext HTTP/2
// on loopback, with a hand-written service descriptor (no protoc here) and
// BytesValue messages. The client is one ClientConn: its streams share one
// connection.
type streamGRPCImpl struct{}

func init() {
	streamImpls.register("grpc", 20, "grpc-go bidi stream, insecure HTTP/2, wrapperspb.BytesValue, one ClientConn", streamGRPCImpl{})
}

// streamGRPCEchoStream is what protoc-gen-go-grpc generates for a bidi
// stream of BytesValue both ways.
type streamGRPCEchoStream = grpc.BidiStreamingServer[wrapperspb.BytesValue, wrapperspb.BytesValue]

// streamGRPCServer is what streamGRPCServiceDesc's HandlerType names.
type streamGRPCServer interface {
	Echo(streamGRPCEchoStream) error
}

type streamGRPCEcho struct{}

func (streamGRPCEcho) Echo(stream streamGRPCEchoStream) error {
	for {
		in, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(in); err != nil {
			return err
		}
	}
}

// streamGRPCServiceDesc is what protoc-gen-go-grpc would generate for
// service Stream { rpc Echo(stream BytesValue) returns (stream BytesValue); }
// in package bench.
var streamGRPCServiceDesc = grpc.ServiceDesc{
	ServiceName: "bench.Stream",
	HandlerType: (*streamGRPCServer)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Echo",
		Handler:       streamGRPCEchoHandler,
		ServerStreams: true,
		ClientStreams: true,
	}},
	Metadata: "bench.proto",
}

func streamGRPCEchoHandler(srv any, stream grpc.ServerStream) error {
	return srv.(streamGRPCServer).Echo(&grpc.GenericServerStream[wrapperspb.BytesValue, wrapperspb.BytesValue]{ServerStream: stream})
}

func (streamGRPCImpl) serve(l net.Listener) (io.Closer, error) {
	return grpcServe(l, &streamGRPCServiceDesc, streamGRPCEcho{}), nil
}

func (streamGRPCImpl) newOpener(addr string) (streamOpenFunc, io.Closer, error) {
	conn, err := grpcDial(addr)
	if err != nil {
		return nil, nil, err
	}
	open := func(ctx context.Context) (streamEcho, error) {
		ctx, cancel := context.WithCancel(ctx)
		st, err := conn.NewStream(ctx, &streamGRPCServiceDesc.Streams[0], "/bench.Stream/Echo")
		if err != nil {
			cancel()
			return nil, err
		}
		return &streamGRPCClient{
			st:     &grpc.GenericClientStream[wrapperspb.BytesValue, wrapperspb.BytesValue]{ClientStream: st},
			cancel: cancel,
		}, nil
	}
	return open, conn, nil
}

// streamGRPCClient is the client's end of a grpc-go stream, used as the
// generated client would be.
type streamGRPCClient struct {
	st     grpc.BidiStreamingClient[wrapperspb.BytesValue, wrapperspb.BytesValue]
	cancel context.CancelFunc
}

func (c *streamGRPCClient) send(payload []byte) error {
	return c.st.Send(wrapperspb.Bytes(payload))
}

func (c *streamGRPCClient) recv() ([]byte, error) {
	out, err := c.st.Recv()
	if err != nil {
		return nil, err
	}
	return out.Value, nil
}

func (c *streamGRPCClient) closeSend() error { return c.st.CloseSend() }

func (c *streamGRPCClient) close() { c.cancel() }
