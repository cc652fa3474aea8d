package bench

import (
	"context"
	"io"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// connectImpl is connect-go over HTTP/1.1 with gzip turned off on both
// sides, with the binary proto codec or, with json set, protojson.
type connectImpl struct {
	json bool
}

func init() {
	benchImpls.register("connect", 30, "connect-go, HTTP/1.1, proto codec, gzip off", connectImpl{})
	benchImpls.register("connect-json", 31, "connect-go, HTTP/1.1, protojson codec, gzip off", connectImpl{json: true})
}

const connectProcedure = "/bench.Echo/Echo"

// connectNoGzip removes connect-go's default gzip from handlers, and
// connectNoGzipClient from clients (which then stop sending Accept-Encoding).
var (
	connectNoGzip       = connect.WithCompression("gzip", nil, nil)
	connectNoGzipClient = connect.WithAcceptCompression("gzip", nil, nil)
)

func (connectImpl) serve(l net.Listener) (io.Closer, error) {
	mux := http.NewServeMux()
	mux.Handle(connectProcedure, connect.NewUnaryHandler(connectProcedure,
		func(_ context.Context, req *connect.Request[wrapperspb.BytesValue]) (*connect.Response[wrapperspb.BytesValue], error) {
			return connect.NewResponse(req.Msg), nil
		}, connectNoGzip))
	return benchServeHTTP(l, mux, benchHTTP1()), nil
}

func (c connectImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	hc := benchHTTPClient()
	opts := []connect.ClientOption{connectNoGzipClient}
	if c.json {
		opts = append(opts, connect.WithProtoJSON())
	}
	cli := connect.NewClient[wrapperspb.BytesValue, wrapperspb.BytesValue](hc, "http://"+addr+connectProcedure, opts...)
	call := func(ctx context.Context, payload []byte) ([]byte, error) {
		rsp, err := cli.CallUnary(ctx, connect.NewRequest(wrapperspb.Bytes(payload)))
		if err != nil {
			return nil, err
		}
		return rsp.Msg.Value, nil
	}
	return call, benchCloserFunc(func() error {
		hc.CloseIdleConnections()
		return nil
	}), nil
}

// benchServeHTTP serves h on l with net/http, speaking protocols only.
func benchServeHTTP(l net.Listener, h http.Handler, protocols *http.Protocols) io.Closer {
	hs := &http.Server{Handler: h, Protocols: protocols, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		hs.Serve(l) // returns http.ErrServerClosed once Close is called
	}()
	return benchCloserFunc(func() error {
		err := hs.Close()
		<-done
		return err
	})
}

// benchHTTPClient returns an HTTP/1.1 client whose pool keeps a connection
// for each of up to 256 concurrent callers (the default keeps 2, which would
// measure dialing, not calling).
func benchHTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:               nil,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		Protocols:           benchHTTP1(),
	}}
}

// benchHTTP1 is HTTP/1.1 only, as connect and nethttp speak.
func benchHTTP1() *http.Protocols {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	return p
}

// benchH2C is HTTP/2 over cleartext only (prior knowledge), as the
// streaming connect speaks.
func benchH2C() *http.Protocols {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return p
}
