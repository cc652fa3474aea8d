package micro

import (
	"context"
	"errors"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// MDNSRegistry is a [Registry] over multicast DNS (RFC 6762) with DNS-SD
// records (RFC 6763): it needs no server, and services on one link find each
// other with no configuration. It is the default registry of a [Service].
//
// Each registered node is announced as an instance of _micro._tcp.local.,
// and of the subtype named for its service (_greeter._sub._micro._tcp.local.),
// with SRV (host, port), TXT (txtvers, name, version, node and the node's
// metadata as key=value) and A/AAAA records. Endpoint lists do not travel in
// DNS: [Client.Describe] fetches them from the node. Standard tools see the
// instances (avahi-browse -r _micro._tcp, dns-sd -B _micro._tcp).
//
// As a responder it announces a node twice, a second apart, then again at
// half its TTL; answers queries (shared records after 20-120 ms, per RFC 6762
// §6), leaves out what the asker already knows, multicasts no record on an
// interface more than once a second, answers legacy one-shot queries by
// unicast, and sends goodbyes (TTL 0) on Deregister and Close. Names are
// unique per node (they carry the node ID); a conflict found on the wire is
// settled as RFC 6762 §8.2 settles simultaneous probes (the lexicographically
// later record keeps the name, the other becomes "name (2)"). By default a
// node is announced at once, without first probing for its name: the name
// holds 64 random bits from [Service], so probing would only add 750 ms to
// every start. [MDNSProbe] turns full probing on.
//
// As a browser it hears every _micro._tcp announcement on the link, caches
// records for their TTL (refreshing those in use at 80-95 % of it), and
// feeds Lookup, List and Watch. Lookup answers from the cache, or queries and
// returns as soon as the first node of the service is resolved; List asks
// and returns once the answers have gone quiet ([MDNSListSettle]).
//
// Sockets open on first use (Register, Lookup, List or Watch) on every up,
// multicast-capable interface, or those of [MDNSInterfaces], for IPv4 and
// IPv6; a failure to open is returned by that call and retried by the next.
// Several processes on a host share port 5353 (SO_REUSEPORT). Close sends the
// goodbyes and stops everything it started. Safe for concurrent use.
type MDNSRegistry struct {
	opts mdnsOptions

	openMu  sync.Mutex // serialises opening and closing the sockets
	mu      sync.Mutex // guards everything below
	opened  bool
	closed  bool
	conns   []mdnsConn
	shots   []mdnsConn // one-shot query sockets, on ordinary ports
	ifaces  map[int]*mdnsIface
	ifRead  time.Time // when interface addresses were last read
	entries map[string]*mdnsEntry
	cache   *mdnsCache
	view    map[string]*ServiceInfo // instance name → the node it resolves to
	watch   map[*registryWatcher]struct{}
	waiters map[*mdnsWaiter]struct{}
	// listers are the Lists gathering answers, each told of every one heard.
	listers map[chan struct{}]struct{}
	asks    map[string]*mdnsInterest // service name ("" for all) → its queries
	asked   map[string]time.Time     // when each service was last asked for
	pending map[mdnsPendKey]*mdnsPending
	sent    map[mdnsSentKey]time.Time // last multicast of a record per interface
	out     []mdnsOut
	stats   MDNSStats

	wake chan struct{}
	in   chan mdnsIn
	done chan struct{}
	wg   sync.WaitGroup
}

// MDNSStats counts what the registry dropped.
type MDNSStats struct {
	BadPackets  int // packets that did not parse
	Overruns    int // packets dropped because the registry fell behind
	CacheDrops  int // records ignored because the cache was at its bounds
	Conflicts   int // names given up after a conflict
	SendErrors  int // packets the network refused
	QueriesSent int
}

// MDNSOption configures an [MDNSRegistry].
type MDNSOption func(*mdnsOptions)

type mdnsOptions struct {
	interfaces []string
	v4, v6     bool
	probe      bool
	lookupWait time.Duration
	settle     time.Duration
	open       func() ([]mdnsConn, map[int]*mdnsIface, error) // test seam
}

// MDNSInterfaces limits the registry to the named interfaces (default: every
// up, multicast-capable interface).
func MDNSInterfaces(names ...string) MDNSOption {
	return func(o *mdnsOptions) { o.interfaces = names }
}

// MDNSNetwork chooses the address families: "udp" for IPv4 and IPv6 (the
// default), "udp4" or "udp6".
func MDNSNetwork(network string) MDNSOption {
	return func(o *mdnsOptions) {
		o.v4 = network == "udp" || network == "udp4"
		o.v6 = network == "udp" || network == "udp6"
	}
}

// MDNSProbe makes the registry probe for each node's name before announcing
// it, as RFC 6762 §8.1 describes (three queries 250 ms apart), renaming it on
// a conflict (default false: names carry the node ID and conflicts found
// later are still settled).
func MDNSProbe(on bool) MDNSOption {
	return func(o *mdnsOptions) { o.probe = on }
}

// MDNSLookupWait bounds how long Lookup waits for a service it has no
// record of, and List for a first answer from the link, when the context
// allows longer (default 1s). Answers arrive within about 150 ms on a link;
// a node that does not answer by then is taken to be absent.
func MDNSLookupWait(d time.Duration) MDNSOption {
	return func(o *mdnsOptions) { o.lookupWait = d }
}

// MDNSListSettle is how long List keeps gathering after the last answer it
// heard before it returns (default 50ms). Responders answer List's one-shot
// query at once, so on a wired link every node has answered within a few
// milliseconds of the first; raise it on links that deliver multicast late
// (Wi-Fi power saving holds it until the next beacon, ~100-300 ms). A node
// that answers later is missed by that List, not by the next one or by a
// Watch.
func MDNSListSettle(d time.Duration) MDNSOption {
	return func(o *mdnsOptions) { o.settle = d }
}

// NewMDNSRegistry returns an mDNS registry. It checks the options now and
// opens its sockets on first use.
func NewMDNSRegistry(opts ...MDNSOption) (*MDNSRegistry, error) {
	o := mdnsOptions{v4: true, v6: true, lookupWait: time.Second, settle: mdnsListSettle}
	for _, opt := range opts {
		opt(&o)
	}
	if !o.v4 && !o.v6 {
		return nil, errors.New("micro: mdns: network must be udp, udp4 or udp6")
	}
	for _, n := range o.interfaces {
		if _, err := net.InterfaceByName(n); err != nil {
			return nil, errors.New("micro: mdns: no interface " + n)
		}
	}
	if o.lookupWait <= 0 {
		o.lookupWait = time.Second
	}
	if o.settle <= 0 {
		o.settle = mdnsListSettle
	}
	return &MDNSRegistry{
		opts:    o,
		entries: make(map[string]*mdnsEntry),
		cache:   newMDNSCache(),
		view:    make(map[string]*ServiceInfo),
		watch:   make(map[*registryWatcher]struct{}),
		waiters: make(map[*mdnsWaiter]struct{}),
		listers: make(map[chan struct{}]struct{}),
		asks:    make(map[string]*mdnsInterest),
		asked:   make(map[string]time.Time),
		pending: make(map[mdnsPendKey]*mdnsPending),
		sent:    make(map[mdnsSentKey]time.Time),
		wake:    make(chan struct{}, 1),
		in:      make(chan mdnsIn, 256),
		done:    make(chan struct{}),
	}, nil
}

type mdnsIn struct {
	buf     []byte
	ifIndex int
	src     netip.AddrPort
	v6      bool
	oneShot bool // came to a one-shot query socket
	reader  int  // the socket's number: packets of one reader are in order
}

type mdnsOut struct {
	msg     []byte
	ifIndex int
	v6      bool
	dst     netip.AddrPort // zero: the group
	oneShot bool           // send from the one-shot query socket
}

type mdnsPendKey struct {
	ifIndex int
	v6      bool
}

type mdnsSentKey struct {
	rr      string
	ifIndex int
	v6      bool
}

// mdnsPending is a response being gathered for one interface and family.
type mdnsPending struct {
	at         time.Time
	ans, extra []dnsmessage.Resource
}

// mdnsInterest keeps queries going for a service while someone looks.
type mdnsInterest struct {
	refs     int
	next     time.Time
	interval time.Duration
	since    time.Time
}

type mdnsWaiter struct {
	service string
	ch      chan struct{}
}

// Stats returns the registry's counters.
func (r *MDNSRegistry) Stats() MDNSStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.CacheDrops = r.cache.drops
	return s
}

