package micro

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// The mDNS port and groups (RFC 6762 §3).
const mdnsPort = 5353

var (
	mdnsGroup4 = netip.AddrPortFrom(netip.AddrFrom4([4]byte{224, 0, 0, 251}), mdnsPort)
	mdnsGroup6 = netip.AddrPortFrom(netip.MustParseAddr("ff02::fb"), mdnsPort)
)

// mdnsConn is the packet seam of the responder and browser: one socket of
// one address family, joined to the mDNS group on some interfaces. Tests may
// put an in-memory network in its place.
type mdnsConn interface {
	// read returns the next packet with the index of the interface it came
	// in on (0 if unknown) and its source.
	read(b []byte) (n, ifIndex int, src netip.AddrPort, err error)
	// write sends b to dst out of the interface ifIndex.
	write(b []byte, ifIndex int, dst netip.AddrPort) error
	// v6 tells the family.
	v6() bool
	Close() error
}

// mdnsIface is an interface the registry speaks on, with its addresses as
// last read.
type mdnsIface struct {
	index    int
	name     string
	loopback bool
	v4, v6   bool // joined to the group of that family
	addrs    []netip.Addr
}

// mdnsInterfaces returns the interfaces to use: those named, or every up,
// multicast-capable one.
func mdnsInterfaces(names []string) ([]net.Interface, error) {
	if len(names) > 0 {
		out := make([]net.Interface, 0, len(names))
		for _, n := range names {
			ifi, err := net.InterfaceByName(n)
			if err != nil {
				return nil, fmt.Errorf("micro: mdns: interface %q: %w", n, err)
			}
			out = append(out, *ifi)
		}
		return out, nil
	}
	all, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("micro: mdns: listing interfaces: %w", err)
	}
	var out []net.Interface
	for _, ifi := range all {
		if ifi.Flags&net.FlagUp != 0 && ifi.Flags&net.FlagMulticast != 0 {
			out = append(out, ifi)
		}
	}
	return out, nil
}

// mdnsIfaceAddrs reads the unicast addresses of an interface.
func mdnsIfaceAddrs(ifi *net.Interface) []netip.Addr {
	as, err := ifi.Addrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range as {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.Is6() && ip.IsLinkLocalUnicast() {
			ip = ip.WithZone(ifi.Name)
		}
		out = append(out, ip)
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out
}

// mdnsOpen binds port 5353 for each family asked for and joins the group on
// each interface that has an address of that family. It returns the
// sockets and the interfaces joined.
func mdnsOpen(ifis []net.Interface, want4, want6 bool) ([]mdnsConn, map[int]*mdnsIface, error) {
	ifaces := make(map[int]*mdnsIface)
	for i := range ifis {
		ifi := &ifis[i]
		ifaces[ifi.Index] = &mdnsIface{index: ifi.Index, name: ifi.Name,
			loopback: ifi.Flags&net.FlagLoopback != 0, addrs: mdnsIfaceAddrs(ifi)}
	}
	lc := net.ListenConfig{Control: mdnsReuse}
	var conns []mdnsConn
	var errs []error
	for _, v6 := range []bool{false, true} {
		if v6 && !want6 || !v6 && !want4 {
			continue
		}
		c, err := mdnsOpenFamily(lc, ifis, ifaces, v6)
		if err != nil {
			errs = append(errs, err)
		} else if c != nil {
			conns = append(conns, c)
		}
	}
	for i, ifc := range ifaces {
		if !ifc.v4 && !ifc.v6 {
			delete(ifaces, i)
		}
	}
	if len(conns) == 0 {
		errs = append(errs, errors.New("no up, multicast-capable interface with an address of the family asked for"))
		return nil, nil, fmt.Errorf("micro: mdns: %w", errors.Join(errs...))
	}
	return conns, ifaces, nil
}

func mdnsHas(addrs []netip.Addr, v6 bool) bool {
	for _, a := range addrs {
		if a.Is6() == v6 {
			return true
		}
	}
	return false
}

// mdnsFamily names a family's network and its wildcard address with port.
func mdnsFamily(v6 bool, port int) (network, addr string) {
	if v6 {
		return "udp6", fmt.Sprintf("[::]:%d", port)
	}
	return "udp4", fmt.Sprintf("0.0.0.0:%d", port)
}

// mdnsOpenFamily binds port 5353 for one family and joins the group on each
// interface with an address of that family; nil if it joined none.
func mdnsOpenFamily(lc net.ListenConfig, ifis []net.Interface, ifaces map[int]*mdnsIface, v6 bool) (mdnsConn, error) {
	network, addr := mdnsFamily(v6, mdnsPort)
	pc, err := lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return nil, fmt.Errorf("micro: mdns: listen %s: %w", network, err)
	}
	c, join, err := mdnsWrap(pc, v6, true)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("micro: mdns: %s socket options: %w", network, err)
	}
	joined := 0
	for i := range ifis {
		ifc := ifaces[ifis[i].Index]
		if !mdnsHas(ifc.addrs, v6) || join(&ifis[i]) != nil {
			continue
		}
		if v6 {
			ifc.v6 = true
		} else {
			ifc.v4 = true
		}
		joined++
	}
	if joined == 0 {
		pc.Close()
		return nil, nil
	}
	return c, nil
}

