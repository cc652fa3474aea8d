package micro

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rawConn dials addr and returns the connection and a reader of replies.
func rawConn(t *testing.T, addr string) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	assertNoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a failing test ends, not hangs
	return c.(*net.TCPConn), bufio.NewReader(c)
}

func helloRequest(name string, extra string) string {
	body := `{"name":"` + name + `"}`
	return "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
		"Content-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body
}

func readReply(t *testing.T, br *bufio.Reader) (*http.Response, string) {
	t.Helper()
	rsp, err := http.ReadResponse(br, nil)
	assertNoError(t, err)
	b, err := io.ReadAll(rsp.Body)
	assertNoError(t, err)
	rsp.Body.Close()
	return rsp, strings.TrimSpace(string(b))
}

// expectClosed reads until the server closes the connection.
func expectClosed(t *testing.T, br *bufio.Reader) {
	t.Helper()
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("connection not closed by the server: %v (read %q)", err, rest)
	}
}

func TestHTTP1KeepAliveCloseAndPipelining(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, nil, &Greeter{id: "g"})

	t.Run("pipelined", func(t *testing.T) {
		c, br := rawConn(t, addr)
		// Three requests in one write; the replies come back in order.
		io.WriteString(c, helloRequest("a", "")+helloRequest("b", "")+helloRequest("c", ""))
		for _, name := range []string{"a", "b", "c"} {
			rsp, body := readReply(t, br)
			assertEqual(t, rsp.StatusCode, 200)
			assertEqual(t, body, `{"message":"hello `+name+`","node":"g"}`)
			assertEqual(t, rsp.Close, false)
		}
	})
	t.Run("connection close", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, helloRequest("a", "Connection: close\r\n"))
		rsp, body := readReply(t, br)
		assertEqual(t, body, `{"message":"hello a","node":"g"}`)
		assertEqual(t, rsp.Close, true)
		expectClosed(t, br)
	})
	t.Run("HTTP/1.0", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, strings.Replace(helloRequest("old", ""), "HTTP/1.1", "HTTP/1.0", 1))
		_, body := readReply(t, br)
		assertEqual(t, body, `{"message":"hello old","node":"g"}`)
		expectClosed(t, br)
	})
	t.Run("chunked body", func(t *testing.T) {
		c, br := rawConn(t, addr)
		body := `{"name":"chunky"}`
		io.WriteString(c, "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
			"Transfer-Encoding: chunked\r\n\r\n"+fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body))
		rsp, got := readReply(t, br)
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, got, `{"message":"hello chunky","node":"g"}`)
		// Served, and the connection closes after it, so that nothing can
		// be smuggled behind a chunked body.
		assertEqual(t, rsp.Close, true)
		expectClosed(t, br)
	})
	t.Run("expect 100-continue", func(t *testing.T) {
		c, br := rawConn(t, addr)
		body := `{"name":"patient"}`
		io.WriteString(c, "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
			"Expect: 100-continue\r\nContent-Length: "+fmt.Sprint(len(body))+"\r\n\r\n")
		line, err := br.ReadString('\n')
		assertNoError(t, err)
		assertEqual(t, line, "HTTP/1.1 100 Continue\r\n")
		blank, _ := br.ReadString('\n')
		assertEqual(t, blank, "\r\n")
		io.WriteString(c, body) // only now, as curl does
		_, got := readReply(t, br)
		assertEqual(t, got, `{"message":"hello patient","node":"g"}`)
	})
	t.Run("health on the same port", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
		rsp, body := readReply(t, br)
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, body, `{"status":"serving"}`)
	})
}

