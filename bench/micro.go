package bench

import (
	"context"
	"errors"
	"io"
	"net"

	"github.com/micro-kit/micro"
)

// microImpl is this module's parent: micro's Server and Client, the Connect
// unary protocol over HTTP/1.1, with the bytes codec or, with json set, the
// default JSON codec and a struct message.
type microImpl struct {
	json bool
}

func init() {
	benchImpls.register("micro", 50, "micro Server/Client, Connect unary over HTTP/1.1, bytes codec", microImpl{})
	benchImpls.register("micro-json", 51, "micro Server/Client, Connect unary over HTTP/1.1, JSON codec, struct{Data []byte}", microImpl{json: true})
}

// EchoMessage is micro-json's request and response. It is exported because
// micro.RegisterHandler takes exported (or built-in) request types only.
type EchoMessage struct {
	Data []byte `json:"data"`
}

// microEcho serves bench.Echo.Echo with the bytes codec.
type microEcho struct{}

func (*microEcho) Echo(_ context.Context, req *[]byte) (*[]byte, error) {
	return req, nil
}

// microJSONEcho serves bench.Echo.Echo with the JSON codec.
type microJSONEcho struct{}

func (*microJSONEcho) Echo(_ context.Context, req *EchoMessage) (*EchoMessage, error) {
	return req, nil
}

func (m microImpl) serve(l net.Listener) (io.Closer, error) {
	var h any = new(microEcho)
	if m.json {
		h = new(microJSONEcho)
	}
	return microServe(l, h, "bench.Echo")
}

// microServe serves handler, registered under name, on l with a default
// micro.Server, as micro and its streaming twin do.
func microServe(l net.Listener, handler any, name string) (io.Closer, error) {
	srv := micro.NewServer()
	if err := micro.RegisterHandler(srv, handler, micro.HandlerName(name)); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	return benchCloserFunc(func() error {
		err := srv.Close()
		if serr := <-done; serr != nil && !errors.Is(serr, micro.ErrClosed) {
			err = errors.Join(err, serr)
		}
		return err
	}), nil
}

func (m microImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	cli := micro.NewClient()
	if m.json {
		// The options are made once, as a caller that keeps them would; the
		// call still applies them, and WithAddress still builds its nodes,
		// on every call.
		opts := []micro.CallOption{micro.WithAddress(addr), micro.ContentType(micro.ContentTypeJSON)}
		call := func(ctx context.Context, payload []byte) ([]byte, error) {
			var out EchoMessage
			if err := cli.Call(ctx, "bench", "bench.Echo.Echo", &EchoMessage{Data: payload}, &out, opts...); err != nil {
				return nil, err
			}
			return out.Data, nil
		}
		return call, cli, nil
	}
	opts := []micro.CallOption{micro.WithAddress(addr), micro.ContentType(micro.ContentTypeBytes)}
	call := func(ctx context.Context, payload []byte) ([]byte, error) {
		var out []byte
		if err := cli.Call(ctx, "bench", "bench.Echo.Echo", payload, &out, opts...); err != nil {
			return nil, err
		}
		return out, nil
	}
	return call, cli, nil
}
