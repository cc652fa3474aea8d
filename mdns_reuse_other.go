//go:build !linux && !darwin && !freebsd && !netbsd && !openbsd && !dragonfly

package micro

import "syscall"

// mdnsReuse does nothing here: a second responder on the host may fail to
// bind port 5353.
func mdnsReuse(network, address string, c syscall.RawConn) error { return nil }