// open starts the sockets, readers and the loop once.
func (r *MDNSRegistry) open() error {
	r.openMu.Lock()
	defer r.openMu.Unlock()
	r.mu.Lock()
	opened, closed := r.opened, r.closed
	r.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if opened {
		return nil
	}
	var conns []mdnsConn
	var ifaces map[int]*mdnsIface
	var err error
	if r.opts.open != nil {
		conns, ifaces, err = r.opts.open()
	} else {
		var ifis []net.Interface
		if ifis, err = mdnsInterfaces(r.opts.interfaces); err == nil {
			conns, ifaces, err = mdnsOpen(ifis, r.opts.v4, r.opts.v6)
		}
	}
	if err != nil {
		return err
	}
	var shots []mdnsConn
	if r.opts.open == nil {
		for _, c := range conns {
			if shot, err := mdnsOneShot(c.v6()); err == nil {
				shots = append(shots, shot)
			}
		}
	}
	r.mu.Lock()
	r.conns, r.shots, r.ifaces, r.opened, r.ifRead = conns, shots, ifaces, true, time.Now()
	r.mu.Unlock()
	for i, c := range conns {
		r.wg.Add(1)
		go r.read(c, i, false)
	}
	for i, c := range shots {
		r.wg.Add(1)
		go r.read(c, len(conns)+i, true)
	}
	r.wg.Add(1)
	go r.loop()
	return nil
}

// read passes packets to the loop; when the loop is behind, packets are
// dropped (and counted) as the network itself would drop them.
func (r *MDNSRegistry) read(c mdnsConn, reader int, oneShot bool) {
	defer r.wg.Done()
	buf := make([]byte, 9000) // the largest mDNS packet (RFC 6762 §17)
	for {
		n, ifi, src, err := c.read(buf)
		if err != nil {
			select {
			case <-r.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // a transient error (ICMP, buffer); keep reading
		}
		p := mdnsIn{buf: slices.Clone(buf[:n]), ifIndex: ifi, src: src, v6: c.v6(), oneShot: oneShot, reader: reader}
		select {
		case r.in <- p:
		default:
			r.mu.Lock()
			r.stats.Overruns++
			r.mu.Unlock()
		}
	}
}

func (r *MDNSRegistry) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// loop runs the timers (announcements, probes, delayed answers, queries,
// expiry) and handles packets; it writes what they produce outside the lock.
func (r *MDNSRegistry) loop() {
	defer r.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		r.mu.Lock()
		next := r.tickLocked(now)
		out := r.out
		r.out = nil
		conns, shots := r.conns, r.shots
		r.mu.Unlock()
		r.write(conns, shots, out)

		d := time.Hour
		if !next.IsZero() {
			d = max(time.Until(next), 0)
		}
		timer.Reset(d)
		select {
		case <-r.done:
			return
		case p := <-r.in:
			r.mu.Lock()
			r.handleLocked(p, time.Now())
			r.mu.Unlock()
		case <-r.wake:
		case <-timer.C:
		}
	}
}

func (r *MDNSRegistry) write(conns, shots []mdnsConn, out []mdnsOut) {
	errs := 0
	for _, o := range out {
		cs := conns
		if o.oneShot {
			cs = shots
		}
		for _, c := range cs {
			if c.v6() != o.v6 {
				continue
			}
			dst := o.dst
			if !dst.IsValid() {
				dst = mdnsGroup4
				if o.v6 {
					dst = mdnsGroup6
				}
			}
			if c.write(o.msg, o.ifIndex, dst) != nil {
				errs++
			}
		}
	}
	if errs > 0 {
		r.mu.Lock()
		r.stats.SendErrors += errs
		r.mu.Unlock()
	}
}

