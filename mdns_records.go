package micro

import (
	"encoding/binary"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/net/dns/dnsmessage"
)

// Names in the DNS-SD tree (RFC 6763): every node is an instance of
// _micro._tcp, and also of the subtype named for its service (§7.1), so a
// lookup for one service asks only that service's instances to answer.
const (
	mdnsServiceType = "_micro._tcp.local."
	mdnsMetaQuery   = "_services._dns-sd._udp.local."
	mdnsSubSuffix   = "._sub." + mdnsServiceType

	mdnsFlush     = 0x8000 // cache-flush bit of a record's class (RFC 6762 §10.2)
	mdnsQU        = 0x8000 // unicast-response bit of a question's class (§5.4)
	mdnsMaxPacket = 1400   // payload kept under an Ethernet MTU
	mdnsMaxTXT    = 1024   // all of a node's TXT strings together
	mdnsLegacyTTL = 10     // TTL cap in answers to legacy unicast queries (§6.7)
)

const (
	mdnsTypePTR  = dnsmessage.TypePTR
	mdnsTypeSRV  = dnsmessage.TypeSRV
	mdnsTypeTXT  = dnsmessage.TypeTXT
	mdnsTypeA    = dnsmessage.TypeA
	mdnsTypeAAAA = dnsmessage.TypeAAAA
	mdnsTypeANY  = dnsmessage.TypeALL
)

// mdnsLabel makes s one DNS label of at most max bytes. The text form that
// dnsmessage packs has no escapes, so a dot (common in service names) becomes
// a dash; the true names travel in TXT.
func mdnsLabel(s string, max int) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			c = '-'
		case c < 0x20 || c == 0x7f:
			continue
		}
		b = append(b, c)
	}
	for len(b) > max {
		_, size := utf8.DecodeLastRune(b)
		b = b[:len(b)-size]
	}
	if len(b) == 0 {
		return "node"
	}
	return string(b)
}

// mdnsHostLabel makes a host name label of letters, digits and dashes.
func mdnsHostLabel(s string, max int) string {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s) && len(b) < max; i++ {
		c := s[i]
		switch {
		case c >= 'A' && c <= 'Z':
			c += 'a' - 'A'
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		default:
			c = '-'
		}
		b = append(b, c)
	}
	out := strings.Trim(string(b), "-")
	if out == "" {
		return "host"
	}
	return out
}

// mdnsSubtype is the subtype name under which a service's instances answer.
func mdnsSubtype(service string) string {
	return "_" + mdnsLabel(strings.ToLower(service), 62) + mdnsSubSuffix
}

// mdnsName converts a name known to be short and canonical.
func mdnsName(s string) dnsmessage.Name {
	n, _ := dnsmessage.NewName(s)
	return n
}

func mdnsRes(name string, class dnsmessage.Class, ttl uint32, body dnsmessage.ResourceBody) dnsmessage.Resource {
	var t dnsmessage.Type
	switch body.(type) {
	case *dnsmessage.PTRResource:
		t = mdnsTypePTR
	case *dnsmessage.SRVResource:
		t = mdnsTypeSRV
	case *dnsmessage.TXTResource:
		t = mdnsTypeTXT
	case *dnsmessage.AResource:
		t = mdnsTypeA
	case *dnsmessage.AAAAResource:
		t = mdnsTypeAAAA
	}
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: mdnsName(name), Type: t, Class: class, TTL: ttl},
		Body:   body,
	}
}

// mdnsRData is a record's data in a canonical form, for comparing records
// (known answers, conflicts, self-recognition).
func mdnsRData(body dnsmessage.ResourceBody) string {
	switch b := body.(type) {
	case *dnsmessage.PTRResource:
		return strings.ToLower(b.PTR.String())
	case *dnsmessage.SRVResource:
		var p [6]byte
		binary.BigEndian.PutUint16(p[0:], b.Priority)
		binary.BigEndian.PutUint16(p[2:], b.Weight)
		binary.BigEndian.PutUint16(p[4:], b.Port)
		return string(p[:]) + strings.ToLower(b.Target.String())
	case *dnsmessage.TXTResource:
		var sb strings.Builder
		for _, s := range b.TXT {
			sb.WriteByte(byte(len(s)))
			sb.WriteString(s)
		}
		return sb.String()
	case *dnsmessage.AResource:
		return string(b.A[:])
	case *dnsmessage.AAAAResource:
		return string(b.AAAA[:])
	}
	return ""
}

