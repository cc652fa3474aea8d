package micro

import (
	"hash/fnv"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Bounds on what the browser keeps, so a hostile or broken peer cannot make
// it grow without limit: past them new records are ignored (and counted).
const (
	mdnsMaxInstances = 4096 // cached instances (SRV and TXT each)
	mdnsMaxAddrs     = 16   // addresses per host
)

// Each socket (IPv4, IPv6, the one-shot ones) is read by a goroutine of its
// own, so packets that came through different sockets can be handled in
// another order than they were sent: a responder's announcement sent on
// both families, then its goodbye sent on both, can be handled as
// announcement v4, goodbye v4, announcement v6, goodbye v6. Without care,
// the third packet brings the instance back for a moment. So for
// mdnsReorder after an instance's SRV or TXT record changes (a new value,
// or a goodbye), a packet carrying a value it had before is taken for a
// late copy and ignored if it came from a source (a socket, interface and
// sender's address; see mdnsSource) that has not yet delivered the current
// value. One source delivers in order: once it has delivered the current
// value, what follows from it is newer.
const (
	mdnsReorder = time.Second
	mdnsMaxWas  = 4 // values replaced within mdnsReorder kept per record
)

// mdnsCache holds the records the browser has heard for _micro._tcp
// instances, each until its TTL runs out (RFC 6762 §5.2, §10).
type mdnsCache struct {
	srv   map[string]*mdnsCached            // by instance name, lower case
	txt   map[string]*mdnsCached            // by instance name, lower case
	addr  map[string]map[string]*mdnsCached // by host name, then address and interface
	drops int                               // records ignored at the bounds
	next  time.Time                         // earliest expiry, refresh or end of a reorder window; zero if none

	sources map[mdnsSource]int // a bit number for each way packets come (see source)
}

// mdnsSource is one way packets come in: through one socket, on one
// interface, from one address. Packets that come one way come in the order
// they were sent.
type mdnsSource struct {
	reader  int
	ifIndex int
	addr    netip.Addr
}

// mdnsValue is what an SRV or TXT record says of an instance.
type mdnsValue struct {
	target string // SRV target, lower case
	port   uint16
	txt    []string
	gone   bool // a goodbye: no value
}

func (v *mdnsValue) equal(o *mdnsValue) bool {
	return v.gone == o.gone && v.target == o.target && v.port == o.port && slices.Equal(v.txt, o.txt)
}

// mdnsWas is a value an SRV or TXT record had until a change.
type mdnsWas struct {
	mdnsValue
	until time.Time // when a copy of it stops being taken for a late one
}

// mdnsCached is one cached record.
type mdnsCached struct {
	name string // owner as received
	mdnsValue
	ip       netip.Addr
	ifIndex  int
	ttl      uint32
	received time.Time
	expires  time.Time
	refresh  int // refresh queries sent at 80, 85, 90, 95 % of the TTL

	// SRV and TXT only, for the order across sockets (see mdnsReorder); a
	// goodbye is kept as a record that is gone until mdnsReorder after it.
	was  []mdnsWas // values replaced within mdnsReorder, oldest first
	seen uint64    // the sources (a bit each, see mdnsCache.source) that delivered the value since it changed
}

func newMDNSCache() *mdnsCache {
	return &mdnsCache{
		srv:  make(map[string]*mdnsCached),
		txt:  make(map[string]*mdnsCached),
		addr: make(map[string]map[string]*mdnsCached),
	}
}

// mdnsInstanceName reports whether name is an instance of _micro._tcp:
// exactly one label in front of the service type.
func mdnsInstanceName(name string) bool {
	if len(name) <= len(mdnsServiceType) || !strings.HasSuffix(name, mdnsServiceType) {
		return false
	}
	label := name[:len(name)-len(mdnsServiceType)-1]
	return name[len(label)] == '.' && !strings.Contains(label, ".")
}

// absorb caches the records of a response that came in on ifIndex from the
// source whose bit is from (see source); names and addresses are taken only
// for _micro._tcp instances and the hosts their SRV records name. Answers to
// a one-shot query (TTLs capped at 10 s) never shorten what a multicast
// announcement said. It reports
// whether anything changed, and whether the response told of any instance
// at all (heard), changed or not.
func (c *mdnsCache) absorb(m *dnsmessage.Message, ifIndex int, ifName string, from uint64, oneShot bool, now time.Time) (changed, heard bool) {
	rrs := slices.Concat(m.Answers, m.Additionals)
	for i := range rrs {
		r := &rrs[i]
		name := strings.ToLower(r.Header.Name.String())
		if set, v, ok := c.valueOf(r); ok && mdnsInstanceName(name) {
			heard = true
			if c.put(set, name, r, v, from, oneShot, now) {
				changed = true
			}
		}
	}
	// Addresses second: only for hosts some cached SRV names.
	hosts := make(map[string]bool)
	for _, s := range c.srv {
		if !s.gone {
			hosts[s.target] = true
		}
	}
	for i := range rrs {
		r := &rrs[i]
		var ip netip.Addr
		switch b := r.Body.(type) {
		case *dnsmessage.AResource:
			ip = netip.AddrFrom4(b.A)
		case *dnsmessage.AAAAResource:
			ip = netip.AddrFrom16(b.AAAA)
			if ip.IsLinkLocalUnicast() {
				ip = ip.WithZone(ifName) // reachable through the interface it came in on
			}
		default:
			continue
		}
		host := strings.ToLower(r.Header.Name.String())
		if !hosts[host] {
			continue
		}
		if c.putAddr(host, ip, ifIndex, r, oneShot, now) {
			changed = true
		}
	}
	return changed, heard
}

// source returns the bit of a way packets come in, for mdnsCached.seen:
// one each for the first 64, then shared (which only makes the order of
// those that share one less certain).
func (c *mdnsCache) source(reader, ifIndex int, addr netip.Addr) uint64 {
	k := mdnsSource{reader, ifIndex, addr.WithZone("")}
	n, ok := c.sources[k]
	if !ok {
		if c.sources == nil {
			c.sources = make(map[mdnsSource]int)
		}
		n = len(c.sources)
		if n >= 64 {
			h := fnv.New32a()
			h.Write(addr.AsSlice())
			n = int((h.Sum32() + uint32(reader) + uint32(ifIndex)) % 64)
		} else {
			c.sources[k] = n
		}
	}
	return 1 << n
}

// valueOf returns the map an SRV or TXT record goes in and its value; ok
// is false for any other type.
func (c *mdnsCache) valueOf(r *dnsmessage.Resource) (set map[string]*mdnsCached, v mdnsValue, ok bool) {
	switch b := r.Body.(type) {
	case *dnsmessage.SRVResource:
		return c.srv, mdnsValue{target: strings.ToLower(b.Target.String()), port: b.Port}, true
	case *dnsmessage.TXTResource:
		return c.txt, mdnsValue{txt: slices.Clone(b.TXT)}, true
	}
	return nil, v, false
}

// put caches an SRV or TXT record r of value v that came from the source
// whose bit is from, and reports whether the instance's value changed. A
// goodbye (TTL 0) takes the value away at once and leaves the record, gone,
// for mdnsReorder.
func (c *mdnsCache) put(m map[string]*mdnsCached, name string, r *dnsmessage.Resource, v mdnsValue, from uint64, oneShot bool, now time.Time) bool {
	if r.Header.TTL == 0 {
		v = mdnsValue{gone: true}
	}
	e := m[name]
	if e == nil {
		if v.gone {
			return false
		}
		if len(m) >= mdnsMaxInstances {
			c.drops++
			return false
		}
		e = &mdnsCached{name: r.Header.Name.String(), mdnsValue: v, seen: from}
		e.renew(r.Header.TTL, now)
		m[name] = e
		c.schedule(e)
		return true
	}
	e.was = slices.DeleteFunc(e.was, func(w mdnsWas) bool { return !now.Before(w.until) })
	had := slices.ContainsFunc(e.was, func(w mdnsWas) bool { return w.equal(&v) })
	if e.equal(&v) {
		if !had { // a value it also had before says nothing of the order
			e.seen |= from
		}
		if v.gone || oneShot && e.expires.After(now.Add(time.Duration(r.Header.TTL)*time.Second)) {
			return false
		}
		e.name = r.Header.Name.String()
		e.renew(r.Header.TTL, now)
		c.schedule(e)
		return false
	}
	if had && e.seen&from == 0 {
		return false // sent before the change, late through another way in
	}
	e.name = r.Header.Name.String()
	e.change(v, from, now)
	e.renew(r.Header.TTL, now)
	c.schedule(e)
	return true
}

// disown takes back the SRV and TXT records this host announced for an
// instance it deregisters or renames: a cached value equal to one of them
// goes, and copies of them still on their way back to us are ignored for
// mdnsReorder. A value another host gave the name stays.
func (c *mdnsCache) disown(rrs []dnsmessage.Resource, now time.Time) {
	for i := range rrs {
		r := &rrs[i]
		name := strings.ToLower(r.Header.Name.String())
		m, v, ok := c.valueOf(r)
		if !ok || !mdnsInstanceName(name) {
			continue
		}
		e := m[name]
		switch {
		case e == nil && len(m) >= mdnsMaxInstances:
			continue
		case e == nil:
			e = &mdnsCached{name: r.Header.Name.String(), mdnsValue: v}
			e.change(mdnsValue{gone: true}, 0, now)
			m[name] = e
		case e.equal(&v):
			e.change(mdnsValue{gone: true}, 0, now)
		default:
			e.remember(v, now)
			c.schedule(e)
			continue
		}
		e.renew(0, now)
		c.schedule(e)
	}
}

// change gives an SRV or TXT record a new value, delivered by the readers in
// seen, and remembers the one it replaces.
func (e *mdnsCached) change(v mdnsValue, seen uint64, now time.Time) {
	e.remember(e.mdnsValue, now)
	e.mdnsValue, e.seen = v, seen
}

// remember keeps a value the record no longer has for mdnsReorder.
func (e *mdnsCached) remember(v mdnsValue, now time.Time) {
	if len(e.was) == mdnsMaxWas {
		e.was = slices.Delete(e.was, 0, 1)
	}
	e.was = append(e.was, mdnsWas{v, now.Add(mdnsReorder)})
}

// renew starts a record's TTL again; a goodbye's runs for mdnsReorder.
func (e *mdnsCached) renew(ttl uint32, now time.Time) {
	e.ttl, e.received, e.refresh = ttl, now, 0
	e.expires = now.Add(time.Duration(ttl) * time.Second)
	if e.gone {
		e.expires = now.Add(mdnsReorder)
	}
}

func (c *mdnsCache) putAddr(host string, ip netip.Addr, ifIndex int, r *dnsmessage.Resource, oneShot bool, now time.Time) bool {
	set := c.addr[host]
	key := ip.String() + "%" + itoa(ifIndex)
	if r.Header.TTL == 0 {
		if set[key] != nil {
			delete(set, key)
			return true
		}
		return false
	}
	if set == nil {
		set = make(map[string]*mdnsCached)
		c.addr[host] = set
	}
	changed := set[key] == nil
	if r.Header.Class&mdnsFlush != 0 { // the sender's set is whole: flush the rest it replaces
		for k, e := range set {
			if k != key && e.ifIndex == ifIndex && e.ip.Is4() == ip.Is4() && now.Sub(e.received) > time.Second {
				delete(set, k)
				changed = true
			}
		}
	}
	if set[key] == nil && len(set) >= mdnsMaxAddrs {
		c.drops++
		return changed
	}
	e := &mdnsCached{name: r.Header.Name.String(), ip: ip, ifIndex: ifIndex, ttl: r.Header.TTL,
		received: now, expires: now.Add(time.Duration(r.Header.TTL) * time.Second)}
	if old := set[key]; old != nil && oneShot && old.expires.After(e.expires) {
		return changed
	}
	set[key] = e
	c.schedule(e)
	return changed
}

// refreshAt is when the record's next refresh query is due: 80, 85, 90
// and 95 % of its TTL (RFC 6762 §5.2), then its expiry.
func (e *mdnsCached) refreshAt() time.Time {
	if e.gone || e.refresh >= 4 {
		return e.expires
	}
	pct := 80 + 5*e.refresh
	return e.received.Add(time.Duration(e.ttl) * time.Second * time.Duration(pct) / 100)
}

func (c *mdnsCache) schedule(e *mdnsCached) {
	t := e.refreshAt()
	if len(e.was) > 0 { // the values it no longer has are let go in time
		t = minTime(t, e.was[0].until)
	}
	if c.next.IsZero() || t.Before(c.next) {
		c.next = t
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// sweep drops expired records and returns the instances whose records are
// due a refresh query. It reports whether anything was dropped.
func (c *mdnsCache) sweep(now time.Time) (refresh []string, changed bool) {
	if c.next.IsZero() || now.Before(c.next) {
		return nil, false
	}
	c.next = time.Time{}
	for _, m := range []map[string]*mdnsCached{c.srv, c.txt} {
		for name, e := range m {
			if !now.Before(e.expires) {
				delete(m, name)
				changed = changed || !e.gone
				continue
			}
			e.was = slices.DeleteFunc(e.was, func(w mdnsWas) bool { return !now.Before(w.until) })
			if !e.gone && !now.Before(e.refreshAt()) {
				e.refresh++
				if !slices.Contains(refresh, name) {
					refresh = append(refresh, name)
				}
			}
			c.schedule(e)
		}
	}
	for host, set := range c.addr {
		for k, e := range set {
			if !now.Before(e.expires) {
				delete(set, k)
				changed = true
				continue
			}
			c.schedule(e)
		}
		if len(set) == 0 {
			delete(c.addr, host)
		}
	}
	slices.Sort(refresh)
	return refresh, changed
}

// resolve returns the nodes the cache can describe completely: an SRV, a
// TXT naming a service and node, and for a .local. host an address.
func (c *mdnsCache) resolve() map[string]*ServiceInfo {
	out := make(map[string]*ServiceInfo, len(c.srv))
	for name, s := range c.srv {
		t := c.txt[name]
		if s.gone || t == nil || t.gone {
			continue
		}
		service, version, node, md, ok := mdnsParseTXT(t.txt)
		if !ok {
			continue
		}
		host := strings.TrimSuffix(s.target, ".")
		if strings.HasSuffix(s.target, ".local.") {
			ip, ok := mdnsPick(c.addr[s.target])
			if !ok {
				continue
			}
			host = ip.String()
		}
		out[name] = &ServiceInfo{Name: service, Version: version, Nodes: []*Node{{
			ID: node, Address: net.JoinHostPort(host, itoa(int(s.port))), Metadata: md,
		}}}
	}
	return out
}

// mdnsPick chooses one address of a host: IPv4 before IPv6, global before
// link-local, then the smallest, so the choice is stable.
func mdnsPick(set map[string]*mdnsCached) (netip.Addr, bool) {
	var best netip.Addr
	rank := func(a netip.Addr) int {
		switch {
		case a.Is4() && !a.IsLoopback():
			return 0
		case a.Is4():
			return 1
		case !a.IsLinkLocalUnicast():
			return 2
		}
		return 3
	}
	for _, e := range set {
		a := e.ip
		if !best.IsValid() || rank(a) < rank(best) || (rank(a) == rank(best) && a.String() < best.String()) {
			best = a
		}
	}
	return best, best.IsValid()
}