func TestHTTP1LimitsAndSlowClients(t *testing.T) {
	checkGoroutines(t)
	addr, _ := newTestServer(t, []ServerOption{MaxBodySize(1024), ReadHeaderTimeout(150 * time.Millisecond)}, &Greeter{id: "g"})

	t.Run("body over the limit", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
		rsp, body := readReply(t, br)
		assertEqual(t, rsp.StatusCode, 429)
		if !strings.Contains(body, "resource_exhausted") {
			t.Fatalf("body %s", body)
		}
		expectClosed(t, br) // the unread body cannot be skipped safely
	})
	t.Run("big header goes to net/http", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, helloRequest("big", "X-Padding: "+strings.Repeat("p", 8000)+"\r\n"))
		rsp, body := readReply(t, br)
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, body, `{"message":"hello big","node":"g"}`)
	})
	t.Run("header over MaxHeaderBytes", func(t *testing.T) {
		c, br := rawConn(t, addr)
		io.WriteString(c, helloRequest("huge", "X-Padding: "+strings.Repeat("p", 200<<10)+"\r\n"))
		rsp, _ := readReply(t, br)
		assertEqual(t, rsp.StatusCode, http.StatusRequestHeaderFieldsTooLarge)
	})
	t.Run("slowloris is cut off", func(t *testing.T) {
		c, br := rawConn(t, addr)
		// Half a header, then nothing: the server must hang up once the
		// read-header timeout passes, not wait forever.
		io.WriteString(c, "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-")
		expectClosed(t, br)
	})
	t.Run("a trickling header is cut off too", func(t *testing.T) {
		c, br := rawConn(t, addr)
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			for _, b := range []byte("POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond): // a byte at a time, a slow client
				}
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
			}
		}()
		expectClosed(t, br)
	})
}

func TestHTTP1SmugglingRefused(t *testing.T) {
	checkGoroutines(t)
	g := &Greeter{id: "g"}
	addr, _ := newTestServer(t, nil, g)
	// Each request hides a second one ("GET /health") in its body under one
	// reading of the framing. A server that honours the other reading answers
	// twice. Either the request is refused, or exactly one reply comes back.
	smuggled := "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
	tests := map[string]string{
		"CL.TE": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Content-Length: " + fmt.Sprint(5+len(smuggled)) + "\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
		"TE.CL": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled),
		"TE.TE obfuscated": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Content-Length: " + fmt.Sprint(len(smuggled)) + "\r\nTransfer-Encoding : chunked\r\n\r\n" + smuggled,
		"two lengths": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Content-Length: 0\r\nContent-Length: " + fmt.Sprint(len(smuggled)) + "\r\n\r\n" + smuggled,
		"signed length": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Content-Length: +" + fmt.Sprint(len(smuggled)) + "\r\n\r\n" + smuggled,
		"folded TE": "POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			"Content-Length: " + fmt.Sprint(len(smuggled)) + "\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\n\r\n" + smuggled,
	}
	for name, req := range tests {
		t.Run(name, func(t *testing.T) {
			c, br := rawConn(t, addr)
			io.WriteString(c, req)
			c.CloseWrite()
			var statuses []int
			for {
				rsp, err := http.ReadResponse(br, nil)
				if err != nil {
					break
				}
				io.Copy(io.Discard, rsp.Body)
				statuses = append(statuses, rsp.StatusCode)
			}
			if len(statuses) > 1 {
				t.Fatalf("smuggled a second request: replies %v", statuses)
			}
			if len(statuses) == 1 && statuses[0] == 200 {
				t.Logf("answered once with 200 (the smuggled part was read as body)")
			}
		})
	}
}

// fakeServer runs reply for the first request on each connection it
// accepts, then closes the connection.
func fakeServer(t *testing.T, reply func(c net.Conn)) string {
	t.Helper()
	return serveConns(t, func(c net.Conn) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		reply(c)
	})
}

// serveConns runs serve on each connection a new loopback listener
// accepts, and closes the connection after; the listener closes, and every
// serve has returned, when the test ends.
func serveConns(t *testing.T, serve func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	return serveConnsOn(t, ln, serve)
}