// multicastLocked queues a message for the group on every family ifc joined.
func (r *MDNSRegistry) multicastLocked(ifc *mdnsIface, msgs [][]byte) {
	for _, m := range msgs {
		if ifc.v4 {
			r.out = append(r.out, mdnsOut{msg: m, ifIndex: ifc.index})
		}
		if ifc.v6 {
			r.out = append(r.out, mdnsOut{msg: m, ifIndex: ifc.index, v6: true})
		}
	}
}

// tickLocked does whatever is due and returns when next to look.
func (r *MDNSRegistry) tickLocked(now time.Time) time.Time {
	var next time.Time
	due := func(t time.Time) bool {
		if t.IsZero() {
			return false
		}
		if !now.Before(t) {
			return true
		}
		if next.IsZero() || t.Before(next) {
			next = t
		}
		return false
	}
	if now.Sub(r.ifRead) > 30*time.Second && r.opts.open == nil {
		r.rereadAddrsLocked()
		r.ifRead = now
	}
	changed := false
	for key, e := range r.entries {
		if due(e.expires) { // not refreshed within its TTL
			r.withdrawLocked(key, e)
			changed = true
			continue
		}
		if e.probes > 0 && due(e.probeAt) {
			r.probeLocked(e, now)
			e.probes--
			e.probeAt = now.Add(250 * time.Millisecond)
			if e.probes == 0 { // no conflict in the last 250 ms: announce then
				e.announceAt, e.announceLeft = e.probeAt, 2
			}
			due(e.probeAt)
			continue
		}
		if e.probes == 0 && due(e.announceAt) {
			r.announceLocked(e, now)
			if e.announceLeft--; e.announceLeft > 0 {
				e.announceAt = now.Add(time.Second)
			} else { // again at half the TTL, before caches let it go
				e.announceAt, e.announceLeft = now.Add(time.Duration(e.ttl)*time.Second/2), 1
			}
			due(e.announceAt)
		}
	}
	for k, p := range r.pending {
		if due(p.at) {
			delete(r.pending, k)
			r.sendPendingLocked(k, p, now)
		}
	}
	for service, a := range r.asks {
		if last, ok := r.asked[service]; ok && a.next.Before(last.Add(time.Second)) {
			a.next = last.Add(time.Second) // never the same question twice a second
		}
		if due(a.next) {
			r.asked[service] = now
			r.queryLocked(service, now)
			a.next = now.Add(a.interval)
			a.interval = min(2*a.interval, time.Hour) // RFC 6762 §5.2
			due(a.next)
		}
	}
	refresh, dropped := r.cache.sweep(now)
	if len(refresh) > 0 && len(r.asks) > 0 {
		r.refreshLocked(refresh)
	}
	due(r.cache.next)
	if changed || dropped {
		r.publishLocked()
	}
	for k, t := range r.sent {
		if now.Sub(t) > 2*time.Second {
			delete(r.sent, k)
		}
	}
	for k, t := range r.asked {
		if now.Sub(t) > 2*time.Second {
			delete(r.asked, k)
		}
	}
	return next
}

func (r *MDNSRegistry) rereadAddrsLocked() {
	for _, ifc := range r.ifaces {
		if ifi, err := net.InterfaceByIndex(ifc.index); err == nil {
			ifc.addrs = mdnsIfaceAddrs(ifi)
		}
	}
}

func (r *MDNSRegistry) sortedIfacesLocked() []*mdnsIface {
	out := slices.Collect(maps.Values(r.ifaces))
	slices.SortFunc(out, func(a, b *mdnsIface) int { return a.index - b.index })
	return out
}

// announceLocked multicasts all of an entry's records on every interface
// (RFC 6762 §8.3), and remembers them as its own.
func (r *MDNSRegistry) announceLocked(e *mdnsEntry, now time.Time) {
	h := dnsmessage.Header{Response: true, Authoritative: true}
	for _, ifc := range r.sortedIfacesLocked() {
		if !e.reachable(ifc) {
			continue
		}
		recs := e.records(ifc, e.ttl)
		for i := range recs {
			r.markSentLocked(&recs[i], ifc, now)
		}
		r.multicastLocked(ifc, mdnsPack(h, nil, recs, nil))
	}
	r.rememberLocked(e, now)
}

// rememberLocked records the entry's current SRV and TXT data as its own,
// so that our own packets, heard late, are not taken for a conflict.
func (r *MDNSRegistry) rememberLocked(e *mdnsEntry, now time.Time) {
	if e.past == nil {
		e.past = make(map[string]time.Time)
	}
	srv, txt := e.srvRR(e.ttl, true), e.txtRR(e.ttl, true)
	e.past[mdnsRData(srv.Body)] = now
	e.past[mdnsRData(txt.Body)] = now
	for k, t := range e.past {
		if now.Sub(t) > 10*time.Second {
			delete(e.past, k)
		}
	}
}

func (r *MDNSRegistry) markSentLocked(rr *dnsmessage.Resource, ifc *mdnsIface, now time.Time) {
	k := mdnsKey(rr)
	if ifc.v4 {
		r.sent[mdnsSentKey{k, ifc.index, false}] = now
	}
	if ifc.v6 {
		r.sent[mdnsSentKey{k, ifc.index, true}] = now
	}
}

// goodbyeLocked multicasts the entry's records with TTL 0 (RFC 6762 §10.1).
// replaceLocked makes e, a changed registration of old's node, take over
// old's names, and reports whether e must probe them: not when old's were
// announced, which makes them ours (RFC 6762 §8.4: a change is announced).
// A node that moves from its own address to a DNS name says goodbye to the
// address records it gave.
func (r *MDNSRegistry) replaceLocked(old, e *mdnsEntry) (probe bool) {
	r.retractLocked(old)
	e.label, e.renames = old.label, old.renames
	switch {
	case old.ownHost && e.ownHost:
		e.host = old.host
	case e.ownHost:
		e.host = e.ownHostName()
	case old.ownHost && old.probes == 0:
		h := dnsmessage.Header{Response: true, Authoritative: true}
		for _, ifc := range r.sortedIfacesLocked() {
			if rs := old.addrRRs(ifc, 0, true, mdnsTypeANY); len(rs) > 0 {
				r.multicastLocked(ifc, mdnsPack(h, nil, rs, nil))
			}
		}
	}
	if old.probes == 0 {
		e.past = old.past
		return false
	}
	return true
}

