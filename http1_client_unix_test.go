//go:build unix

package micro

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// smallBufListener gives the connections it accepts 4 KiB socket buffers.
type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetReadBuffer(4096)
		tc.SetWriteBuffer(4096)
	}
	return c, err
}

// With small socket buffers both ways and large pipelined requests, a
// caller's write blocks while the server, blocked writing replies nobody
// reads, reads no more. If that caller also held the turn to read, nothing
// would move again: the rest of its write goes on in a goroutine, so the
// replies are read and every call completes.
func TestHTTP1PipelinedWritesDoNotBlockTheReading(t *testing.T) {
	checkGoroutines(t)
	_, ln, _ := newPipeServerOn(t, func(l net.Listener) net.Listener { return smallBufListener{l} })
	c := newTestClient(t, WithAddress(ln.Addr().String()), Retries(0), RequestTimeout(time.Minute))
	c.h1.maxConns, c.h1.maxDepth, c.h1.maxWait = 1, 64, time.Hour
	c.h1.dialer.Control = func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096)
		})
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			want := fmt.Sprintf("%02d", i) + string(bytes.Repeat([]byte("x"), 16<<10))
			got, err := callGate(context.Background(), c, want)
			if err == nil && got != "re:"+want {
				err = fmt.Errorf("call %d: wrong reply", i)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assertNoError(t, err) // deadline_exceeded after a minute if the connection locked up
	}
}

// A server that answers a request before reading its body, then neither
// reads nor closes, leaves the client's write of the body spilled in a
// goroutine. Later calls do not queue behind it (they go on another
// connection), and Client.Close ends it.
func TestHTTP1SpilledWriteToAServerThatStoppedReading(t *testing.T) {
	checkGoroutines(t)
	c, cc, conns := testSpilledConn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := callGate(ctx, c, "small") // deadline_exceeded if it queued behind the spilled write
	assertNoError(t, err)
	assertEqual(t, got, "ok")
	<-conns // on a connection of its own
	ended := testSpillEnded(cc)
	assertNoError(t, c.Close())
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the spilled write outlived Client.Close")
	}
}

// Without Close, such a spilled write ends http1OrphanWrite after the last
// reply, and its connection with it. (This test takes that second.)
func TestHTTP1OrphanedSpillEnds(t *testing.T) {
	checkGoroutines(t)
	_, cc, _ := testSpilledConn(t)
	select {
	case <-testSpillEnded(cc):
	case <-time.After(10 * time.Second):
		t.Fatal("the orphaned spilled write did not end")
	}
	cc.mu.Lock()
	broken := cc.broken
	cc.mu.Unlock()
	if broken == nil {
		t.Fatal("the connection outlived its orphaned write")
	}
}

// testSpilledConn makes a client whose one call got its reply while the
// rest of its request is still being written, in a spill, to a server
// that stopped reading; it returns the client, that connection, and a
// channel told of each connection the server accepts (the first already
// taken). The server lets go when the test ends.
func testSpilledConn(t *testing.T) (*Client, *http1ClientConn, chan struct{}) {
	t.Helper()
	release := make(chan struct{})
	conns := make(chan struct{}, 8)
	small := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	ln, err := small.Listen(context.Background(), "tcp", "127.0.0.1:0")
	assertNoError(t, err)
	addr := serveConnsOn(t, ln, func(c net.Conn) {
		conns <- struct{}{}
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: 2\r\n\r\nok", ContentTypeBytes)
			if req.ContentLength > 1024 {
				<-release // answered, and reads no more
				return
			}
			io.Copy(io.Discard, req.Body)
		}
	})
	t.Cleanup(func() { close(release) }) // before serveConns waits for its connections
	c := newTestClient(t, WithAddress(addr), Retries(0), RequestTimeout(time.Minute))
	c.h1.maxConns = 1 // the next call would share the connection, were it open to more
	c.h1.dialer.Control = func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096)
		})
	}
	got, err := callGate(context.Background(), c, string(bytes.Repeat([]byte("x"), 60<<10)))
	assertNoError(t, err)
	assertEqual(t, got, "ok")
	<-conns
	c.h1.mu.Lock()
	busy := slices.Clone(c.h1.nodes[addr].busy)
	c.h1.mu.Unlock()
	assertEqual(t, len(busy), 1)
	cc := busy[0]
	cc.mu.Lock()
	spilling := cc.spilling
	cc.mu.Unlock()
	if !spilling {
		t.Fatal("the body's write did not spill: the test proves nothing")
	}
	return c, cc, conns
}

// testSpillEnded is closed once cc's spilled write has ended.
func testSpillEnded(cc *http1ClientConn) chan struct{} {
	ended := make(chan struct{})
	go func() {
		cc.mu.Lock()
		for cc.spilling {
			cc.settle.Wait()
		}
		cc.mu.Unlock()
		close(ended)
	}()
	return ended
}
