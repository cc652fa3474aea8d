//go:build windows

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

// http1Reset reports whether err says the peer reset the connection or
// aborted it: Winsock's codes, which syscall.ECONNRESET does not match.
func http1Reset(err error) bool {
	return errors.Is(err, syscall.WSAECONNRESET) || errors.Is(err, syscall.WSAECONNABORTED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
