//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly || plan9)

package micro

import (
	"errors"
	"net"
	"runtime"
	"syscall"
)

// http1Prober cannot look at the socket here; a dead connection shows up as
// an error on its first use instead.
type http1Prober struct{}

func newHTTP1Prober(net.Conn) *http1Prober { return nil }

func (p *http1Prober) check() bool { return true }

// http1Reset reports whether err says the peer reset the connection or had
// closed it when we wrote, where the platform's errno says so. Windows
// reports Winsock's WSAECONNRESET (10054) and WSAECONNABORTED (10053),
// which syscall.ECONNRESET does not match there.
func http1Reset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		runtime.GOOS == "windows" && (errors.Is(err, syscall.Errno(10054)) || errors.Is(err, syscall.Errno(10053)))
}
