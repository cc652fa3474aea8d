//go:build plan9

package micro

import "net"

// http1Prober cannot look at the socket here; a dead connection shows up as
// an error on its first use instead.
type http1Prober struct{}

func newHTTP1Prober(net.Conn) *http1Prober { return nil }

func (p *http1Prober) check() bool { return true }

// http1Reset is false: Plan 9 reports network errors as strings, with no
// errno to tell a reset by, so only EOF marks a stale connection.
func http1Reset(error) bool { return false }
