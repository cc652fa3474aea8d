package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// natsImpl is NATS request/reply: the server process runs nats-server
// (embedded, on the listener's port) and a nats.go micro service whose
// endpoint echoes; the client is one nats.go connection making requests,
// which share its reply subscription. The broker is in the path, as it is
// for any NATS service.
type natsImpl struct{}

func init() {
	benchImpls.register("nats", 60, "NATS request/reply: nats-server (embedded) + a nats.go micro service in the server process, one nats.go client connection", natsImpl{})
}

func (natsImpl) serve(l net.Listener) (io.Closer, error) {
	// nats-server listens itself: it takes over the listener's port.
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	ns, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true, MaxPayload: 8 << 20})
	if err != nil {
		return nil, err
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, errors.New("nats-server did not start")
	}
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		ns.Shutdown()
		return nil, err
	}
	svc, err := micro.AddService(nc, micro.Config{
		Name:    "bench",
		Version: "1.0.0",
		Endpoint: &micro.EndpointConfig{
			Subject: "bench.echo",
			Handler: micro.HandlerFunc(func(req micro.Request) { req.Respond(req.Data()) }),
		},
	})
	if err == nil {
		// The service's subscription is sent, not yet seen: a request made
		// before the server reads it gets "no responders". A round trip
		// (PING/PONG) means the server has it.
		err = nc.Flush()
	}
	if err != nil {
		nc.Close()
		ns.Shutdown()
		return nil, err
	}
	return benchCloserFunc(func() error {
		err := svc.Stop()
		nc.Close()
		ns.Shutdown()
		ns.WaitForShutdown()
		return err
	}), nil
}

func (natsImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	nc, err := nats.Connect("nats://"+addr, nats.MaxReconnects(0))
	if err != nil {
		return nil, nil, err
	}
	call := func(ctx context.Context, payload []byte) ([]byte, error) {
		msg, err := nc.RequestWithContext(ctx, "bench.echo", payload)
		if err != nil {
			return nil, fmt.Errorf("nats request: %w", err)
		}
		return msg.Data, nil
	}
	return call, benchCloserFunc(func() error { nc.Close(); return nil }), nil
}
