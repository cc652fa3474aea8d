package micro_test

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/micro-kit/micro"
)

type HelloRequest struct {
	Name string `json:"name" xml:"name"`
}

type HelloResponse struct {
	Message string `json:"message" xml:"message"`
}

type Greeter struct{}

func (g *Greeter) Hello(ctx context.Context, req *HelloRequest, rsp *HelloResponse) error {
	if req.Name == "" {
		return micro.NewError(micro.CodeInvalidArgument, "name is required")
	}
	rsp.Message = "Hello " + req.Name
	return nil
}

// Two services in one process share a registry: one serves, the other calls
// it by name.
func Example() {
	reg := micro.NewMemoryRegistry()
	defer reg.Close()

	greeter := micro.NewService(micro.Name("greeter"), micro.Address("127.0.0.1:0"), micro.WithRegistry(reg))
	if err := micro.RegisterHandler(greeter.Server(), new(Greeter)); err != nil {
		fmt.Println(err)
		return
	}
	if err := greeter.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer greeter.Stop()

	caller := micro.NewService(micro.Name("caller"), micro.WithRegistry(reg))
	defer caller.Close()
	var rsp HelloResponse
	err := caller.Client().Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "ada"}, &rsp)
	fmt.Println(rsp.Message, err)

	err = caller.Client().Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{}, &rsp)
	fmt.Println(micro.CodeOf(err), err)
	// Output:
	// Hello ada <nil>
	// invalid_argument invalid_argument: name is required
}

// xmlCodec is a whole codec: a content type and two functions. A codec for
// google.golang.org/protobuf messages is the same shape, with
// proto.Marshal(v.(proto.Message)) and proto.Unmarshal(data,
// v.(proto.Message)) under "application/proto".
type xmlCodec struct{}

func (xmlCodec) ContentType() string                { return "application/xml" }
func (xmlCodec) Marshal(v any) ([]byte, error)      { return xml.Marshal(v) }
func (xmlCodec) Unmarshal(data []byte, v any) error { return xml.Unmarshal(data, v) }

// A codec of your own, used by both sides: WithCodec adds it to a server
// and a client (or a whole service), and ContentType picks it per call.
func ExampleWithCodec() {
	srv := micro.NewServer(micro.WithCodec(xmlCodec{}))
	micro.RegisterHandler(srv, new(Greeter))
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(ln)
	defer srv.Close()

	client := micro.NewClient(micro.WithCodec(xmlCodec{}), micro.WithAddress(ln.Addr().String()))
	defer client.Close()
	var rsp HelloResponse
	err := client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "xml"}, &rsp,
		micro.ContentType("application/xml"))
	fmt.Println(rsp.Message, err)
	// Output: Hello xml <nil>
}

// Middleware wraps every handler of a server: here, a check that a token
// was sent.
func ExampleWrapHandler() {
	requireToken := func(next micro.HandlerFunc) micro.HandlerFunc {
		return func(ctx context.Context, req *micro.Request) (any, error) {
			if req.Header.Get("Authorization") == "" {
				return nil, micro.NewError(micro.CodeUnauthenticated, "no token")
			}
			return next(ctx, req)
		}
	}
	srv := micro.NewServer(micro.WrapHandler(requireToken))
	micro.RegisterHandler(srv, new(Greeter))
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(ln)
	defer srv.Close()
	client := micro.NewClient(micro.WithAddress(ln.Addr().String()))
	defer client.Close()

	var rsp HelloResponse
	err := client.Call(context.Background(), "greeter", "Greeter.Hello", &HelloRequest{Name: "ada"}, &rsp)
	fmt.Println(micro.CodeOf(err))
	ctx := micro.NewContext(context.Background(), micro.MD{"Authorization": "Bearer t0k3n"})
	err = client.Call(ctx, "greeter", "Greeter.Hello", &HelloRequest{Name: "ada"}, &rsp)
	fmt.Println(rsp.Message, err)
	// Output:
	// unauthenticated
	// Hello ada <nil>
}

