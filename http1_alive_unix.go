//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package micro

import (
	"net"
	"syscall"
)

// http1Alive reports whether an idle pooled connection may carry a request:
// one non-blocking peek finds a connection the server has closed (EOF, a
// reset) or one with bytes nobody asked for (a stray reply), without
// waiting or consuming anything.
func http1Alive(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	alive := true
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK || err == syscall.EINTR:
		case err != nil, n >= 0: // closed (0), reset, or unasked-for bytes
			alive = false
		}
		return true // one look only, never wait
	})
	return alive && err == nil
}
