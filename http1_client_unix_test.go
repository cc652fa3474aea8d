//go:build unix

package micro

import (
	"bytes"
	"context"
	"fmt"
	"net"
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