// Errors carry a code across the wire; errors.Is and errors.As see through
// wrapping on this side.
func ExampleCodeOf() {
	err := fmt.Errorf("loading user 7: %w", micro.NewError(micro.CodeNotFound, "no user 7"))
	fmt.Println(micro.CodeOf(err), micro.CodeOf(err).HTTPStatus())
	var e *micro.Error
	fmt.Println(errors.As(err, &e), e.Message)
	fmt.Println(micro.CodeOf(context.DeadlineExceeded))
	// Output:
	// not_found 404
	// true no user 7
	// deadline_exceeded
}

// Canary routing: a filter keeps the nodes labelled track=canary.
func ExampleFilterMetadata() {
	reg := micro.NewMemoryRegistry()
	defer reg.Close()
	ctx := context.Background()
	reg.Register(ctx, &micro.ServiceInfo{Name: "greeter", Version: "1.0", Nodes: []*micro.Node{
		{ID: "stable-1", Address: "10.0.0.1:8080", Metadata: map[string]string{"track": "stable"}},
		{ID: "canary-1", Address: "10.0.0.2:8080", Metadata: map[string]string{"track": "canary"}},
	}}, time.Minute)
	services, _ := reg.Lookup(ctx, "greeter")
	for _, s := range micro.FilterMetadata("track", "canary")(services) {
		for _, n := range s.Nodes {
			fmt.Println(n.ID, n.Address)
		}
	}
	// A client does the same for every call with
	// micro.NewClient(micro.WithRegistry(reg), micro.WithFilter(micro.FilterMetadata("track", "canary"))).
	// Output: canary-1 10.0.0.2:8080
}

type UserCreated struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

// One service subscribes to a topic; another publishes on it and returns
// once the subscriber has handled the event.
func ExampleRegisterSubscriber() {
	reg := micro.NewMemoryRegistry()
	defer reg.Close()

	mailer := micro.NewService(micro.Name("mailer"), micro.Address("127.0.0.1:0"), micro.WithRegistry(reg))
	_, err := micro.RegisterSubscriber("user.created", mailer.Server(), func(ctx context.Context, ev *UserCreated) error {
		fmt.Println("welcome mail to", ev.Name)
		return nil
	}, micro.Queue("mailers")) // with several mailers, one of them sends it
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := mailer.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer mailer.Close()

	users := micro.NewService(micro.Name("users"), micro.WithRegistry(reg))
	defer users.Close()
	var delivered int
	err = users.Client().Publish(context.Background(), "user.created", &UserCreated{ID: 7, Name: "ada"}, micro.Delivered(&delivered))
	fmt.Println(delivered, err)
	err = users.Client().Publish(context.Background(), "user.deleted", &UserCreated{ID: 7}, micro.Delivered(&delivered))
	fmt.Println(delivered, err)
	// Output:
	// welcome mail to ada
	// 1 <nil>
	// 0 <nil>
}

// A file store keeps records across restarts; a prefix read returns them in
// key order.
func ExampleFileStore() {
	dir, err := os.MkdirTemp("", "store")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()

	store, err := micro.NewFileStore(dir) // fsync per write; micro.SyncGroupCommit() for many writers
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, k := range []string{"user/2", "user/1", "order/9"} {
		store.Write(ctx, &micro.Record{Key: k, Value: []byte("value of " + k)})
	}
	store.Write(ctx, &micro.Record{Key: "session/x", Value: []byte("t")}, micro.WriteTTL(time.Hour))
	store.Close()

	store, err = micro.NewFileStore(dir) // reopened: replayed from the log
	if err != nil {
		fmt.Println(err)
		return
	}
	defer store.Close()
	recs, _ := store.Read(ctx, "user/", micro.ReadPrefix())
	for _, r := range recs {
		fmt.Printf("%s: %s\n", r.Key, r.Value)
	}
	_, err = store.Read(ctx, "user/3")
	fmt.Println(errors.Is(err, micro.ErrNotFound))
	keys, _ := store.List(ctx, micro.ListLimit(2))
	fmt.Println(keys)
	// Output:
	// user/1: value of user/1
	// user/2: value of user/2
	// true
	// [order/9 session/x]
}
