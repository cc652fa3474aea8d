//go:build linux

package mdnsbench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// soReusePort is SO_REUSEPORT, absent from package syscall on Linux.
const soReusePort = 0xf

// listenCapture opens a socket on port 5353 that shares it with the
// registries (SO_REUSEADDR, SO_REUSEPORT), is bound to one interface
// (SO_BINDTODEVICE, so it hears only what arrives there) and has joined the
// mDNS group of the family on it.
func listenCapture(ifi *net.Interface, v6 bool) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = errors.Join(
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1),
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1),
				syscall.BindToDevice(int(fd), ifi.Name))
		})
		return errors.Join(err, serr)
	}}
	network, addr := "udp4", "0.0.0.0:5353"
	if v6 {
		network, addr = "udp6", "[::]:5353"
	}
	pc, err := lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return nil, fmt.Errorf("mdnsbench: capture on %s: %w", ifi.Name, err)
	}
	uc := pc.(*net.UDPConn)
	rc, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, err
	}
	var jerr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			mreq := &syscall.IPv6Mreq{Interface: uint32(ifi.Index)}
			copy(mreq.Multiaddr[:], netip.MustParseAddr("ff02::fb").AsSlice())
			jerr = syscall.SetsockoptIPv6Mreq(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_JOIN_GROUP, mreq)
			return
		}
		mreq := &syscall.IPMreqn{Multiaddr: [4]byte{224, 0, 0, 251}, Ifindex: int32(ifi.Index)}
		jerr = syscall.SetsockoptIPMreqn(int(fd), syscall.IPPROTO_IP, syscall.IP_ADD_MEMBERSHIP, mreq)
	})
	if err = errors.Join(err, jerr); err != nil {
		uc.Close()
		return nil, fmt.Errorf("mdnsbench: join the mDNS group on %s: %w", ifi.Name, err)
	}
	return uc, nil
}
