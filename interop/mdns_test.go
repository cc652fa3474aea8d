package interop_test

import (
	"bytes"
	"context"
	"log"
	"net"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/mdns"
	"github.com/micro-kit/micro"
	"github.com/miekg/dns"
)

// These tests check micro's mDNS registry (RFC 6762/6763) against
// github.com/hashicorp/mdns, an independent Go implementation on
// github.com/miekg/dns: its browser lists our nodes with the right host,
// port and TXT, and our registry finds a node its responder serves.
//
// hashicorp/mdns asks as a one-shot querier (from an ephemeral port, RFC
// 6762 §5.1), so our responder answers it by unicast (§6.7). Its responder
// only answers (it never announces), and answers every query by unicast to
// the asker: micro's Lookup asks once as a one-shot querier too, which is
// what lets it hear that responder reliably.
//
// Both sides are kept to IPv4 on lo, inside the private network namespace;
// elsewhere the tests skip, so no packet ever reaches a real network.

// mdnsInterop returns the loopback interface, or skips the test outside the
// private network namespace.
func mdnsInterop(t *testing.T) *net.Interface {
	t.Helper()
	if !inNetns() {
		t.Skip("mDNS interop runs only in the private network namespace (root, unshare, ip), never on real interfaces")
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	return lo
}

// newInteropMDNS returns our registry on lo, IPv4 only, closed when the test
// ends.
func newInteropMDNS(t *testing.T) *micro.MDNSRegistry {
	t.Helper()
	r, err := micro.NewMDNSRegistry(micro.MDNSInterfaces("lo"), micro.MDNSNetwork("udp4"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing the mdns registry: %v", err)
		}
	})
	return r
}

// listenPort opens a TCP listener on loopback, standing for the service an
// instance advertises, and returns its port.
func listenPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.Addr().(*net.TCPAddr).Port
}

// libLog is a logger for hashicorp/mdns (which logs through the standard log
// package); what it said is shown if the test fails.
func libLog(t *testing.T) *log.Logger {
	w := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("hashicorp/mdns said:\n%s", w.String())
		}
	})
	return log.New(w, "", log.Lmicroseconds)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// libBrowse browses service (such as "_micro._tcp") in local. with
// hashicorp/mdns on lo over IPv4 and returns every instance it resolved.
// The library's browse runs for its whole timeout: it has no way to stop at
// the first answer. Entries are read only after the browse has returned, as
// the library keeps updating an entry after handing it out.
func libBrowse(t *testing.T, lo *net.Interface, service string) []*mdns.ServiceEntry {
	t.Helper()
	entries := make(chan *mdns.ServiceEntry, 64) // the library drops entries it cannot hand out at once
	err := mdns.QueryContext(context.Background(), &mdns.QueryParam{
		Service:     service,
		Domain:      "local",
		Timeout:     time.Second,
		Interface:   lo,
		Entries:     entries,
		DisableIPv6: true,
		Logger:      libLog(t),
	})
	if err != nil {
		t.Fatalf("hashicorp/mdns browsing %s: %v", service, err)
	}
	close(entries)
	var out []*mdns.ServiceEntry
	for e := range entries {
		out = append(out, e)
	}
	return out
}

func TestMDNSLibraryBrowsesOurNode(t *testing.T) {
	lo := mdnsInterop(t)
	ctx := context.Background()
	port := listenPort(t)
	r := newInteropMDNS(t)
	svc := &micro.ServiceInfo{Name: "interop-greeter", Version: "1.0.0", Nodes: []*micro.Node{{
		ID: "interop-node-1", Address: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Metadata: map[string]string{"zone": "a"},
	}}}
	if err := r.Register(ctx, svc, time.Minute); err != nil {
		t.Fatal(err)
	}
	const instance = "interop-node-1._micro._tcp.local."
	wantTXT := []string{"name=interop-greeter", "version=1.0.0", "node=interop-node-1", "zone=a"}

	// The service type, and the subtype our registry puts each service under
	// (RFC 6763 §7.1), which the library browses as any other type.
	for _, service := range []string{"_micro._tcp", "_interop-greeter._sub._micro._tcp"} {
		entries := libBrowse(t, lo, service)
		var e *mdns.ServiceEntry
		for _, x := range entries {
			if x.Name == instance {
				e = x
			}
		}
		if e == nil {
			var names []string
			for _, x := range entries {
				names = append(names, x.Name)
			}
			t.Errorf("browsing %s: no instance %s among %q", service, instance, names)
			continue
		}
		if e.Port != port {
			t.Errorf("browsing %s: port %d, want %d", service, e.Port, port)
		}
		if !e.AddrV4.Equal(net.IPv4(127, 0, 0, 1)) {
			t.Errorf("browsing %s: IPv4 address %v, want 127.0.0.1", service, e.AddrV4)
		}
		if e.Host != "interop-node-1.local." {
			t.Errorf("browsing %s: host %q, want interop-node-1.local.", service, e.Host)
		}
		for _, kv := range wantTXT {
			if !slices.Contains(e.InfoFields, kv) {
				t.Errorf("browsing %s: TXT %q lacks %q", service, e.InfoFields, kv)
			}
		}
	}

	// No check that the node is gone after Deregister: hashicorp/mdns
	// ignores TTLs, so a browse that overlaps our goodbye (TTL 0, RFC 6762
	// §10.1) takes the goodbye for the instance itself.
}

