//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly || plan9 || windows)

package micro

import (
	"errors"
	"net"
	"syscall"
)

// http1Prober cannot look at the socket here; a dead connection shows up as
// an error on its first use instead.
type http1Prober struct{}

func newHTTP1Prober(net.Conn) *http1Prober { return nil }

func (p *http1Prober) check() bool { return true }

// http1Reset reports whether err says the peer reset the connection or had
// closed it when we wrote, where the platform's errno says so.
func http1Reset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
