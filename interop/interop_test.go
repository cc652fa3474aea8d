package interop_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/micro-kit/micro"
	"google.golang.org/protobuf/proto"
)

// TestMain runs the tests in a private network namespace when it can
// (reexecInNetns), and fails the run if they leave goroutines behind: every
// server, client, registry and connection they open must be closed by its
// t.Cleanup.
func TestMain(m *testing.M) {
	if code, ok := reexecInNetns(); ok {
		os.Exit(code)
	}
	before := runtime.NumGoroutine()
	code := m.Run()
	if code == 0 {
		if err := waitGoroutines(before, 5*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// waitGoroutines waits for the goroutine count to fall back to n: closed
// connections end their goroutines a moment after Close returns.
func waitGoroutines(n int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			return fmt.Errorf("leaked goroutines: %d running, %d at start:\n%s", runtime.NumGoroutine(), n, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// HelloRequest and HelloResponse are plain Go messages with JSON tags, as a
// micro user writes them.
type HelloRequest struct {
	Name string `json:"name"`
}

type HelloResponse struct {
	Message string `json:"message"`
}

// protoCodec is a micro.Codec for google.golang.org/protobuf messages under
// "application/proto". Registered with micro.WithCodec, it replaces the
// built-in ProtoCodec (which needs generated Marshal methods), on servers and
// clients alike. It is the example of a user codec: a type with three
// methods, safe for concurrent use since it holds no state.
type protoCodec struct{}

func (protoCodec) ContentType() string { return micro.ContentTypeProto }

func (protoCodec) Marshal(v any) ([]byte, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("protoCodec: %T is not a proto.Message", v)
	}
	return proto.Marshal(m)
}

func (protoCodec) Unmarshal(data []byte, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("protoCodec: %T is not a proto.Message", v)
	}
	return proto.Unmarshal(data, m)
}

// serve runs srv on a loopback listener until the test ends and returns its
// base URL ("http://127.0.0.1:PORT").
func serve(t *testing.T, srv *micro.Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "http://" + l.Addr().String()
}

// newHTTPClient returns an HTTP/1.1 client for connect-go whose connections
// close when the test ends.
func newHTTPClient(t *testing.T) *http.Client {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// newH2CClient returns a client that speaks only cleartext HTTP/2 (prior
// knowledge), as gRPC-style deployments do.
func newH2CClient(t *testing.T) *http.Client {
	t.Helper()
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: protocols}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// newMicroClient returns a micro client closed when the test ends.
func newMicroClient(t *testing.T, opts ...micro.ClientOption) *micro.Client {
	t.Helper()
	c := micro.NewClient(opts...)
	t.Cleanup(func() { c.Close() })
	return c
}

// awaitWait returns what a blocking handler reported, or fails the test if
// the handler never ran (the call failed before reaching it).
func awaitWait(t *testing.T, waits <-chan waitSeen) waitSeen {
	t.Helper()
	select {
	case seen := <-waits:
		return seen
	case <-time.After(5 * time.Second):
		t.Fatal("the handler never ran")
		return waitSeen{}
	}
}

// asConnectError returns err as a *connect.Error or fails the test.
func asConnectError(t *testing.T, err error) *connect.Error {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T) is not a *connect.Error", err, err)
	}
	return ce
}

// asMicroError returns err as a *micro.Error or fails the test.
func asMicroError(t *testing.T, err error) *micro.Error {
	t.Helper()
	var me *micro.Error
	if !errors.As(err, &me) {
		t.Fatalf("error %v (%T) is not a *micro.Error", err, err)
	}
	return me
}