// subtypeZone is a hashicorp/mdns zone that also answers for one subtype of
// its service (RFC 6763 §7.1): the library has no subtype option of its own,
// and its Zone interface is how an application adds records.
type subtypeZone struct {
	*mdns.MDNSService
	subtype string // such as "_greeter._sub._micro._tcp.local."
}

func (z subtypeZone) Records(q dns.Question) []dns.RR {
	if q.Name != z.subtype {
		return z.MDNSService.Records(q)
	}
	// The service type's answer (PTR, SRV, TXT, A), its PTR owned by the
	// subtype instead. The library builds fresh records on each call.
	rrs := z.MDNSService.Records(dns.Question{Name: z.Service + "." + z.Domain, Qtype: q.Qtype, Qclass: q.Qclass})
	for _, rr := range rrs {
		if ptr, ok := rr.(*dns.PTR); ok {
			ptr.Hdr.Name = q.Name
		}
	}
	return rrs
}

// libServe serves one instance of _micro._tcp with hashicorp/mdns on lo,
// with the TXT our registry reads, under the subtype of service if subtype.
func libServe(t *testing.T, lo *net.Interface, service, node string, port int, subtype bool) {
	t.Helper()
	txt := []string{"txtvers=1", "name=" + service, "version=2.0.0", "node=" + node, "zone=b"}
	s, err := mdns.NewMDNSService(node, "_micro._tcp", "local.", node+"-host.local.", port,
		[]net.IP{net.IPv4(127, 0, 0, 1)}, txt)
	if err != nil {
		t.Fatal(err)
	}
	var zone mdns.Zone = s
	if subtype {
		zone = subtypeZone{MDNSService: s, subtype: "_" + service + "._sub._micro._tcp.local."}
	}
	srv, err := mdns.NewServer(&mdns.Config{Zone: zone, Iface: lo, Logger: libLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown() })
}

// checkPeer checks what our registry made of the library's instance.
func checkPeer(t *testing.T, got []*micro.ServiceInfo, service, node string, port int) {
	t.Helper()
	if len(got) != 1 || len(got[0].Nodes) != 1 {
		t.Fatalf("%s: got %d versions (%+v), want one with one node", service, len(got), got)
	}
	s, n := got[0], got[0].Nodes[0]
	if s.Name != service || s.Version != "2.0.0" {
		t.Errorf("service %q version %q, want %q 2.0.0", s.Name, s.Version, service)
	}
	if want := net.JoinHostPort("127.0.0.1", strconv.Itoa(port)); n.ID != node || n.Address != want {
		t.Errorf("node %q at %q, want %q at %q", n.ID, n.Address, node, want)
	}
	if n.Metadata["zone"] != "b" {
		t.Errorf("metadata %v, want zone=b", n.Metadata)
	}
}

func TestMDNSLookupFindsLibraryInstance(t *testing.T) {
	lo := mdnsInterop(t)
	port := listenPort(t)
	libServe(t, lo, "interop-peer", "peer-1", port, true)
	r := newInteropMDNS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := r.Lookup(ctx, "interop-peer")
	if err != nil {
		t.Fatalf("Lookup of the library's instance: %v", err)
	}
	checkPeer(t, got, "interop-peer", "peer-1", port)
}

// Without the subtype, the library's instance is not under the name Lookup
// asks for, but Watch and List browse all of _micro._tcp and find it. They
// ask by multicast from port 5353, and the library's responder answers by
// unicast to 127.0.0.1:5353, which the kernel gives to one of the sockets
// bound there: ours, on Linux, because it joins an SO_REUSEPORT group and
// was bound after the library's (the later IPv4 socket is looked at first).
// Once the watch has it, Lookup answers from the cache.
func TestMDNSWatchFindsLibraryInstanceWithoutSubtype(t *testing.T) {
	lo := mdnsInterop(t)
	port := listenPort(t)
	libServe(t, lo, "interop-plain", "plain-1", port, false)
	r := newInteropMDNS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := r.Watch(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	for {
		ev, err := w.Next()
		if err != nil {
			t.Fatalf("watching for the library's instance: %v", err)
		}
		if ev.Type == micro.EventCreate && ev.Service.Name == "interop-plain" {
			checkPeer(t, []*micro.ServiceInfo{ev.Service}, "interop-plain", "plain-1", port)
			break
		}
	}
	got, err := r.Lookup(ctx, "interop-plain")
	if err != nil {
		t.Fatalf("Lookup after the watch saw the instance: %v", err)
	}
	checkPeer(t, got, "interop-plain", "plain-1", port)
}
