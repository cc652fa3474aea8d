package bench

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// streamConnectImpl is connect-go's bidirectional streaming over HTTP/2
// cleartext (h2c, prior knowledge) on both sides, with the binary proto
// codec and gzip turned off. The client's streams share one connection.
type streamConnectImpl struct{}

func init() {
	streamImpls.register("connect", 30, "connect-go bidi stream, h2c, proto codec, gzip off", streamConnectImpl{})
}

const streamConnectProcedure = "/bench.Stream/Echo"

type streamConnectEchoStream = connect.BidiStream[wrapperspb.BytesValue, wrapperspb.BytesValue]

func streamConnectEcho(_ context.Context, stream *streamConnectEchoStream) error {
	for {
		in, err := stream.Receive()
		if errors.Is(err, io.EOF) {
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

func (streamConnectImpl) serve(l net.Listener) (io.Closer, error) {
	mux := http.NewServeMux()
	mux.Handle(streamConnectProcedure, connect.NewBidiStreamHandler(streamConnectProcedure, streamConnectEcho, connectNoGzip))
	return benchServeHTTP(l, mux, benchH2C()), nil
}

func (streamConnectImpl) newOpener(addr string) (streamOpenFunc, io.Closer, error) {
	tr := &http.Transport{Protocols: benchH2C(), DisableCompression: true, IdleConnTimeout: 90 * time.Second}
	cli := connect.NewClient[wrapperspb.BytesValue, wrapperspb.BytesValue](&http.Client{Transport: tr},
		"http://"+addr+streamConnectProcedure, connectNoGzipClient)
	open := func(ctx context.Context) (streamEcho, error) {
		ctx, cancel := context.WithCancel(ctx)
		return &streamConnectClient{st: cli.CallBidiStream(ctx), cancel: cancel}, nil
	}
	return open, benchCloserFunc(func() error {
		tr.CloseIdleConnections()
		return nil
	}), nil
}

// streamConnectClient is the client's end of a connect-go stream. The
// request goes out with the first message.
type streamConnectClient struct {
	st     *connect.BidiStreamForClient[wrapperspb.BytesValue, wrapperspb.BytesValue]
	cancel context.CancelFunc
}

func (c *streamConnectClient) send(payload []byte) error {
	return c.st.Send(wrapperspb.Bytes(payload))
}

func (c *streamConnectClient) recv() ([]byte, error) {
	out, err := c.st.Receive()
	if errors.Is(err, io.EOF) {
		return nil, io.EOF // a clean end comes wrapped
	}
	if err != nil {
		return nil, err
	}
	return out.Value, nil
}

func (c *streamConnectClient) closeSend() error { return c.st.CloseRequest() }

func (c *streamConnectClient) close() {
	c.st.CloseResponse()
	c.cancel()
}