// mdnsKey identifies a record by name, type and data.
func mdnsKey(r *dnsmessage.Resource) string {
	return strings.ToLower(r.Header.Name.String()) + "\x00" + r.Header.Type.String() + "\x00" + mdnsRData(r.Body)
}

// mdnsTXT encodes a node's TXT strings: txtvers, the service name and
// version, the node ID, then the node's metadata in key order. A metadata key
// that is reserved or starts with "_" is written with one more "_" in front.
func mdnsTXT(service, version, node string, md map[string]string) ([]string, error) {
	txt := []string{"txtvers=1", "name=" + service}
	if version != "" {
		txt = append(txt, "version="+version)
	}
	txt = append(txt, "node="+node)
	for _, k := range slices.Sorted(maps.Keys(md)) {
		ek := k
		if mdnsReservedKey(k) || strings.HasPrefix(k, "_") {
			ek = "_" + k
		}
		if ek == "" || strings.Contains(ek, "=") {
			return nil, Errorf(CodeInvalidArgument, "micro: mdns: metadata key %q cannot travel in a TXT record", k)
		}
		txt = append(txt, ek+"="+md[k])
	}
	total := 0
	for _, s := range txt {
		if len(s) > 255 {
			return nil, Errorf(CodeInvalidArgument,
				"micro: mdns: TXT string %.40q... is %d bytes, over the 255 a TXT string holds; keep names and metadata small (endpoints are fetched from the node)", s, len(s))
		}
		total += len(s) + 1
	}
	if total > mdnsMaxTXT {
		return nil, Errorf(CodeInvalidArgument,
			"micro: mdns: node %s has %d bytes of TXT, over %d; keep metadata small (endpoints are fetched from the node)", node, total, mdnsMaxTXT)
	}
	return txt, nil
}

func mdnsReservedKey(k string) bool {
	return k == "txtvers" || k == "name" || k == "version" || k == "node"
}

// mdnsParseTXT decodes what mdnsTXT wrote; ok is false if it names no
// service or node.
func mdnsParseTXT(txt []string) (service, version, node string, md map[string]string, ok bool) {
	for _, s := range txt {
		k, v, _ := strings.Cut(s, "=")
		switch {
		case k == "name":
			service = v
		case k == "version":
			version = v
		case k == "node":
			node = v
		case k == "txtvers" || k == "":
		default:
			if md == nil {
				md = make(map[string]string)
			}
			md[strings.TrimPrefix(k, "_")] = v
		}
	}
	return service, version, node, md, service != "" && node != ""
}

// mdnsEntry is one node this registry announces.
type mdnsEntry struct {
	key     string // service, version and node ID
	service string
	base    string // instance label before any rename
	label   string // instance label
	host    string // SRV target, a FQDN
	ownHost bool   // host is ours to answer A/AAAA for
	ip      netip.Addr
	wild4   bool // answer with the interface's IPv4 addresses
	wild6   bool // answer with the interface's IPv6 addresses
	port    uint16
	txt     []string
	ttl     uint32       // DNS TTL in seconds
	info    *ServiceInfo // the record as registered, with this node only
	expires time.Time    // when the registration lapses; zero never

	renames      int
	probes       int // probes left to send before announcing
	probeAt      time.Time
	announceAt   time.Time
	announceLeft int
	defendAt     time.Time            // last defence against a conflict
	past         map[string]time.Time // our own record data, recently sent
}

func (e *mdnsEntry) fqdn() string { return e.label + "." + mdnsServiceType }

// rename gives the entry its next name, "label (2)" and "host-2", after a
// conflict (RFC 6762 §9, RFC 6763 §4.3 style).
func (e *mdnsEntry) rename() {
	e.renames++
	n := e.renames + 1
	suffix := " (" + itoa(n) + ")"
	e.label = mdnsLabel(e.base, 63-len(suffix)) + suffix
	if e.ownHost {
		e.host = e.ownHostName()
	}
	e.past = nil
}

// ownHostName is the .local host name of an entry that answers for its
// own address, after its renames.
func (e *mdnsEntry) ownHostName() string {
	if e.renames == 0 {
		return mdnsHostLabel(e.base, 63) + ".local."
	}
	hs := "-" + itoa(e.renames+1)
	return mdnsHostLabel(e.base, 63-len(hs)) + hs + ".local."
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	return string(b[i:])
}

