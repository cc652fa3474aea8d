//go:build !linux

package mdnsbench

import (
	"errors"
	"net"
)

func listenCapture(ifi *net.Interface, v6 bool) (*net.UDPConn, error) {
	return nil, errors.New("mdnsbench: packet capture is implemented on Linux only")
}