func (r *MDNSRegistry) goodbyeLocked(e *mdnsEntry) {
	if e.probes > 0 {
		return // never announced
	}
	h := dnsmessage.Header{Response: true, Authoritative: true}
	for _, ifc := range r.sortedIfacesLocked() {
		if e.reachable(ifc) {
			r.multicastLocked(ifc, mdnsPack(h, nil, e.records(ifc, 0), nil))
		}
	}
}

// probeLocked asks whether anyone else holds the entry's name (RFC 6762
// §8.1): a query of type ANY for it, with our records in the authority
// section for tie-breaking.
func (r *MDNSRegistry) probeLocked(e *mdnsEntry, now time.Time) {
	q := dnsmessage.Question{Name: mdnsName(e.fqdn()), Type: mdnsTypeANY, Class: dnsmessage.ClassINET | mdnsQU}
	m := dnsmessage.Message{Questions: []dnsmessage.Question{q},
		Authorities: []dnsmessage.Resource{e.srvRR(e.ttl, false), e.txtRR(e.ttl, false)}}
	b, err := m.Pack()
	if err != nil {
		return
	}
	for _, ifc := range r.sortedIfacesLocked() {
		if e.reachable(ifc) {
			r.multicastLocked(ifc, [][]byte{b})
		}
	}
	r.rememberLocked(e, now)
}

// queryLocked asks for the instances of a service ("" for all), listing
// the answers already cached with over half their TTL left (RFC 6762 §7.1).
func (r *MDNSRegistry) queryLocked(service string, now time.Time) {
	owner := mdnsServiceType
	if service != "" {
		owner = mdnsSubtype(service)
	}
	q := dnsmessage.Question{Name: mdnsName(owner), Type: mdnsTypePTR, Class: dnsmessage.ClassINET}
	var known []dnsmessage.Resource
	for inst, s := range r.cache.srv {
		if s.gone {
			continue
		}
		if service != "" {
			if t := r.cache.txt[inst]; t == nil || t.gone {
				continue
			} else if name, _, _, _, _ := mdnsParseTXT(t.txt); name != service {
				continue
			}
		}
		left := s.expires.Sub(now)
		if left > time.Duration(s.ttl)*time.Second/2 {
			known = append(known, mdnsRes(owner, dnsmessage.ClassINET, uint32(left/time.Second),
				&dnsmessage.PTRResource{PTR: mdnsName(s.name)}))
		}
	}
	r.sendQueryLocked([]dnsmessage.Question{q}, known)
}

// oneShotLocked asks for a service ("" for all) from the one-shot sockets,
// so that responders answer at once by unicast (RFC 6762 §6.7), and those
// that only ever answer by unicast are heard whichever process on this host
// holds port 5353.
func (r *MDNSRegistry) oneShotLocked(service string) {
	if len(r.shots) == 0 {
		return
	}
	owner := mdnsServiceType
	if service != "" {
		owner = mdnsSubtype(service)
	}
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: uint16(rand.Uint32())},
		Questions: []dnsmessage.Question{{Name: mdnsName(owner), Type: mdnsTypePTR, Class: dnsmessage.ClassINET}}}
	b, err := m.Pack()
	if err != nil {
		return
	}
	for _, ifc := range r.sortedIfacesLocked() {
		if ifc.v4 {
			r.out = append(r.out, mdnsOut{msg: b, ifIndex: ifc.index, oneShot: true})
		}
		if ifc.v6 {
			r.out = append(r.out, mdnsOut{msg: b, ifIndex: ifc.index, v6: true, oneShot: true})
		}
	}
}

// refreshLocked asks again for cached instances near their expiry.
func (r *MDNSRegistry) refreshLocked(instances []string) {
	var qs []dnsmessage.Question
	for _, inst := range instances {
		n, err := dnsmessage.NewName(inst)
		if err != nil {
			continue
		}
		qs = append(qs, dnsmessage.Question{Name: n, Type: mdnsTypeSRV, Class: dnsmessage.ClassINET},
			dnsmessage.Question{Name: n, Type: mdnsTypeTXT, Class: dnsmessage.ClassINET})
		if len(qs) >= 40 {
			r.sendQueryLocked(qs, nil)
			qs = nil
		}
	}
	if len(qs) > 0 {
		r.sendQueryLocked(qs, nil)
	}
}

// sendQueryLocked multicasts a query on every interface, its known answers
// spread over packets marked truncated (TC) if they do not fit in one.
func (r *MDNSRegistry) sendQueryLocked(qs []dnsmessage.Question, known []dnsmessage.Resource) {
	var msgs [][]byte
	for len(msgs) == 0 || len(known) > 0 {
		n := len(known)
		var b []byte
		for {
			m := dnsmessage.Message{Questions: qs, Answers: known[:n]}
			var err error
			if b, err = m.Pack(); err == nil && (len(b) <= mdnsMaxPacket || n <= 1) {
				break
			}
			n /= 2
		}
		if n < len(known) {
			b[2] |= 0x02 // TC: more known answers follow
		}
		msgs = append(msgs, b)
		known = known[n:]
		qs = nil // continuation packets carry only known answers
		if n == 0 {
			break
		}
	}
	r.stats.QueriesSent++
	for _, ifc := range r.sortedIfacesLocked() {
		r.multicastLocked(ifc, msgs)
	}
}