// serveConnsOn is serveConns on a listener of the caller's.
func serveConnsOn(t *testing.T, ln net.Listener, serve func(c net.Conn)) string {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// closingServer answers its first request on each connection, then hangs up
// (or, with midReply, hangs up halfway through the reply). It counts the
// connections.
func closingServer(t *testing.T, midReply bool, closed chan<- struct{}) (string, func() int) {
	t.Helper()
	var mu sync.Mutex
	conns := 0
	body := `{"message":"hi","node":"closer"}`
	reply := "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body
	if midReply {
		reply = reply[:len(reply)-10]
	}
	addr := fakeServer(t, func(c net.Conn) {
		mu.Lock()
		conns++
		mu.Unlock()
		io.WriteString(c, reply)
		c.Close()
		if closed != nil {
			closed <- struct{}{}
		}
	})
	return addr, func() int {
		mu.Lock()
		defer mu.Unlock()
		return conns
	}
}

func TestHTTP1ClientAndClosingServers(t *testing.T) {
	checkGoroutines(t)
	t.Run("a pooled connection the server has closed is not used", func(t *testing.T) {
		// The server hangs up after each reply (without saying so); once it
		// has, the next call sees the closed connection before writing on
		// it, and dials afresh. (Had the call been written first, it would
		// fail rather than run twice: see the next subtest.)
		closed := make(chan struct{}, 1)
		addr, conns := closingServer(t, false, closed)
		client := newTestClient(t, WithAddress(addr), Retries(0))
		for i := 0; i < 3; i++ {
			var rsp HelloResponse
			assertNoError(t, client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp))
			assertEqual(t, rsp.Message, "hi")
			<-closed
		}
		assertEqual(t, conns(), 3)
	})
	t.Run("closed mid-reply: a clean error, not retried", func(t *testing.T) {
		addr, conns := closingServer(t, true, nil)
		client := newTestClient(t, WithAddress(addr))
		var rsp HelloResponse
		err := client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp)
		assertCode(t, err, CodeUnavailable)
		assertEqual(t, conns(), 1) // the handler may have run: no second try
	})
	t.Run("refused: retried elsewhere", func(t *testing.T) {
		addr, _ := newTestServer(t, nil, &Greeter{id: "up"})
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dead := ln.Addr().String()
		ln.Close()
		client := newTestClient(t, WithAddress(dead, addr), WithBalancer(NewBalancer(RoundRobin)))
		for i := 0; i < 4; i++ {
			var rsp HelloResponse
			assertNoError(t, client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp))
			assertEqual(t, rsp.Node, "up")
		}
	})
}

func TestHTTP1NoLeaksAfterManyCanceledCalls(t *testing.T) {
	checkGoroutines(t)
	addr, srv := newTestServer(t, nil, &Greeter{id: "g"}, &Echo{})
	client := NewClient(WithAddress(addr), Retries(0))
	const workers, calls = 8, 1250
	var wg sync.WaitGroup
	var mu sync.Mutex
	outcomes := map[Code]int{}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < calls; i++ {
				ctx, cancel := context.WithCancel(context.Background())
				if rand.IntN(3) == 0 { // a third are canceled at a random moment
					time.AfterFunc(time.Duration(rand.IntN(300))*time.Microsecond, cancel)
				}
				var rsp []byte
				err := client.Call(ctx, "echo", "Echo.Bytes", []byte("payload"), &rsp, ContentType(ContentTypeBytes))
				cancel()
				if err == nil && string(rsp) != "echo:payload" {
					t.Errorf("wrong reply %q", rsp) // a reply read off a reused connection out of step
				}
				mu.Lock()
				outcomes[CodeOf(err)]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for code := range outcomes {
		if code != 0 && code != CodeCanceled {
			t.Fatalf("outcomes %v: only success and canceled expected", outcomes)
		}
	}
	t.Logf("outcomes: %v", outcomes)
	client.Close()
	// Every connection the client opened is gone from the server once the
	// client has closed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		srv.mu.Lock()
		n := len(srv.conns)
		srv.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d server connections left open", n)
		}
		time.Sleep(5 * time.Millisecond) // waiting for the server to see the closes, polled
	}
}

