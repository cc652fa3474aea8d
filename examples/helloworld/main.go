// Command helloworld is the smallest useful micro service: it serves a
// Greeter, finds itself through the registry, calls itself and prints the
// answer. Calling itself needs no network, so it uses a registry in memory.
// With -serve it keeps serving until interrupted, announced on the local link
// by mDNS (the default registry), for curl and for other services:
//
//	go run ./examples/helloworld -serve -address 127.0.0.1:8080
//	curl -H 'Content-Type: application/json' -d '{"name":"ada"}' http://127.0.0.1:8080/Greeter/Hello
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"time"

	"github.com/micro-kit/micro"
)

// HelloRequest is the request of Greeter.Hello.
type HelloRequest struct {
	Name string `json:"name"`
}

// HelloResponse is its reply.
type HelloResponse struct {
	Message string `json:"message"`
}

// Greeter says hello.
type Greeter struct{}

// Hello answers with a greeting; an empty name is the caller's mistake.
func (g *Greeter) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	if req.Name == "" {
		return micro.NewError(micro.CodeInvalidArgument, "name is required")
	}
	rsp.Message = "Hello " + req.Name
	return nil
}

func main() {
	serve := flag.Bool("serve", false, "keep serving until interrupted")
	name := flag.String("greet", "World", "the name to greet")
	svc := micro.NewService(
		micro.Name("helloworld"),
		micro.Version("1.0.0"),
		micro.Address("127.0.0.1:0"),
		micro.Flags(flag.CommandLine), // -name, -address, ... beside -serve
	)
	if err := svc.Init(); err != nil {
		log.Fatal(err)
	}
	if !*serve { // one process: find itself in memory, multicast nothing
		reg := micro.NewMemoryRegistry()
		defer reg.Close()
		if err := svc.Init(micro.WithRegistry(reg)); err != nil {
			log.Fatal(err)
		}
	}
	if err := micro.RegisterHandler(svc.Server(), new(Greeter)); err != nil {
		log.Fatal(err)
	}
	if *serve {
		svc.Init(micro.AfterStart(func() error {
			fmt.Printf("serving %s on %s; try:\n  curl -H 'Content-Type: application/json' -d '{\"name\":\"ada\"}' http://%s/Greeter/Hello\n",
				svc.Name(), svc.Addr(), svc.Addr())
			return nil
		}))
		if err := svc.Run(); err != nil {
			log.Fatal(err)
		}
		return
	}

	if err := svc.Start(); err != nil {
		log.Fatal(err)
	}
	defer svc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var rsp HelloResponse
	// Found by name through the registry, balanced, over HTTP on loopback.
	if err := svc.Client().Call(ctx, svc.Name(), "Greeter.Hello", &HelloRequest{Name: *name}, &rsp); err != nil {
		log.Fatal(err)
	}
	fmt.Println(rsp.Message)
}