// handleLocked deals with one packet.
func (r *MDNSRegistry) handleLocked(p mdnsIn, now time.Time) {
	var m dnsmessage.Message
	if err := m.Unpack(p.buf); err != nil {
		r.stats.BadPackets++
		return
	}
	ifc := r.ifaces[p.ifIndex]
	if ifc == nil && len(r.ifaces) == 1 { // a platform that does not say
		for _, only := range r.ifaces {
			ifc = only
		}
	}
	if ifc == nil || m.Header.OpCode != 0 {
		return
	}
	if m.Header.Response {
		if p.src.Port() != mdnsPort { // RFC 6762 §6: not from a responder
			return
		}
		if !p.oneShot {
			r.conflictsLocked(&m, now)
		}
		from := r.cache.source(p.reader, ifc.index, p.src.Addr())
		changed, heard := r.cache.absorb(&m, ifc.index, ifc.name, from, p.oneShot, now)
		if changed {
			r.publishLocked()
		}
		if heard {
			for ch := range r.listers {
				select {
				case ch <- struct{}{}:
				default: // it has one to take already
				}
			}
		}
		return
	}
	if p.oneShot {
		return
	}
	r.answerLocked(&m, p, ifc, now)
}

// answerLocked answers a query, at once or gathered into a delayed
// response (RFC 6762 §6).
func (r *MDNSRegistry) answerLocked(m *dnsmessage.Message, p mdnsIn, ifc *mdnsIface, now time.Time) {
	known := make(map[string]uint32, len(m.Answers))
	for i := range m.Answers {
		known[mdnsKey(&m.Answers[i])] = m.Answers[i].Header.TTL
	}
	// Known answers also trim a response still being gathered: they may be
	// the rest of a truncated query.
	if pd := r.pending[mdnsPendKey{ifc.index, p.v6}]; pd != nil && len(known) > 0 {
		pd.ans = mdnsDropKnown(pd.ans, known)
		pd.extra = mdnsDropKnown(pd.extra, known)
	}
	if len(m.Questions) == 0 {
		return
	}
	entries := r.liveEntriesLocked()
	probe := len(m.Authorities) > 0
	if probe {
		r.tieBreakLocked(m, now)
	}
	legacy := p.src.Port() != mdnsPort
	var ans, extra []dnsmessage.Resource
	for _, q := range m.Questions {
		a, x := mdnsAnswer(entries, q, ifc, legacy)
		ans, extra = append(ans, a...), append(extra, x...)
	}
	ans, extra = mdnsDedupe(ans, extra)
	ans, extra = mdnsDropKnown(ans, known), mdnsDropKnown(extra, known)
	if len(ans) == 0 {
		return
	}
	if legacy { // a one-shot querier: answer it alone, by unicast (§6.7)
		for _, rs := range [][]dnsmessage.Resource{ans, extra} {
			for i := range rs {
				rs[i].Header.TTL = min(rs[i].Header.TTL, mdnsLegacyTTL)
			}
		}
		h := dnsmessage.Header{ID: m.Header.ID, Response: true, Authoritative: true}
		for _, b := range mdnsPack(h, m.Questions, ans, extra) {
			r.out = append(r.out, mdnsOut{msg: b, ifIndex: ifc.index, v6: p.v6, dst: p.src})
		}
		return
	}
	// Multicast even when the asker wants unicast (QU): several processes
	// may share its port, and a unicast packet would reach only one of them.
	gap := time.Second
	if probe {
		gap = 250 * time.Millisecond
	}
	ans = r.rateLimitLocked(ans, ifc, p.v6, gap, now)
	extra = r.rateLimitLocked(extra, ifc, p.v6, gap, now)
	if len(ans) == 0 {
		return
	}
	at := now
	for _, a := range ans {
		if a.Header.Class&mdnsFlush == 0 { // a shared record: others may answer too
			at = now.Add(time.Duration(20+rand.IntN(100)) * time.Millisecond)
			break
		}
	}
	if m.Header.Truncated { // more known answers are coming
		at = now.Add(time.Duration(400+rand.IntN(100)) * time.Millisecond)
	}
	k := mdnsPendKey{ifc.index, p.v6}
	pd := r.pending[k]
	if pd == nil {
		pd = &mdnsPending{at: at}
		r.pending[k] = pd
	}
	pd.ans, pd.extra = append(pd.ans, ans...), append(pd.extra, extra...)
	if at.Before(pd.at) {
		pd.at = at
	}
}

func mdnsDropKnown(rs []dnsmessage.Resource, known map[string]uint32) []dnsmessage.Resource {
	if len(known) == 0 {
		return rs
	}
	out := rs[:0]
	for _, rr := range rs {
		if ttl, ok := known[mdnsKey(&rr)]; ok && ttl >= rr.Header.TTL/2 {
			continue
		}
		out = append(out, rr)
	}
	return out
}

// rateLimitLocked drops records multicast on this interface less than gap
// ago (RFC 6762 §6), so a peer that asks in a loop cannot make us storm.
func (r *MDNSRegistry) rateLimitLocked(rs []dnsmessage.Resource, ifc *mdnsIface, v6 bool, gap time.Duration, now time.Time) []dnsmessage.Resource {
	out := rs[:0]
	for _, rr := range rs {
		if t, ok := r.sent[mdnsSentKey{mdnsKey(&rr), ifc.index, v6}]; ok && now.Sub(t) < gap {
			continue
		}
		out = append(out, rr)
	}
	return out
}

func (r *MDNSRegistry) sendPendingLocked(k mdnsPendKey, pd *mdnsPending, now time.Time) {
	ifc := r.ifaces[k.ifIndex]
	if ifc == nil {
		return
	}
	ans, extra := mdnsDedupe(pd.ans, pd.extra)
	ans = r.rateLimitLocked(ans, ifc, k.v6, time.Second, now)
	if len(ans) == 0 {
		return
	}
	for _, rs := range [][]dnsmessage.Resource{ans, extra} {
		for i := range rs {
			sk := mdnsSentKey{mdnsKey(&rs[i]), ifc.index, k.v6}
			r.sent[sk] = now
		}
	}
	h := dnsmessage.Header{Response: true, Authoritative: true}
	for _, b := range mdnsPack(h, nil, ans, extra) {
		r.out = append(r.out, mdnsOut{msg: b, ifIndex: ifc.index, v6: k.v6})
	}
}

// liveEntriesLocked returns the entries that answer queries: announced or
// announcing, not still probing.
func (r *MDNSRegistry) liveEntriesLocked() []*mdnsEntry {
	out := make([]*mdnsEntry, 0, len(r.entries))
	for _, e := range r.entries {
		if e.probes == 0 {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b *mdnsEntry) int { return strings.Compare(a.key, b.key) })
	return out
}