// FuzzHTTP1Conn writes arbitrary bytes to a real connection of the fast
// path: every reply must parse as HTTP/1.1, and the server must go on serving.
func FuzzHTTP1Conn(f *testing.F) {
	f.Add([]byte(helloRequest("a", "")))
	f.Add([]byte(helloRequest("a", "") + helloRequest("b", "Connection: close\r\n")))
	f.Add([]byte("POST /Greeter/Hello HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("POST /Echo/Bytes HTTP/1.1\r\nContent-Type: application/octet-stream\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Add([]byte("GET /health HTTP/1.1\r\n\r\n"))
	srv := NewServer(MaxBodySize(4096), ReadHeaderTimeout(time.Second), IdleTimeout(time.Second))
	if err := RegisterHandler(srv, &Greeter{id: "f"}); err != nil {
		f.Fatal(err)
	}
	if err := RegisterHandler(srv, &Echo{}); err != nil {
		f.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	addr := ln.Addr().String()
	f.Fuzz(func(t *testing.T, input []byte) {
		if bytes.Contains(input, []byte("Wait")) || bytes.Contains(input, []byte("Slow")) {
			return // handlers that block by design
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(input)
		c.(*net.TCPConn).CloseWrite()
		br := bufio.NewReader(c)
		for {
			if _, err := br.Peek(1); err != nil {
				break // the server is done with this connection
			}
			if bytes.HasPrefix(input, []byte("PRI * HTTP/2.0")) {
				break // HTTP/2 frames: not ours to parse here
			}
			rsp, err := http.ReadResponse(br, nil)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("server neither answered nor closed: %v", err)
				}
				t.Fatalf("reply does not parse as HTTP/1.1: %v", err)
			}
			io.Copy(io.Discard, rsp.Body)
			rsp.Body.Close()
		}
		// The server still serves.
		client := NewClient(WithAddress(addr))
		defer client.Close()
		var rsp HelloResponse
		if err := client.Call(context.Background(), "f", "Greeter.Hello", &HelloRequest{Name: "ok"}, &rsp); err != nil {
			t.Fatalf("server broken after input: %v", err)
		}
	})
}

// cannedServer answers every request with reply, then closes.
func cannedServer(t *testing.T, reply string) string {
	return fakeServer(t, func(c net.Conn) { io.WriteString(c, reply) })
}

func TestHTTP1ClientReadsForeignReplies(t *testing.T) {
	checkGoroutines(t)
	body := `{"message":"hi","node":"foreign"}`
	tests := []struct {
		name  string
		reply string
		code  Code // 0: success with body
		md    string
	}{
		{"plain", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body, 0, ""},
		{"charset and case", "HTTP/1.1 200 OK\r\ncontent-type: Application/JSON; charset=utf-8\r\ncontent-length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body, 0, ""},
		{"chunked", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" +
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body), 0, ""},
		{"to the end of the connection", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body, 0, ""},
		{"HTTP/1.0", "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body, 0, ""},
		{"early hints first", "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
			fmt.Sprint(len(body)) + "\r\n\r\n" + body, 0, ""},
		{"trailer metadata", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTrailer-X-Cost: 7\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n\r\n" + body, 0, "7"},
		{"connect error", "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 41\r\n\r\n" + `{"code":"not_found","message":"no such!"}`, CodeNotFound, ""},
		{"plain 503", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy", CodeUnavailable, ""},
		{"wrong content type", "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi", CodeInternal, ""},
		{"garbage", "SPDY/9 what\r\n\r\n", CodeUnavailable, ""},
		{"short body", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{}", CodeUnavailable, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := cannedServer(t, tt.reply)
			client := newTestClient(t, WithAddress(addr), Retries(0))
			var rsp HelloResponse
			var md MD
			err := client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp, ResponseHeader(&md))
			if tt.code != 0 {
				assertCode(t, err, tt.code)
				return
			}
			assertNoError(t, err)
			assertEqual(t, rsp.Node, "foreign")
			assertEqual(t, md.Get("X-Cost"), tt.md)
		})
	}
}

func TestHTTP1ParseHeadTakesOurReplies(t *testing.T) {
	// Our server's own replies take the parser's allocation-free path.
	for _, rep := range []rpcReply{
		{status: 200, contentType: ContentTypeBytes, body: []byte("hi")},
		{status: 404, contentType: ContentTypeJSON, md: MD{"X-A": "b"}, body: []byte(`{"code":"not_found"}`)},
	} {
		b := http1AppendReplyHeader(nil, rep, false)
		hdr, err := http1PeekHead(bufio.NewReader(bytes.NewReader(b)), 4096)
		assertNoError(t, err)
		h := http1Head{length: -1}
		if !http1ParseHead(hdr, ContentTypeBytes, false, &h) {
			t.Fatalf("our own reply fell back to net/http: %q", b)
		}
		assertEqual(t, h.status, rep.status)
		assertEqual(t, h.length, int64(len(rep.body)))
		assertEqual(t, h.close, true)
		if rep.status == 200 {
			assertEqual(t, h.ctype, ContentTypeBytes)
		} else {
			assertEqual(t, h.header.Get("X-A"), "b")
		}
	}
}

// FuzzHTTP1ReadHead checks the client's own reply parser against net/http's:
// whatever it accepts, net/http reads the same way.
func FuzzHTTP1ReadHead(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"))
	f.Add([]byte("HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 204 No Content\r\n\r\n"))
	f.Add([]byte("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 01\r\nContent-Length: 1\r\n\r\nx"))
	f.Fuzz(func(t *testing.T, data []byte) {
		hdr, _ := http1PeekHead(bufio.NewReaderSize(bytes.NewReader(data), 4096), 4096)
		var h http1Head
		h.length = -1
		if hdr == nil || !http1ParseHead(hdr, ContentTypeJSON, true, &h) {
			return
		}
		rsp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(data)), nil)
		if err != nil {
			t.Fatalf("we accepted a head net/http refuses (%v): %q", err, data)
		}
		if rsp.StatusCode != h.status || (rsp.ContentLength != h.length && !(rsp.ContentLength == -1 && h.length == 0)) {
			t.Fatalf("we read status %d length %d, net/http %d %d: %q", h.status, h.length, rsp.StatusCode, rsp.ContentLength, data)
		}
		if h.final != rsp.Close {
			t.Fatalf("we read final %v, net/http Close %v: %q", h.final, rsp.Close, data)
		}
	})
}

// FuzzHTTP1Classify checks the server's own request-head parser against
// net/http's: every request it serves on the fast path, http.ReadRequest
// reads the same way: method, path, length, content type, deadline,
// connection and metadata.
func FuzzHTTP1Classify(f *testing.F) {
	f.Add([]byte(helloRequest("a", "")))
	f.Add([]byte(helloRequest("a", "X-Trace: 1\r\nConnect-Timeout-Ms: 250\r\nConnection: close\r\n")))
	f.Add([]byte(helloRequest("a", "Expect: 100-continue\r\nx-a: 1\r\nX-A: 2\r\n")))
	f.Add([]byte("POST /Greeter/Hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"))
	srv := NewServer()
	if err := RegisterHandler(srv, &Greeter{}); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, verdict, err := srv.http1Classify(bufio.NewReaderSize(bytes.NewReader(data), http1HeaderBuffer))
		if err != nil || verdict != http1Fast {
			return
		}
		hr, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			t.Fatalf("we serve a request net/http refuses (%v): %q", err, data)
		}
		switch {
		case hr.Method != http.MethodPost || hr.URL.Path != "/Greeter/Hello" || hr.URL.RawQuery != "":
			t.Fatalf("net/http reads %s %s: %q", hr.Method, hr.URL, data)
		case hr.ContentLength != req.length:
			t.Fatalf("length: ours %d, net/http %d: %q", req.length, hr.ContentLength, data)
		case hr.Header.Get("Content-Type") != req.head.contentType:
			t.Fatalf("content type: ours %q, net/http %q: %q", req.head.contentType, hr.Header.Get("Content-Type"), data)
		case hr.Close != req.close:
			t.Fatalf("close: ours %v, net/http %v: %q", req.close, hr.Close, data)
		}
		if v := hr.Header.Get("Connect-Timeout-Ms"); v != "" {
			ms, ok := rpcParseTimeout(v)
			if ok != (req.head.timeout == "") || (ok && ms != req.head.timeoutMS) {
				t.Fatalf("timeout: ours %q/%d, net/http %q: %q", req.head.timeout, req.head.timeoutMS, v, data)
			}
		}
		ours, theirs := req.head.metadata(), rpcIncomingMetadata(hr.Header)
		if len(ours) != len(theirs) {
			t.Fatalf("metadata: ours %v, net/http %v: %q", ours, theirs, data)
		}
		for k, v := range theirs {
			if ours[k] != v {
				t.Fatalf("metadata %s: ours %q, net/http %q: %q", k, ours[k], v, data)
			}
		}
	})
}

