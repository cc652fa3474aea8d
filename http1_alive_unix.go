//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package micro

import (
	"errors"
	"net"
	"syscall"
)

// http1Prober looks at an idle pooled connection without waiting or
// consuming anything: one non-blocking peek finds a connection the server has
// closed (EOF, a reset) or one with bytes nobody asked for (a stray reply).
// It is made once per connection, so a check allocates nothing.
type http1Prober struct {
	rc    syscall.RawConn
	alive bool
	b     [1]byte
	fn    func(fd uintptr) bool
}

func newHTTP1Prober(c net.Conn) *http1Prober {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	p := &http1Prober{rc: rc}
	p.fn = func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), p.b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK || err == syscall.EINTR:
		case err != nil, n >= 0: // closed (0), reset, or unasked-for bytes
			p.alive = false
		}
		return true // one look only, never wait
	}
	return p
}

// check reports whether the connection may carry a request.
func (p *http1Prober) check() bool {
	if p == nil {
		return true
	}
	p.alive = true
	err := p.rc.Read(p.fn)
	return p.alive && err == nil
}

// http1Reset reports whether err says the peer reset the connection or had
// closed it when we wrote.
func http1Reset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
