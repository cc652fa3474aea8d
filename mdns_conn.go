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
	if want4 {
		c, err := mdnsOpen4(lc, ifis, ifaces)
		if err != nil {
			errs = append(errs, err)
		} else if c != nil {
			conns = append(conns, c)
		}
	}
	if want6 {
		c, err := mdnsOpen6(lc, ifis, ifaces)
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

func mdnsOpen4(lc net.ListenConfig, ifis []net.Interface, ifaces map[int]*mdnsIface) (mdnsConn, error) {
	pc, err := lc.ListenPacket(context.Background(), "udp4", fmt.Sprintf("0.0.0.0:%d", mdnsPort))
	if err != nil {
		return nil, fmt.Errorf("micro: mdns: listen udp4: %w", err)
	}
	p := ipv4.NewPacketConn(pc)
	joined := 0
	for i := range ifis {
		ifc := ifaces[ifis[i].Index]
		if !mdnsHas(ifc.addrs, false) {
			continue
		}
		if p.JoinGroup(&ifis[i], &net.UDPAddr{IP: mdnsGroup4.Addr().AsSlice()}) == nil {
			ifc.v4 = true
			joined++
		}
	}
	if joined == 0 {
		pc.Close()
		return nil, nil
	}
	// The interface of each packet; TTL 255 as RFC 6762 §11 asks; loopback
	// so that other responders on this host hear us.
	if err := errors.Join(p.SetControlMessage(ipv4.FlagInterface, true), p.SetMulticastTTL(255),
		p.SetTTL(255), p.SetMulticastLoopback(true)); err != nil {
		pc.Close()
		return nil, fmt.Errorf("micro: mdns: udp4 socket options: %w", err)
	}
	return &mdnsConn4{pc: pc, p: p}, nil
}

func mdnsOpen6(lc net.ListenConfig, ifis []net.Interface, ifaces map[int]*mdnsIface) (mdnsConn, error) {
	pc, err := lc.ListenPacket(context.Background(), "udp6", fmt.Sprintf("[::]:%d", mdnsPort))
	if err != nil {
		return nil, fmt.Errorf("micro: mdns: listen udp6: %w", err)
	}
	p := ipv6.NewPacketConn(pc)
	joined := 0
	for i := range ifis {
		ifc := ifaces[ifis[i].Index]
		if !mdnsHas(ifc.addrs, true) {
			continue
		}
		if p.JoinGroup(&ifis[i], &net.UDPAddr{IP: mdnsGroup6.Addr().AsSlice()}) == nil {
			ifc.v6 = true
			joined++
		}
	}
	if joined == 0 {
		pc.Close()
		return nil, nil
	}
	if err := errors.Join(p.SetControlMessage(ipv6.FlagInterface, true), p.SetMulticastHopLimit(255),
		p.SetHopLimit(255), p.SetMulticastLoopback(true)); err != nil {
		pc.Close()
		return nil, fmt.Errorf("micro: mdns: udp6 socket options: %w", err)
	}
	return &mdnsConn6{pc: pc, p: p}, nil
}

// mdnsOneShot opens a socket on an ordinary port from which Lookup asks as
// a one-shot querier (RFC 6762 §5.1): responders answer it at once, by
// unicast, with no delay and no rate limit, so a cold lookup takes one round
// trip.
func mdnsOneShot(v6 bool) (mdnsConn, error) {
	if v6 {
		pc, err := net.ListenPacket("udp6", "[::]:0")
		if err != nil {
			return nil, err
		}
		p := ipv6.NewPacketConn(pc)
		if err := errors.Join(p.SetControlMessage(ipv6.FlagInterface, true), p.SetMulticastHopLimit(255),
			p.SetMulticastLoopback(true)); err != nil {
			pc.Close()
			return nil, err
		}
		return &mdnsConn6{pc: pc, p: p}, nil
	}
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		return nil, err
	}
	p := ipv4.NewPacketConn(pc)
	if err := errors.Join(p.SetControlMessage(ipv4.FlagInterface, true), p.SetMulticastTTL(255),
		p.SetMulticastLoopback(true)); err != nil {
		pc.Close()
		return nil, err
	}
	return &mdnsConn4{pc: pc, p: p}, nil
}

type mdnsConn4 struct {
	pc net.PacketConn
	p  *ipv4.PacketConn
}

func (c *mdnsConn4) read(b []byte) (int, int, netip.AddrPort, error) {
	n, cm, src, err := c.p.ReadFrom(b)
	if err != nil {
		return 0, 0, netip.AddrPort{}, err
	}
	ifi := 0
	if cm != nil {
		ifi = cm.IfIndex
	}
	ua, _ := src.(*net.UDPAddr)
	if ua == nil {
		return n, ifi, netip.AddrPort{}, nil
	}
	ap := ua.AddrPort()
	return n, ifi, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func (c *mdnsConn4) write(b []byte, ifIndex int, dst netip.AddrPort) error {
	var cm *ipv4.ControlMessage
	if ifIndex > 0 {
		cm = &ipv4.ControlMessage{IfIndex: ifIndex}
	}
	_, err := c.p.WriteTo(b, cm, net.UDPAddrFromAddrPort(dst))
	return err
}

func (c *mdnsConn4) v6() bool     { return false }
func (c *mdnsConn4) Close() error { return c.pc.Close() }

type mdnsConn6 struct {
	pc net.PacketConn
	p  *ipv6.PacketConn
}

func (c *mdnsConn6) read(b []byte) (int, int, netip.AddrPort, error) {
	n, cm, src, err := c.p.ReadFrom(b)
	if err != nil {
		return 0, 0, netip.AddrPort{}, err
	}
	ifi := 0
	if cm != nil {
		ifi = cm.IfIndex
	}
	ua, _ := src.(*net.UDPAddr)
	if ua == nil {
		return n, ifi, netip.AddrPort{}, nil
	}
	return n, ifi, ua.AddrPort(), nil
}

func (c *mdnsConn6) write(b []byte, ifIndex int, dst netip.AddrPort) error {
	var cm *ipv6.ControlMessage
	if ifIndex > 0 {
		cm = &ipv6.ControlMessage{IfIndex: ifIndex}
	}
	_, err := c.p.WriteTo(b, cm, net.UDPAddrFromAddrPort(dst))
	return err
}

func (c *mdnsConn6) v6() bool     { return true }
func (c *mdnsConn6) Close() error { return c.pc.Close() }