func TestHTTP1ReviewRegressions(t *testing.T) {
	checkGoroutines(t)
	t.Run("a written call is never sent again", func(t *testing.T) {
		// The server reads each request, counts it, and hangs up without
		// a reply: the handler may have run, so the client must not resend.
		var mu sync.Mutex
		runs := 0
		addr := fakeServer(t, func(c net.Conn) {
			mu.Lock()
			runs++
			mu.Unlock()
		})
		client := newTestClient(t, WithAddress(addr), Retries(3))
		var rsp HelloResponse
		assertCode(t, client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp), CodeUnavailable)
		mu.Lock()
		assertEqual(t, runs, 1)
		mu.Unlock()
	})
	t.Run("endless reply headers are cut off", func(t *testing.T) {
		addr := fakeServer(t, func(c net.Conn) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\n")
			line := "X-A: " + strings.Repeat("a", 60<<10) + "\r\n"
			for {
				if _, err := io.WriteString(c, line); err != nil {
					return // the client gave up
				}
			}
		})
		client := newTestClient(t, WithAddress(addr), MaxResponseSize(4096), Retries(0))
		var rsp HelloResponse
		if err := client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp); err == nil {
			t.Fatal("a reply with endless headers succeeded")
		}
	})
	t.Run("a handler's own unavailable is not retried", func(t *testing.T) {
		var calls atomic.Int32
		counter := func(next HandlerFunc) HandlerFunc {
			return func(ctx context.Context, req *Request) (any, error) {
				calls.Add(1)
				return next(ctx, req)
			}
		}
		a1, _ := newTestServer(t, []ServerOption{WrapHandler(counter)}, &Echo{})
		a2, _ := newTestServer(t, []ServerOption{WrapHandler(counter)}, &Echo{})
		client := newTestClient(t, WithAddress(a1, a2), Retries(3))
		var rsp Msg
		err := client.Call(context.Background(), "x", "Echo.Fail", &ErrorRequest{Code: CodeUnavailable, Message: "downstream down"}, &rsp)
		assertCode(t, err, CodeUnavailable)
		assertEqual(t, calls.Load(), int32(1))
	})
	t.Run("SetHeader after the handler returned", func(t *testing.T) {
		ctxs := make(chan context.Context, 1)
		keep := func(next HandlerFunc) HandlerFunc {
			return func(ctx context.Context, req *Request) (any, error) {
				ctxs <- ctx
				return next(ctx, req)
			}
		}
		addr, _ := newTestServer(t, []ServerOption{WrapHandler(keep)}, &Greeter{})
		client := newTestClient(t, WithAddress(addr))
		var rsp HelloResponse
		assertNoError(t, client.Call(context.Background(), "x", "Greeter.Hello", &HelloRequest{}, &rsp))
		if err := SetHeader(<-ctxs, "X-Late", "1"); err == nil {
			t.Fatal("SetHeader after the reply succeeded")
		}
	})
	t.Run("a repeated Content-Type means the first, as net/http reads it", func(t *testing.T) {
		addr, _ := newTestServer(t, nil, &Greeter{id: "g"})
		c, br := rawConn(t, addr)
		io.WriteString(c, helloRequest("dup", "Content-Type: application/octet-stream\r\n"))
		rsp, body := readReply(t, br)
		assertEqual(t, rsp.StatusCode, 200)
		assertEqual(t, body, `{"message":"hello dup","node":"g"}`)
	})
}