func (e *mdnsEntry) srvRR(ttl uint32, flush bool) dnsmessage.Resource {
	return mdnsRes(e.fqdn(), mdnsClass(flush), ttl,
		&dnsmessage.SRVResource{Port: e.port, Target: mdnsName(e.host)})
}

func (e *mdnsEntry) txtRR(ttl uint32, flush bool) dnsmessage.Resource {
	return mdnsRes(e.fqdn(), mdnsClass(flush), ttl, &dnsmessage.TXTResource{TXT: e.txt})
}

// instanceRRs returns the entry's SRV and TXT records, which say what the
// instance is.
func (e *mdnsEntry) instanceRRs() []dnsmessage.Resource {
	return []dnsmessage.Resource{e.srvRR(120, false), e.txtRR(120, false)}
}

func (e *mdnsEntry) ptrRRs(ttl uint32) []dnsmessage.Resource {
	return []dnsmessage.Resource{
		mdnsRes(mdnsServiceType, dnsmessage.ClassINET, ttl, &dnsmessage.PTRResource{PTR: mdnsName(e.fqdn())}),
		mdnsRes(mdnsSubtype(e.service), dnsmessage.ClassINET, ttl, &dnsmessage.PTRResource{PTR: mdnsName(e.fqdn())}),
	}
}

// addrs returns the addresses a client reaching the node through ifc should
// use: the registered one, or for a wildcard listener the interface's own.
// A loopback address is given only on a loopback interface.
func (e *mdnsEntry) addrs(ifc *mdnsIface) []netip.Addr {
	if !e.ownHost {
		return nil
	}
	if e.ip.IsValid() {
		if e.ip.IsLoopback() && !ifc.loopback {
			return nil
		}
		return []netip.Addr{e.ip}
	}
	var out []netip.Addr
	for _, a := range ifc.addrs {
		if (a.Is4() && e.wild4) || (a.Is6() && e.wild6) {
			out = append(out, a)
		}
	}
	return out
}

// reachable says whether the node can be offered on ifc at all.
func (e *mdnsEntry) reachable(ifc *mdnsIface) bool {
	return !e.ownHost || len(e.addrs(ifc)) > 0
}

func (e *mdnsEntry) addrRRs(ifc *mdnsIface, ttl uint32, flush bool, want dnsmessage.Type) []dnsmessage.Resource {
	var out []dnsmessage.Resource
	for _, a := range e.addrs(ifc) {
		switch {
		case a.Is4() && (want == mdnsTypeA || want == mdnsTypeANY):
			out = append(out, mdnsRes(e.host, mdnsClass(flush), ttl, &dnsmessage.AResource{A: a.As4()}))
		case a.Is6() && (want == mdnsTypeAAAA || want == mdnsTypeANY):
			out = append(out, mdnsRes(e.host, mdnsClass(flush), ttl, &dnsmessage.AAAAResource{AAAA: a.As16()}))
		}
	}
	return out
}

// records returns every record of the entry as offered on ifc, for an
// announcement or a goodbye (ttl 0).
func (e *mdnsEntry) records(ifc *mdnsIface, ttl uint32) []dnsmessage.Resource {
	out := e.ptrRRs(ttl)
	out = append(out, e.srvRR(ttl, true), e.txtRR(ttl, true))
	return append(out, e.addrRRs(ifc, ttl, true, mdnsTypeANY)...)
}

func mdnsClass(flush bool) dnsmessage.Class {
	if flush {
		return dnsmessage.ClassINET | mdnsFlush
	}
	return dnsmessage.ClassINET
}