// conflictsLocked looks in a response for another responder's SRV or TXT
// under one of our names. While probing, any such record means the name is
// taken. Afterwards the two records are compared as RFC 6762 §8.2 compares
// simultaneous probes: the later one keeps the name and is announced again;
// the earlier one's owner renames.
func (r *MDNSRegistry) conflictsLocked(m *dnsmessage.Message, now time.Time) {
	rrs := slices.Concat(m.Answers, m.Additionals)
	for _, e := range r.entries {
		name := e.fqdn()
		for i := range rrs {
			rr := &rrs[i]
			if rr.Header.TTL == 0 || !strings.EqualFold(rr.Header.Name.String(), name) {
				continue
			}
			var ours dnsmessage.Resource
			switch rr.Header.Type {
			case mdnsTypeSRV:
				ours = e.srvRR(e.ttl, true)
			case mdnsTypeTXT:
				ours = e.txtRR(e.ttl, true)
			default:
				continue
			}
			theirs := mdnsRData(rr.Body)
			if _, mine := e.past[theirs]; mine || theirs == mdnsRData(ours.Body) {
				continue
			}
			if e.probes > 0 || mdnsRData(ours.Body) < theirs {
				r.renameLocked(e, now)
			} else if now.Sub(e.defendAt) >= time.Second {
				e.defendAt = now
				e.announceAt, e.announceLeft = now, 1
			}
			break
		}
	}
}

// tieBreakLocked handles a probe for a name we are probing too (RFC 6762
// §8.2): if its records sort after ours, we wait a second and probe again.
func (r *MDNSRegistry) tieBreakLocked(m *dnsmessage.Message, now time.Time) {
	for _, e := range r.entries {
		if e.probes == 0 {
			continue
		}
		for i := range m.Authorities {
			rr := &m.Authorities[i]
			if rr.Header.Type != mdnsTypeSRV || !strings.EqualFold(rr.Header.Name.String(), e.fqdn()) {
				continue
			}
			theirs := mdnsRData(rr.Body)
			srv := e.srvRR(e.ttl, false)
			if _, mine := e.past[theirs]; mine || theirs == mdnsRData(srv.Body) {
				continue
			}
			if mdnsRData(srv.Body) < theirs {
				e.probes, e.probeAt = 3, now.Add(time.Second)
			}
		}
	}
}

// renameLocked gives up a name: the entry takes its next name and is probed
// or announced under it.
func (r *MDNSRegistry) renameLocked(e *mdnsEntry, now time.Time) {
	r.stats.Conflicts++
	r.cache.disown(e.instanceRRs(), now)
	r.retractLocked(e)
	e.rename()
	r.startLocked(e, r.opts.probe, now)
	r.publishLocked()
}

// startLocked schedules an entry's probes or announcements.
func (r *MDNSRegistry) startLocked(e *mdnsEntry, probe bool, now time.Time) {
	if probe {
		e.probes, e.probeAt = 3, now.Add(time.Duration(rand.IntN(250))*time.Millisecond)
		e.announceLeft = 0
		return
	}
	e.probes = 0
	e.announceAt, e.announceLeft = now, 2
}