func TestHTTP1CallerHangingUpCancelsTheHandler(t *testing.T) {
	checkGoroutines(t)
	echo := &Echo{deadline: make(chan time.Duration, 1), expired: make(chan error, 1)}
	addr, _ := newTestServer(t, nil, echo)
	c, _ := rawConn(t, addr)
	body := `{}`
	// No Connect-Timeout-Ms: only the hang-up can end the handler.
	io.WriteString(c, "POST /Echo/Wait HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "+fmt.Sprint(len(body))+"\r\n\r\n"+body)
	assertEqual(t, <-echo.deadline, time.Duration(0))
	c.Close()
	if err := <-echo.expired; !errors.Is(err, context.Canceled) {
		t.Fatalf("handler's context ended with %v, want canceled", err)
	}

	// A pipelined request behind one whose handler watches its context is
	// still served, byte for byte.
	c2, br := rawConn(t, addr)
	wait := "POST /Echo/Wait HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnect-Timeout-Ms: 50\r\nContent-Length: 2\r\n\r\n{}"
	io.WriteString(c2, wait)
	<-echo.deadline
	io.WriteString(c2, helloRequest("next", "")) // arrives while the handler watches
	rsp, _ := readReply(t, br)
	assertEqual(t, rsp.StatusCode, 504)
	<-echo.expired
	rsp, body2 := readReply(t, br)
	assertEqual(t, rsp.StatusCode, 501) // /Greeter/Hello is not registered here: a clean reply, in step
	if !strings.Contains(body2, "unimplemented") {
		t.Fatalf("second reply %q", body2)
	}
}