// mdnsAnswer returns the records of entries that answer q on ifc, and the
// additional records that save the asker another query (RFC 6763 §12).
// Unique records carry the cache-flush bit unless legacy (a one-shot
// querier, RFC 6762 §6.7).
func mdnsAnswer(entries []*mdnsEntry, q dnsmessage.Question, ifc *mdnsIface, legacy bool) (ans, extra []dnsmessage.Resource) {
	class := q.Class &^ mdnsQU
	if class != dnsmessage.ClassINET && class != dnsmessage.ClassANY {
		return nil, nil
	}
	name := strings.ToLower(q.Name.String())
	flush := !legacy
	withSRV := func(e *mdnsEntry) {
		extra = append(extra, e.srvRR(e.ttl, flush), e.txtRR(e.ttl, flush))
		extra = append(extra, e.addrRRs(ifc, e.ttl, flush, mdnsTypeANY)...)
	}
	isPTR := q.Type == mdnsTypePTR || q.Type == mdnsTypeANY
	switch {
	case name == mdnsMetaQuery:
		if isPTR && len(entries) > 0 {
			ans = append(ans, mdnsRes(mdnsMetaQuery, dnsmessage.ClassINET, 4500,
				&dnsmessage.PTRResource{PTR: mdnsName(mdnsServiceType)}))
		}
	case name == mdnsServiceType:
		if isPTR {
			for _, e := range entries {
				if e.reachable(ifc) {
					ans = append(ans, e.ptrRRs(e.ttl)[0])
					withSRV(e)
				}
			}
		}
	case strings.HasSuffix(name, mdnsSubSuffix):
		if isPTR {
			for _, e := range entries {
				if e.reachable(ifc) && strings.EqualFold(mdnsSubtype(e.service), name) {
					ans = append(ans, e.ptrRRs(e.ttl)[1])
					withSRV(e)
				}
			}
		}
	default:
		for _, e := range entries {
			if !e.reachable(ifc) {
				continue
			}
			if strings.EqualFold(e.fqdn(), name) {
				if q.Type == mdnsTypeSRV || q.Type == mdnsTypeANY {
					ans = append(ans, e.srvRR(e.ttl, flush))
					extra = append(extra, e.addrRRs(ifc, e.ttl, flush, mdnsTypeANY)...)
				}
				if q.Type == mdnsTypeTXT || q.Type == mdnsTypeANY {
					ans = append(ans, e.txtRR(e.ttl, flush))
				}
			}
			if e.ownHost && strings.EqualFold(e.host, name) {
				ans = append(ans, e.addrRRs(ifc, e.ttl, flush, q.Type)...)
			}
		}
	}
	return ans, extra
}

// mdnsDedupe drops repeated records, and from extra those already answered.
func mdnsDedupe(ans, extra []dnsmessage.Resource) ([]dnsmessage.Resource, []dnsmessage.Resource) {
	seen := make(map[string]bool, len(ans)+len(extra))
	keep := func(in []dnsmessage.Resource) []dnsmessage.Resource {
		out := in[:0]
		for _, r := range in {
			k := mdnsKey(&r)
			if !seen[k] {
				seen[k] = true
				out = append(out, r)
			}
		}
		return out
	}
	ans = keep(ans)
	return ans, keep(extra)
}

// mdnsPack builds one or more packets holding the records, none over
// mdnsMaxPacket unless a single record is bigger.
func mdnsPack(h dnsmessage.Header, qs []dnsmessage.Question, ans, extra []dnsmessage.Resource) [][]byte {
	type rec struct {
		r     dnsmessage.Resource
		extra bool
	}
	all := make([]rec, 0, len(ans)+len(extra))
	for _, r := range ans {
		all = append(all, rec{r, false})
	}
	for _, r := range extra {
		all = append(all, rec{r, true})
	}
	var out [][]byte
	size := func(recs []rec) int {
		n := 12
		for _, q := range qs {
			n += int(q.Name.Length) + 6
		}
		for _, r := range recs {
			n += int(r.r.Header.Name.Length) + 12 + mdnsBodyLen(r.r.Body)
		}
		return n
	}
	flush := func(recs []rec) {
		m := dnsmessage.Message{Header: h, Questions: qs}
		for _, r := range recs {
			if r.extra {
				m.Additionals = append(m.Additionals, r.r)
			} else {
				m.Answers = append(m.Answers, r.r)
			}
		}
		if b, err := m.Pack(); err == nil {
			out = append(out, b)
		}
	}
	start := 0
	for i := range all {
		if i > start && size(all[start:i+1]) > mdnsMaxPacket {
			flush(all[start:i])
			start = i
		}
	}
	if start < len(all) || len(qs) > 0 {
		flush(all[start:])
	}
	return out
}

// mdnsBodyLen bounds a record body's packed size (names uncompressed).
func mdnsBodyLen(b dnsmessage.ResourceBody) int {
	switch b := b.(type) {
	case *dnsmessage.PTRResource:
		return int(b.PTR.Length) + 2
	case *dnsmessage.SRVResource:
		return int(b.Target.Length) + 8
	case *dnsmessage.TXTResource:
		n := 0
		for _, s := range b.TXT {
			n += len(s) + 1
		}
		return n
	case *dnsmessage.AResource:
		return 4
	case *dnsmessage.AAAAResource:
		return 16
	}
	return 64
}