// mdnsOneShot opens a socket on an ordinary port from which Lookup asks as
// a one-shot querier (RFC 6762 §5.1): responders answer it at once, by
// unicast, with no delay and no rate limit, so a cold lookup takes one round
// trip.
func mdnsOneShot(v6 bool) (mdnsConn, error) {
	pc, err := net.ListenPacket(mdnsFamily(v6, 0))
	if err != nil {
		return nil, err
	}
	c, _, err := mdnsWrap(pc, v6, false)
	if err != nil {
		pc.Close()
		return nil, err
	}
	return c, nil
}

// mdnsSock is an mdnsConn over a UDP socket of one family, read and written
// through x/net's PacketConn of that family, for the interface of each
// packet.
type mdnsSock struct {
	pc   net.PacketConn
	is6  bool
	recv func(b []byte) (n, ifIndex int, src net.Addr, err error)
	send func(b []byte, ifIndex int, dst net.Addr) error
}

// mdnsWrap makes pc an mdnsConn and returns with it the function that
// joins the group on an interface. It sets what every mDNS socket needs:
// the interface of each packet reported, multicast TTL 255 as RFC 6762 §11
// asks, and loopback, so that other responders on this host hear us; and on
// the group's port (bound), the unicast TTL 255 too.
func mdnsWrap(pc net.PacketConn, v6, bound bool) (*mdnsSock, func(*net.Interface) error, error) {
	s := &mdnsSock{pc: pc, is6: v6}
	if v6 {
		p := ipv6.NewPacketConn(pc)
		err := errors.Join(p.SetControlMessage(ipv6.FlagInterface, true), p.SetMulticastHopLimit(255),
			p.SetMulticastLoopback(true))
		if bound {
			err = errors.Join(err, p.SetHopLimit(255))
		}
		s.recv = func(b []byte) (int, int, net.Addr, error) {
			n, cm, src, err := p.ReadFrom(b)
			if cm == nil {
				return n, 0, src, err
			}
			return n, cm.IfIndex, src, err
		}
		s.send = func(b []byte, ifIndex int, dst net.Addr) error {
			var cm *ipv6.ControlMessage
			if ifIndex > 0 {
				cm = &ipv6.ControlMessage{IfIndex: ifIndex}
			}
			_, err := p.WriteTo(b, cm, dst)
			return err
		}
		group := &net.UDPAddr{IP: mdnsGroup6.Addr().AsSlice()}
		return s, func(ifi *net.Interface) error { return p.JoinGroup(ifi, group) }, err
	}
	p := ipv4.NewPacketConn(pc)
	err := errors.Join(p.SetControlMessage(ipv4.FlagInterface, true), p.SetMulticastTTL(255),
		p.SetMulticastLoopback(true))
	if bound {
		err = errors.Join(err, p.SetTTL(255))
	}
	s.recv = func(b []byte) (int, int, net.Addr, error) {
		n, cm, src, err := p.ReadFrom(b)
		if cm == nil {
			return n, 0, src, err
		}
		return n, cm.IfIndex, src, err
	}
	s.send = func(b []byte, ifIndex int, dst net.Addr) error {
		var cm *ipv4.ControlMessage
		if ifIndex > 0 {
			cm = &ipv4.ControlMessage{IfIndex: ifIndex}
		}
		_, err := p.WriteTo(b, cm, dst)
		return err
	}
	group := &net.UDPAddr{IP: mdnsGroup4.Addr().AsSlice()}
	return s, func(ifi *net.Interface) error { return p.JoinGroup(ifi, group) }, err
}

func (c *mdnsSock) read(b []byte) (int, int, netip.AddrPort, error) {
	n, ifi, src, err := c.recv(b)
	if err != nil {
		return 0, 0, netip.AddrPort{}, err
	}
	ua, _ := src.(*net.UDPAddr)
	if ua == nil {
		return n, ifi, netip.AddrPort{}, nil
	}
	ap := ua.AddrPort()
	if !c.is6 {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return n, ifi, ap, nil
}

func (c *mdnsSock) write(b []byte, ifIndex int, dst netip.AddrPort) error {
	return c.send(b, ifIndex, net.UDPAddrFromAddrPort(dst))
}

func (c *mdnsSock) v6() bool     { return c.is6 }
func (c *mdnsSock) Close() error { return c.pc.Close() }