func TestHTTP1BodyOverTheLimitIsReportedNotRetried(t *testing.T) {
	checkGoroutines(t)
	var calls atomic.Int32
	counter := func(next HandlerFunc) HandlerFunc {
		return func(ctx context.Context, req *Request) (any, error) {
			calls.Add(1)
			return next(ctx, req)
		}
	}
	a1, _ := newTestServer(t, []ServerOption{MaxBodySize(1024), WrapHandler(counter)}, &Echo{})
	a2, _ := newTestServer(t, []ServerOption{MaxBodySize(1024), WrapHandler(counter)}, &Echo{})
	client := newTestClient(t, WithAddress(a1, a2), Retries(3))
	big := bytes.Repeat([]byte("x"), 8<<20) // far past socket buffers: the client is still writing when refused
	var rsp []byte
	err := client.Call(context.Background(), "x", "Echo.Bytes", big, &rsp, ContentType(ContentTypeBytes))
	assertCode(t, err, CodeResourceExhausted)
	assertEqual(t, calls.Load(), int32(0))
}

// TestHTTP1HeadFinal checks the fast path's reading of whether a reply is
// the connection's last served one against net/http's Response.Close.
func TestHTTP1HeadFinal(t *testing.T) {
	for _, c := range []struct {
		head         string
		close, final bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", false, false},
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n", true, true},
		{"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n", false, false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n", true, true},
		{"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n", true, false},
		{"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 0\r\n", true, true},
		{"HTTP/1.0 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n", true, true},
	} {
		h := http1Head{length: -1}
		if !http1ParseHead([]byte(c.head), "application/json", false, &h) {
			t.Fatalf("%q: not parsed", c.head)
		}
		if h.close != c.close || h.final != c.final {
			t.Errorf("%q: close %v final %v, want %v %v", c.head, h.close, h.final, c.close, c.final)
		}
		rsp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(c.head+"\r\n")), nil)
		assertNoError(t, err)
		if rsp.Close != c.final {
			t.Errorf("%q: net/http says Close %v", c.head, rsp.Close)
		}
	}
}