// Register announces the nodes of s, or refreshes them. A node not
// refreshed within ttl is withdrawn with a goodbye; ttl also sets the DNS
// TTL (120 s when ttl is 0, which never expires).
func (r *MDNSRegistry) Register(ctx context.Context, s *ServiceInfo, ttl time.Duration) error {
	if err := registryValidate(s); err != nil {
		return err
	}
	now := time.Now()
	var entries []*mdnsEntry
	for _, n := range s.Nodes {
		e, err := mdnsNewEntry(s, n, ttl, now)
		if err != nil {
			return err
		}
		entries = append(entries, e)
	}
	if err := r.open(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	for _, e := range entries {
		old := r.entries[e.key]
		if old != nil && old.sameAs(e) {
			old.expires = e.expires
			continue
		}
		probe := r.opts.probe
		if old != nil {
			probe = r.replaceLocked(old, e) && probe
		}
		r.entries[e.key] = e
		r.startLocked(e, probe, now)
	}
	r.publishLocked()
	r.poke()
	return nil
}

// mdnsNewEntry builds the entry for one node of s.
func mdnsNewEntry(s *ServiceInfo, n *Node, ttl time.Duration, now time.Time) (*mdnsEntry, error) {
	host, portStr, err := net.SplitHostPort(n.Address)
	if err != nil {
		return nil, Errorf(CodeInvalidArgument, "micro: mdns: node %s address %q: %v", n.ID, n.Address, err)
	}
	port, ok := mdnsParsePort(portStr)
	if !ok {
		return nil, Errorf(CodeInvalidArgument, "micro: mdns: node %s address %q has no usable port", n.ID, n.Address)
	}
	txt, err := mdnsTXT(s.Name, s.Version, n.ID, n.Metadata)
	if err != nil {
		return nil, err
	}
	dnsTTL := uint32(120)
	if ttl > 0 {
		dnsTTL = uint32(max(ttl/time.Second, 1))
	}
	e := &mdnsEntry{
		key:     mdnsEntryKey(s, n),
		service: s.Name,
		base:    n.ID,
		label:   mdnsLabel(n.ID, 63),
		port:    port,
		txt:     txt,
		ttl:     min(dnsTTL, 4500),
		ownHost: true,
		host:    mdnsHostLabel(n.ID, 63) + ".local.",
	}
	if ttl > 0 {
		e.expires = now.Add(ttl)
	}
	info := s.Clone()
	info.Nodes = []*Node{n.clone()}
	e.info = info
	if ip, err := netip.ParseAddr(host); err == nil {
		ip = ip.Unmap()
		switch {
		case ip.IsUnspecified() && ip.Is4():
			e.wild4 = true
		case ip.IsUnspecified():
			e.wild4, e.wild6 = true, true // a dual-stack listener
		default:
			e.ip = ip
		}
		return e, nil
	}
	// A DNS name: the SRV names it, and it is not ours to answer for.
	if len(host) == 0 || len(host) > 250 || strings.Contains(host, "..") {
		return nil, Errorf(CodeInvalidArgument, "micro: mdns: node %s host %q is not a usable name", n.ID, host)
	}
	e.ownHost = false
	e.host = strings.TrimSuffix(host, ".") + "."
	if _, err := dnsmessage.NewName(e.host); err != nil {
		return nil, Errorf(CodeInvalidArgument, "micro: mdns: node %s host %q: %v", n.ID, host, err)
	}
	return e, nil
}

func mdnsParsePort(s string) (uint16, bool) {
	if s == "" || len(s) > 5 {
		return 0, false
	}
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return uint16(n), n > 0 && n < 65536
}

// mdnsEntryKey identifies a registered node: service, version and node ID.
func mdnsEntryKey(s *ServiceInfo, n *Node) string {
	return s.Name + "\x00" + s.Version + "\x00" + n.ID
}

// withdrawLocked says goodbye for an entry and forgets it, and our own
// copy of it in the cache, at once.
func (r *MDNSRegistry) withdrawLocked(key string, e *mdnsEntry) {
	r.goodbyeLocked(e)
	r.retractLocked(e)
	delete(r.entries, key)
	r.cache.disown(e.instanceRRs(), time.Now())
}

// retractLocked takes an entry's records out of the delayed answers not yet
// sent: sent after its goodbye, or after the announcement of what replaces
// it, they would undo it in every cache that hears them.
func (r *MDNSRegistry) retractLocked(e *mdnsEntry) {
	for k, pd := range r.pending {
		ifc := r.ifaces[k.ifIndex]
		if ifc == nil {
			continue
		}
		old := make(map[string]bool)
		for _, rr := range e.records(ifc, 0) {
			old[mdnsKey(&rr)] = true
		}
		for _, o := range r.entries { // records it shares with others stay (a host's address)
			if o != e {
				for _, rr := range o.records(ifc, 0) {
					delete(old, mdnsKey(&rr))
				}
			}
		}
		drop := func(rr dnsmessage.Resource) bool { return old[mdnsKey(&rr)] }
		pd.ans = slices.DeleteFunc(pd.ans, drop)
		pd.extra = slices.DeleteFunc(pd.extra, drop)
	}
}

func (e *mdnsEntry) sameAs(o *mdnsEntry) bool {
	return e.port == o.port && e.ip == o.ip && e.wild4 == o.wild4 && e.wild6 == o.wild6 &&
		e.ttl == o.ttl && e.ownHost == o.ownHost && (e.ownHost || e.host == o.host) &&
		slices.Equal(e.txt, o.txt) && reflect.DeepEqual(e.info, o.info)
}

// Deregister withdraws the nodes of s with goodbye packets.
func (r *MDNSRegistry) Deregister(ctx context.Context, s *ServiceInfo) error {
	if err := registryValidate(s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	for _, n := range s.Nodes {
		key := mdnsEntryKey(s, n)
		if e := r.entries[key]; e != nil {
			r.withdrawLocked(key, e)
		}
	}
	r.publishLocked()
	r.poke()
	return nil
}

// viewLocked is what the registry knows: its own nodes, and those the
// cache resolves, by instance name.
func (r *MDNSRegistry) viewLocked() map[string]*ServiceInfo {
	v := r.cache.resolve()
	for _, e := range r.entries {
		info := e.info.Clone()
		for _, n := range info.Nodes { // a wildcard listener is reached on loopback here
			if host, port, err := net.SplitHostPort(n.Address); err == nil {
				if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
					lo := "127.0.0.1"
					if ip.Is6() && !e.wild4 {
						lo = "::1"
					}
					n.Address = net.JoinHostPort(lo, port)
				}
			}
		}
		info.Endpoints = nil // fetched from the node, as for remote ones
		info.Metadata = nil
		v[strings.ToLower(e.fqdn())] = info
	}
	return v
}

// publishLocked compares the view with the last one, tells the watchers
// what changed and wakes the lookups it satisfies.
func (r *MDNSRegistry) publishLocked() {
	v := r.viewLocked()
	for _, inst := range slices.Sorted(maps.Keys(r.view)) {
		old := r.view[inst]
		if _, ok := v[inst]; !ok {
			r.notifyLocked(EventDelete, old)
		}
	}
	for _, inst := range slices.Sorted(maps.Keys(v)) {
		cur := v[inst]
		old, ok := r.view[inst]
		switch {
		case !ok:
			r.notifyLocked(EventCreate, cur)
		case old.Name != cur.Name || old.Version != cur.Version:
			r.notifyLocked(EventDelete, old)
			r.notifyLocked(EventCreate, cur)
		case !reflect.DeepEqual(old, cur):
			r.notifyLocked(EventUpdate, cur)
		}
	}
	r.view = v
	for w := range r.waiters {
		for _, s := range v {
			if s.Name == w.service {
				close(w.ch)
				delete(r.waiters, w)
				break
			}
		}
	}
}

func (r *MDNSRegistry) notifyLocked(t EventType, s *ServiceInfo) {
	for w := range r.watch {
		if w.service == "" || w.service == s.Name {
			w.push(&RegistryEvent{Type: t, Service: s.Clone()})
		}
	}
}

// lookupLocked gathers the view's nodes of a service by version.
func (r *MDNSRegistry) lookupLocked(name string) []*ServiceInfo {
	var insts []string // this service's only: a busy link has many others
	for inst, s := range r.view {
		if name == "" || s.Name == name {
			insts = append(insts, inst)
		}
	}
	slices.Sort(insts)
	byVersion := make(map[string]*ServiceInfo)
	for _, inst := range insts {
		s := r.view[inst]
		k := s.Name + "\x00" + s.Version
		if agg := byVersion[k]; agg != nil {
			agg.Nodes = append(agg.Nodes, s.Nodes[0].clone())
			continue
		}
		byVersion[k] = s.Clone()
	}
	out := slices.Collect(maps.Values(byVersion))
	slices.SortFunc(out, func(a, b *ServiceInfo) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.Version, b.Version)
	})
	for _, s := range out {
		slices.SortFunc(s.Nodes, func(a, b *Node) int { return strings.Compare(a.ID, b.ID) })
	}
	return out
}

