package bench

import (
	"context"
	"io"
	"net"
	"net/rpc"
)

// netrpcImpl is the standard library's net/rpc with its default gob codec:
// one TCP connection per client, calls multiplexed on it by sequence number.
type netrpcImpl struct{}

func init() {
	benchImpls.register("netrpc", 10, "net/rpc with gob over one multiplexed TCP connection", netrpcImpl{})
}

// NetRPCEcho is the net/rpc service; net/rpc serves exported types only.
type NetRPCEcho struct{}

// Echo copies the request into the reply.
func (NetRPCEcho) Echo(req []byte, rsp *[]byte) error {
	*rsp = req
	return nil
}

func (netrpcImpl) serve(l net.Listener) (io.Closer, error) {
	srv := rpc.NewServer()
	if err := srv.RegisterName("Echo", NetRPCEcho{}); err != nil {
		return nil, err
	}
	return benchServeConns(l, func(c net.Conn) { srv.ServeConn(c) }), nil
}

func (netrpcImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	cli, err := rpc.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	call := func(_ context.Context, payload []byte) ([]byte, error) {
		var out []byte
		err := cli.Call("Echo.Echo", payload, &out)
		return out, err
	}
	return call, cli, nil
}
