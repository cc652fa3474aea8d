package bench

import (
	"context"
	"io"
	"net"

	"github.com/micro-kit/micro"
)

// streamMicroImpl is micro's streaming RPC: the Connect streaming protocol
// over HTTP/2 cleartext (h2c), with the bytes codec. The client is one
// micro.Client, whose streams share one HTTP/2 connection.
type streamMicroImpl struct{}

func init() {
	streamImpls.register("micro", 50, "micro Server/Client.Stream, Connect streaming over h2c, bytes codec", streamMicroImpl{})
}

// streamMicroEcho serves bench.Stream.Echo: it sends back every message
// until the caller closes its side. A fresh message per Recv, as a handler
// that hands its messages on must do.
type streamMicroEcho struct{}

func (*streamMicroEcho) Echo(_ context.Context, stream *micro.Stream) error {
	for {
		var msg []byte
		if err := stream.Recv(&msg); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if err := stream.Send(&msg); err != nil {
			return err
		}
	}
}

func (streamMicroImpl) serve(l net.Listener) (io.Closer, error) {
	return microServe(l, new(streamMicroEcho), "bench.Stream")
}

func (streamMicroImpl) newOpener(addr string) (streamOpenFunc, io.Closer, error) {
	cli := micro.NewClient()
	// Made once, as a caller that keeps them would. RequestTimeout(0): a
	// stream without a deadline in its context would otherwise end after
	// micro's default call timeout (10s), which a long -duration passes.
	opts := []micro.CallOption{micro.WithAddress(addr), micro.ContentType(micro.ContentTypeBytes), micro.RequestTimeout(0)}
	open := func(ctx context.Context) (streamEcho, error) {
		st, err := cli.Stream(ctx, "bench", "bench.Stream.Echo", opts...)
		if err != nil {
			return nil, err
		}
		return streamMicroClient{st}, nil
	}
	return open, cli, nil
}

// streamMicroClient is the client's end of a micro stream.
type streamMicroClient struct {
	st *micro.Stream
}

func (c streamMicroClient) send(payload []byte) error { return c.st.Send(payload) }

func (c streamMicroClient) recv() ([]byte, error) {
	var out []byte
	if err := c.st.Recv(&out); err != nil {
		return nil, err
	}
	return out, nil
}

func (c streamMicroClient) closeSend() error { return c.st.CloseSend() }

func (c streamMicroClient) close() { c.st.Close() }
