package mdnsbench

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/micro-kit/micro"
)

// Packet is one mDNS packet heard on an interface.
type Packet struct {
	Interface string
	V6        bool
	Src       netip.AddrPort
	Data      []byte // the DNS message
}

// Payload is the size of the DNS message (the UDP payload).
func (p Packet) Payload() int { return len(p.Data) }

// Wire is the size of the IP datagram: the payload with the UDP header and
// an option-less IPv4 or IPv6 header.
func (p Packet) Wire() int {
	if p.V6 {
		return len(p.Data) + 8 + 40
	}
	return len(p.Data) + 8 + 20
}

// Response reports whether the packet is a DNS response (QR set).
func (p Packet) Response() bool { return len(p.Data) >= 12 && p.Data[2]&0x80 != 0 }

// Counts returns the question, answer, authority and additional counts.
func (p Packet) Counts() (qd, an, ns, ar int) {
	if len(p.Data) < 12 {
		return
	}
	c := func(i int) int { return int(binary.BigEndian.Uint16(p.Data[i:])) }
	return c(4), c(6), c(8), c(10)
}

// Capture hears the mDNS packets sent out of some interfaces: one socket
// per interface and family, keeping only packets whose source is an address
// of the interface they arrived on (what this host sent there, looped
// back), so a packet sent out of one end of a veth pair is not counted again
// at the other.
type Capture struct {
	conns []*net.UDPConn
	wg    sync.WaitGroup

	mu      sync.Mutex
	packets []Packet
}

// Listen starts capturing on the interfaces and families of cfg.
func Listen(cfg Config) (*Capture, error) {
	ifis, err := configInterfaces(cfg)
	if err != nil {
		return nil, err
	}
	want4 := cfg.Network == "" || cfg.Network == "udp" || cfg.Network == "udp4"
	want6 := cfg.Network == "" || cfg.Network == "udp" || cfg.Network == "udp6"
	c := &Capture{}
	for _, ifi := range ifis {
		addrs := ifaceAddrs(&ifi)
		for _, v6 := range []bool{false, true} {
			if (v6 && !want6) || (!v6 && !want4) || !slices.ContainsFunc(addrs, func(a netip.Addr) bool { return a.Is6() == v6 }) {
				continue
			}
			uc, err := listenCapture(&ifi, v6)
			if err != nil {
				c.Close()
				return nil, err
			}
			c.conns = append(c.conns, uc)
			c.wg.Add(1)
			go c.read(uc, ifi.Name, v6, addrs)
		}
	}
	if len(c.conns) == 0 {
		return nil, fmt.Errorf("mdnsbench: no interface of %v to capture on", cfg.Interfaces)
	}
	return c, nil
}

func (c *Capture) read(uc *net.UDPConn, ifName string, v6 bool, own []netip.Addr) {
	defer c.wg.Done()
	buf := make([]byte, 9000)
	for {
		n, src, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // closed
		}
		a := src.Addr().Unmap()
		if !slices.ContainsFunc(own, func(o netip.Addr) bool { return o.WithZone("") == a.WithZone("") }) {
			continue
		}
		c.mu.Lock()
		c.packets = append(c.packets, Packet{Interface: ifName, V6: v6, Src: src, Data: slices.Clone(buf[:n])})
		c.mu.Unlock()
	}
}

// Take returns the packets heard since the last Take.
func (c *Capture) Take() []Packet {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.packets
	c.packets = nil
	return p
}

// Close stops capturing.
func (c *Capture) Close() error {
	for _, uc := range c.conns {
		uc.Close()
	}
	c.wg.Wait()
	return nil
}

func configInterfaces(cfg Config) ([]net.Interface, error) {
	if len(cfg.Interfaces) > 0 {
		var out []net.Interface
		for _, n := range cfg.Interfaces {
			ifi, err := net.InterfaceByName(n)
			if err != nil {
				return nil, err
			}
			out = append(out, *ifi)
		}
		return out, nil
	}
	all, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []net.Interface
	for _, ifi := range all {
		if ifi.Flags&net.FlagUp != 0 && ifi.Flags&net.FlagMulticast != 0 {
			out = append(out, ifi)
		}
	}
	return out, nil
}

func ifaceAddrs(ifi *net.Interface) []netip.Addr {
	as, _ := ifi.Addrs()
	var out []netip.Addr
	for _, a := range as {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

// WireResult is what one node's announcement and goodbye put on the wire.
type WireResult struct {
	Label     string
	Node      *micro.ServiceInfo
	Announce  []Packet // the first announcement, on every interface and family
	Goodbye   []Packet // the goodbye sent on Close
	Unrelated int      // other packets heard meanwhile (none expected)
}

// PerLink groups packets by interface and family ("lo/udp4"), in order.
func PerLink(ps []Packet) (keys []string, by map[string][]Packet) {
	by = make(map[string][]Packet)
	for _, p := range ps {
		k := p.Interface + "/udp4"
		if p.V6 {
			k = p.Interface + "/udp6"
		}
		if _, ok := by[k]; !ok {
			keys = append(keys, k)
		}
		by[k] = append(by[k], p)
	}
	slices.Sort(keys)
	return keys, by
}

// WireBytes registers node on a fresh registry of cfg, captures its first
// announcement (the window after Register: the second comes a second
// later), then closes the registry and captures the goodbye.
func WireBytes(ctx context.Context, cfg Config, label string, node *micro.ServiceInfo, window time.Duration) (WireResult, error) {
	res := WireResult{Label: label, Node: node}
	capt, err := Listen(cfg)
	if err != nil {
		return res, err
	}
	defer capt.Close()
	r, err := micro.NewMDNSRegistry(cfg.Options()...)
	if err != nil {
		return res, err
	}
	if err := r.Register(ctx, node, 0); err != nil {
		r.Close()
		return res, err
	}
	if err := sleep(ctx, window); err != nil {
		r.Close()
		return res, err
	}
	id := []byte(node.Nodes[0].ID)
	mine := func(ps []Packet) (out []Packet) {
		for _, p := range ps {
			if p.Response() && bytes.Contains(p.Data, id) {
				out = append(out, p)
			} else {
				res.Unrelated++
			}
		}
		return out
	}
	res.Announce = mine(capt.Take())
	r.Close()
	if err := sleep(ctx, window); err != nil {
		return res, err
	}
	res.Goodbye = mine(capt.Take())
	if len(res.Announce) == 0 {
		return res, fmt.Errorf("mdnsbench: heard no announcement of %s", label)
	}
	return res, nil
}