// interestLocked adds (delta 1) or drops (delta -1) a reason to keep
// querying for a service. A new interest queries at once, unless the same
// question went out less than a second ago.
func (r *MDNSRegistry) interestLocked(service string, delta int, now time.Time) {
	a := r.asks[service]
	if a == nil {
		if delta < 0 {
			return
		}
		a = &mdnsInterest{next: now, interval: time.Second, since: now}
		r.asks[service] = a
	}
	a.refs += delta
	if a.refs <= 0 {
		delete(r.asks, service)
	}
}

// Lookup returns the nodes of a service by version, from the cache when it
// has them; otherwise it queries and returns as soon as the first node is
// resolved, or with an error wrapping ErrNotFound after the lookup wait
// ([MDNSLookupWait]) or when ctx ends.
func (r *MDNSRegistry) Lookup(ctx context.Context, name string) ([]*ServiceInfo, error) {
	if err := r.open(); err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	if out := r.lookupLocked(name); len(out) > 0 {
		r.mu.Unlock()
		return out, nil
	}
	w := &mdnsWaiter{service: name, ch: make(chan struct{})}
	r.waiters[w] = struct{}{}
	r.interestLocked(name, 1, time.Now())
	r.oneShotLocked(name)
	r.mu.Unlock()
	r.poke()

	t := time.NewTimer(r.opts.lookupWait)
	select {
	case <-w.ch:
	case <-ctx.Done():
	case <-t.C:
	case <-r.done:
	}
	t.Stop()
	r.mu.Lock()
	delete(r.waiters, w)
	r.interestLocked(name, -1, time.Now())
	out := r.lookupLocked(name)
	closed := r.closed
	r.mu.Unlock()
	switch {
	case len(out) > 0:
		return out, nil
	case closed:
		return nil, ErrClosed
	case ctx.Err() != nil:
		return nil, ctx.Err()
	}
	return nil, &Error{Code: CodeNotFound, Message: "service " + name + " not found", cause: ErrNotFound}
}

// List returns every service known on the link. Unless something has been
// browsing all services for a second already, it first asks (a multicast
// query, and a one-shot query that responders answer at once) and gathers
// answers until they have gone quiet for the settle time
// ([MDNSListSettle], 50ms) after the last one. If nothing answers, it
// gathers for the whole lookup wait ([MDNSLookupWait]), and it never gathers
// longer than that: a node that has not answered by then is absent. It
// stops early, with what it has, when ctx ends. So on a link where nodes
// answer within milliseconds a cold List takes one round trip plus the
// settle time, not the lookup wait.
func (r *MDNSRegistry) List(ctx context.Context) ([]*ServiceInfo, error) {
	if err := r.open(); err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	warm := r.asks[""] != nil && time.Since(r.asks[""].since) > time.Second
	var heard chan struct{}
	settle := r.opts.settle
	if !warm {
		heard = make(chan struct{}, 1)
		r.listers[heard] = struct{}{}
		r.interestLocked("", 1, time.Now())
		r.oneShotLocked("")
		if len(r.shots) == 0 { // only the multicast query is answered, 20-120 ms late (§6)
			settle += 100 * time.Millisecond
		}
	}
	r.mu.Unlock()
	if !warm {
		r.poke()
		r.gather(ctx, heard, settle)
		r.mu.Lock()
		delete(r.listers, heard)
		r.interestLocked("", -1, time.Now())
		r.mu.Unlock()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	return r.lookupLocked(""), nil
}

// mdnsListSettle is the default of [MDNSListSettle].
const mdnsListSettle = 50 * time.Millisecond

// gather waits until answers, told on heard, have gone quiet for settle
// after the last, or the lookup wait is over (answered or not), or ctx ends
// or the registry closes.
func (r *MDNSRegistry) gather(ctx context.Context, heard <-chan struct{}, settle time.Duration) {
	wait := time.NewTimer(r.opts.lookupWait)
	defer wait.Stop()
	quiet := time.NewTimer(time.Hour)
	quiet.Stop()
	defer quiet.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.done:
			return
		case <-wait.C:
			return
		case <-quiet.C:
			return
		case <-heard:
			quiet.Reset(settle)
		}
	}
}

// Watch reports nodes of the service ("" for all) appearing, changing and
// leaving (by goodbye or when their TTL runs out), and keeps querying for
// them while it runs. Events already known are not replayed: Lookup first.
func (r *MDNSRegistry) Watch(ctx context.Context, service string) (Watcher, error) {
	if err := r.open(); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	w := &registryWatcher{service: service, ready: make(chan struct{}, 1), done: make(chan struct{})}
	r.watch[w] = struct{}{}
	r.interestLocked(service, 1, time.Now())
	r.oneShotLocked(service)
	r.poke()
	w.stop = context.AfterFunc(ctx, w.Stop)
	w.remove = func() {
		r.mu.Lock()
		if _, ok := r.watch[w]; ok {
			delete(r.watch, w)
			r.interestLocked(service, -1, time.Now())
		}
		r.mu.Unlock()
	}
	return w, nil
}

// Close sends goodbyes for every node still registered, stops the watchers
// and every goroutine, and closes the sockets. It is idempotent.
func (r *MDNSRegistry) Close() error {
	r.openMu.Lock()
	defer r.openMu.Unlock()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	for _, e := range r.entries {
		r.goodbyeLocked(e)
	}
	out, conns, shots := r.out, r.conns, r.shots
	r.out = nil
	ws := slices.Collect(maps.Keys(r.watch))
	for w := range r.waiters {
		close(w.ch)
	}
	clear(r.waiters)
	r.mu.Unlock()
	r.write(conns, shots, out)
	close(r.done)
	var err error
	for _, c := range slices.Concat(conns, shots) {
		err = errors.Join(err, c.Close())
	}
	r.wg.Wait()
	for _, w := range ws {
		w.Stop()
	}
	return err
}
