// Command mdns shows discovery across processes with no configuration: it
// starts a copy of itself as a greeter service, which announces itself on
// the local link by multicast DNS, then finds it by name, calls it, lists
// what is on the link, and stops it.
//
//	go run ./examples/mdns
//
// It multicasts on every up, multicast-capable interface (or those of
// -interfaces). To keep the packets on this machine, run it in a private
// network namespace:
//
//	go build -o /tmp/mdns ./examples/mdns && ../shared/bin/netns-run /tmp/mdns
//
// avahi-browse -r _micro._tcp (or dns-sd -B _micro._tcp) shows the greeter
// while it runs with -serve.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"strings"
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

// Greeter says hello, and from which process.
type Greeter struct{}

// Hello answers with a greeting.
func (g *Greeter) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	rsp.Message = fmt.Sprintf("Hello %s, from process %d", req.Name, os.Getpid())
	return nil
}

func main() {
	serve := flag.Bool("serve", false, "be the greeter: serve until stdin closes or a signal")
	ifaces := flag.String("interfaces", "", "comma-separated interfaces for mDNS (default: all multicast-capable)")
	flag.Parse()
	var opts []micro.MDNSOption
	if *ifaces != "" {
		opts = append(opts, micro.MDNSInterfaces(strings.Split(*ifaces, ",")...))
	}
	reg, err := micro.NewMDNSRegistry(opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	if *serve {
		runGreeter(reg)
		return
	}

	// Start the greeter in another process, and wait until it serves.
	self, err := os.Executable()
	if err != nil {
		log.Fatal(err)
	}
	child := exec.Command(self, append([]string{"-serve"}, os.Args[1:]...)...)
	stdin, _ := child.StdinPipe()
	stdout, _ := child.StdoutPipe()
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		log.Fatal(err)
	}
	defer child.Wait()
	defer stdin.Close() // tells the greeter to stop
	if !bufio.NewScanner(stdout).Scan() {
		log.Fatal("the greeter did not start")
	}

	svc := micro.NewService(micro.Name("caller"), micro.WithRegistry(reg))
	defer svc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	var rsp HelloResponse
	if err := svc.Client().Call(ctx, "greeter", "Greeter.Hello", &HelloRequest{Name: "mDNS"}, &rsp); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s (found and called in %v)\n", rsp.Message, time.Since(start).Round(time.Millisecond))
	infos, err := svc.Client().Describe(ctx, "greeter")
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range infos {
		for _, n := range s.Nodes {
			fmt.Printf("greeter %s: node %s at %s\n", s.Version, n.ID, n.Address)
		}
		for _, e := range s.Endpoints {
			fmt.Printf("  endpoint %s(%s) %s\n", e.Name, e.Request, e.Response)
		}
	}
}

// runGreeter serves until stdin closes or SIGINT/SIGTERM.
func runGreeter(reg *micro.MDNSRegistry) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		cancel()
	}()
	svc := micro.NewService(micro.Name("greeter"), micro.Version("1.0.0"),
		micro.WithRegistry(reg), micro.Context(ctx), micro.Args(),
		micro.AfterStart(func() error { fmt.Println("serving"); return nil }))
	if err := micro.RegisterHandler(svc.Server(), new(Greeter)); err != nil {
		log.Fatal(err)
	}
	if err := svc.Run(); err != nil {
		log.Fatal(err)
	}
}
