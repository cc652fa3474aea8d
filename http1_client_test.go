package micro

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// gate echoes its request; a request that begins "slow" first says so on
// started and then waits for release (or its context).
type gate struct {
	started chan string
	release chan struct{}
}

func newGate() *gate {
	return &gate{started: make(chan string, 16), release: make(chan struct{})}
}

func (g *gate) Pass(ctx context.Context, req *[]byte) (*[]byte, error) {
	if bytes.HasPrefix(*req, []byte("slow")) {
		g.started <- string(*req)
		select {
		case <-g.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	out := append([]byte("re:"), *req...)
	return &out, nil
}

// newPipeServer serves a gate on a counting listener.
func newPipeServer(t *testing.T) (*gate, *countingListener) {
	g, cl, _ := newPipeServerOn(t, nil)
	return g, cl
}

// newPipeServerOn serves a gate on a counting listener, made by wrap (if
// not nil) around a loopback one. The server is closed when the test ends.
func newPipeServerOn(t *testing.T, wrap func(net.Listener) net.Listener) (*gate, *countingListener, *Server) {
	t.Helper()
	g := newGate()
	srv := NewServer()
	assertNoError(t, RegisterHandler(srv, g, HandlerName("Gate")))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	if wrap != nil {
		ln = wrap(ln)
	}
	cl := &countingListener{Listener: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(cl)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return g, cl, srv
}

// newPipeClient makes a client of addr whose fast path opens at most conns
// connections and pipelines behind any call, however old, up to depth.
// Each call that joins a connection is reported on the returned channel.
func newPipeClient(t *testing.T, addr string, conns, depth int) (*Client, chan struct{}) {
	t.Helper()
	c := newTestClient(t, WithAddress(addr), Retries(0))
	joined := make(chan struct{}, 1024)
	c.h1.maxConns, c.h1.maxDepth, c.h1.maxWait = conns, depth, time.Hour
	c.h1.enqueued = func() { joined <- struct{}{} }
	return c, joined
}

func callGate(ctx context.Context, c *Client, payload string) (string, error) {
	var rsp []byte
	err := c.Call(ctx, "gate", "Gate.Pass", []byte(payload), &rsp, ContentType(ContentTypeBytes))
	return string(rsp), err
}

// Many callers over two shared connections each get their own reply, and
// the connections are shared rather than one a caller.
func TestHTTP1PipelinedCallsKeepTheirReplies(t *testing.T) {
	checkGoroutines(t)
	_, ln := newPipeServer(t)
	c, _ := newPipeClient(t, ln.Addr().String(), 2, 64)
	c.h1.enqueued = nil
	const callers, calls = 48, 100
	var wg sync.WaitGroup
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < calls; j++ {
				want := fmt.Sprintf("caller %d call %d %s", i, j, strings.Repeat("x", (i*j)%300))
				got, err := callGate(context.Background(), c, want)
				if err != nil || got != "re:"+want {
					t.Errorf("call %d/%d: %q, %v", i, j, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n := ln.n.Load(); n != 2 {
		t.Fatalf("%d connections for %d callers; want 2, shared", n, callers)
	}
}

// Callers that give up while their calls wait behind a slow one return at
// once; their replies are read and thrown away by those after them, who get
// their own, and the connection goes on.
func TestHTTP1PipelineCallersGiveUpAndTheRestGoOn(t *testing.T) {
	checkGoroutines(t)
	g, ln := newPipeServer(t)
	c, joined := newPipeClient(t, ln.Addr().String(), 1, 64)

	slow := make(chan error, 1)
	go func() {
		got, err := callGate(context.Background(), c, "slow one")
		if err == nil && got != "re:slow one" {
			err = fmt.Errorf("slow call got %q", got)
		}
		slow <- err
	}()
	<-joined
	<-g.started

	// Ten calls join behind it and give up; five more join and wait.
	ctx, cancel := context.WithCancel(context.Background())
	gaveUp := make(chan error, 10)
	for i := 0; i < 10; i++ {
		go func() {
			_, err := callGate(ctx, c, fmt.Sprintf("abandoned %d", i))
			gaveUp <- err
		}()
		<-joined
	}
	cancel()
	for i := 0; i < 10; i++ {
		assertCode(t, <-gaveUp, CodeCanceled)
	}
	waited := make(chan error, 5)
	for i := 0; i < 5; i++ {
		go func() {
			want := fmt.Sprintf("patient %d", i)
			got, err := callGate(context.Background(), c, want)
			if err == nil && got != "re:"+want {
				err = fmt.Errorf("got %q, want %q", got, "re:"+want)
			}
			waited <- err
		}()
		<-joined
	}
	close(g.release)
	assertNoError(t, <-slow)
	for i := 0; i < 5; i++ {
		assertNoError(t, <-waited)
	}
	got, err := callGate(context.Background(), c, "after")
	assertNoError(t, err)
	assertEqual(t, got, "re:after")
	assertEqual(t, ln.n.Load(), int32(1))
}

// The caller reading the connection gives up while it waits for its reply:
// it returns at once, and the caller behind it reads past that reply to its
// own. The connection stays in step and in use.
func TestHTTP1PipelineReaderGivesUp(t *testing.T) {
	checkGoroutines(t)
	g, ln := newPipeServer(t)
	c, joined := newPipeClient(t, ln.Addr().String(), 1, 64)

	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := callGate(ctx, c, "slow, and given up")
		first <- err
	}()
	<-joined
	<-g.started
	second := make(chan error, 1)
	go func() {
		got, err := callGate(context.Background(), c, "behind")
		if err == nil && got != "re:behind" {
			err = fmt.Errorf("got %q", got)
		}
		second <- err
	}()
	<-joined
	cancel()
	assertCode(t, <-first, CodeCanceled)
	close(g.release) // the first reply comes now, to be thrown away
	assertNoError(t, <-second)
	got, err := callGate(context.Background(), c, "again")
	assertNoError(t, err)
	assertEqual(t, got, "re:again")
	assertEqual(t, ln.n.Load(), int32(1))
}

// A call never waits behind one older than maxWait: with a slow call in
// flight, the next goes on a new connection and completes first.
func TestHTTP1NoPipeliningBehindASlowCall(t *testing.T) {
	checkGoroutines(t)
	g, ln := newPipeServer(t)
	c, joined := newPipeClient(t, ln.Addr().String(), 1, 64)
	c.h1.maxWait = time.Nanosecond
	slow := make(chan error, 1)
	go func() {
		_, err := callGate(context.Background(), c, "slow")
		slow <- err
	}()
	<-joined
	<-g.started
	got, err := callGate(context.Background(), c, "quick")
	assertNoError(t, err)
	assertEqual(t, got, "re:quick")
	close(g.release)
	assertNoError(t, <-slow)
	assertEqual(t, ln.n.Load(), int32(2))
}

// A server that answers the first of several pipelined requests with
// Connection: close served none after it (RFC 9112 §9.6): those calls go
// again, on a new connection, and succeed.
func TestHTTP1PipelinedCallsAfterConnectionCloseGoAgain(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	var served sync.WaitGroup
	served.Add(1)
	go func() { // a hand-written server
		defer served.Done()
		for conn := 0; ; conn++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			br := bufio.NewReader(c)
			var reqs []*http.Request
			want := 1
			if conn == 0 {
				want = 3 // the first connection waits for three pipelined requests
			}
			for len(reqs) < want {
				req, err := http.ReadRequest(br)
				if err != nil {
					break
				}
				body, _ := io.ReadAll(req.Body)
				req.Body = io.NopCloser(bytes.NewReader(body))
				reqs = append(reqs, req)
			}
			for i, req := range reqs {
				body, _ := io.ReadAll(req.Body)
				closing := conn == 0 && i == 0
				head := "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
				if closing {
					head += "Connection: close\r\n"
				}
				fmt.Fprintf(c, "%sContent-Length: %d\r\n\r\nre:%s", head, len(body)+3, body)
				if closing {
					break
				}
			}
			if conn == 0 {
				c.Close()
				continue
			}
			served.Add(1)
			go func() { // later connections: one reply a request
				defer served.Done()
				defer c.Close()
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					body, _ := io.ReadAll(req.Body)
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\nre:%s", len(body)+3, body)
				}
			}()
		}
	}()
	c, joined := newPipeClient(t, ln.Addr().String(), 1, 64)
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() {
			want := fmt.Sprintf("call %d", i)
			got, err := callGate(context.Background(), c, want)
			if err == nil && got != "re:"+want {
				err = fmt.Errorf("got %q, want %q", got, "re:"+want)
			}
			errs <- err
		}()
		<-joined
	}
	for i := 0; i < 3; i++ {
		assertNoError(t, <-errs)
	}
	c.Close()
	ln.Close()
	served.Wait()
}

// The server gathers replies to pipelined requests, but a reply does not
// wait for a slow handler after it: the first reply arrives while the
// second request's handler still runs.
func TestHTTP1ServerDoesNotHoldARepliesBehindASlowHandler(t *testing.T) {
	checkGoroutines(t)
	g, ln := newPipeServer(t)
	conn, err := net.Dial("tcp", ln.Addr().String())
	assertNoError(t, err)
	defer conn.Close()
	req := func(body string) string {
		return fmt.Sprintf("POST /Gate/Pass HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
	_, err = io.WriteString(conn, req("fast")+req("slow"))
	assertNoError(t, err)
	<-g.started
	conn.SetReadDeadline(time.Now().Add(20 * time.Second)) // a guard, not a measure: the reply is due without release
	br := bufio.NewReader(conn)
	rsp, err := http.ReadResponse(br, nil)
	assertNoError(t, err)
	body, _ := io.ReadAll(rsp.Body)
	assertEqual(t, string(body), "re:fast")
	close(g.release)
	rsp, err = http.ReadResponse(br, nil)
	assertNoError(t, err)
	body, _ = io.ReadAll(rsp.Body)
	assertEqual(t, string(body), "re:slow")
}

// A shutdown that begins while pipelined requests wait says Connection:
// close on the reply it finishes, and serves nothing after it.
func TestHTTP1ShutdownEndsAPipelineCleanly(t *testing.T) {
	checkGoroutines(t)
	g, ln, srv := newPipeServerOn(t, nil)
	conn, err := net.Dial("tcp", ln.Addr().String())
	assertNoError(t, err)
	defer conn.Close()
	req := func(body string) string {
		return fmt.Sprintf("POST /Gate/Pass HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
	_, err = io.WriteString(conn, req("slow")+req("next"))
	assertNoError(t, err)
	<-g.started
	srv.beginClose() // what Shutdown does first, here so that it is done before the release
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	close(g.release)
	br := bufio.NewReader(conn)
	rsp, err := http.ReadResponse(br, nil)
	assertNoError(t, err)
	body, _ := io.ReadAll(rsp.Body)
	assertEqual(t, string(body), "re:slow")
	if !rsp.Close {
		t.Fatalf("the reply finished during shutdown does not say Connection: close: %v", rsp.Header)
	}
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Fatal("a pipelined request was served after Connection: close")
	}
	assertNoError(t, <-shut)
}

// A call with a large body to a server that does not read it ends when its
// context does, even while its write is blocked.
func TestHTTP1LargeWriteEndsWithItsContext(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c // held open, never read
		}
	}()
	c := newTestClient(t, WithAddress(ln.Addr().String()), Retries(0), RequestTimeout(time.Minute))
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		conn := <-accepted
		cancel() // before, during or after the write blocks: the call ends all the same
		t.Cleanup(func() { conn.Close() })
	}()
	var rsp []byte
	err = c.Call(ctx, "gate", "Gate.Pass", bytes.Repeat([]byte("x"), 32<<20), &rsp, ContentType(ContentTypeBytes))
	assertCode(t, err, CodeCanceled)
}

// FuzzHTTP1ClientReplies has a server answer pipelined calls with arbitrary
// bytes and then hang up: every call must end, with a reply or an error,
// and nothing may panic or be left running.
func FuzzHTTP1ClientReplies(f *testing.F) {
	ok := func(body string) string {
		return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
	f.Add([]byte(ok("a") + ok("bb") + ok("ccc")))
	f.Add([]byte(ok("a") + "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nb"))
	f.Add([]byte("HTTP/1.1 100 Continue\r\n\r\n" + ok("a") + "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"))
	f.Add([]byte(ok("a") + "HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\nshort"))
	f.Add([]byte("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 41\r\n\r\n{\"code\":\"unavailable\",\"message\":\"busy\"}x"))
	f.Add([]byte("garbage\r\n\r\n"))
	f.Fuzz(func(t *testing.T, reply []byte) {
		addr := serveConns(t, func(c net.Conn) { c.Write(reply) })
		c := NewClient(WithAddress(addr), Retries(0), RequestTimeout(10*time.Second))
		c.h1.maxConns, c.h1.maxDepth, c.h1.maxWait = 1, 64, time.Hour
		var calls sync.WaitGroup
		for i := 0; i < 3; i++ {
			calls.Add(1)
			go func() {
				defer calls.Done()
				var rsp []byte
				err := c.Call(context.Background(), "gate", "Gate.Pass", []byte("q"), &rsp, ContentType(ContentTypeBytes))
				if CodeOf(err) == CodeDeadlineExceeded {
					t.Errorf("a call hung until its deadline: %v", err)
				}
			}()
		}
		calls.Wait()
		c.Close()
	})
}

// ConnsPerNode(-1) turns sharing off: eight slow calls at once run on eight
// connections, all in their handlers together (a call pipelined behind
// another would not start until that one ended).
func TestHTTP1ConnsPerNodeCanTurnSharingOff(t *testing.T) {
	checkGoroutines(t)
	g, ln := newPipeServer(t)
	c := newTestClient(t, WithAddress(ln.Addr().String()), Retries(0), ConnsPerNode(-1))
	c.h1.maxWait = time.Hour // would share, if it shared at all
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() {
			_, err := callGate(context.Background(), c, fmt.Sprintf("slow %d", i))
			errs <- err
		}()
	}
	for i := 0; i < 8; i++ {
		<-g.started
	}
	close(g.release)
	for i := 0; i < 8; i++ {
		assertNoError(t, <-errs)
	}
	assertEqual(t, ln.n.Load(), int32(8))
}
