package micro

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// testInNetns reports whether the suite runs in its private network
// namespace, where multicast cannot leave the machine.
func testInNetns() bool { return os.Getenv("MICRO_NETNS") == "1" }

// testMDNSOptions keeps mDNS on loopback outside the namespace (skipping if
// loopback cannot multicast there), so no test multicasts on a real network.
func testMDNSOptions(t *testing.T) []MDNSOption {
	t.Helper()
	if testInNetns() {
		return nil
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil || lo.Flags&net.FlagMulticast == 0 {
		t.Skip("mDNS tests need the private network namespace (root, unshare) or a multicast loopback")
	}
	return []MDNSOption{MDNSInterfaces("lo"), MDNSNetwork("udp4")}
}

func newTestMDNS(t *testing.T, opts ...MDNSOption) *MDNSRegistry {
	t.Helper()
	r, err := NewMDNSRegistry(append(testMDNSOptions(t), opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing mdns registry: %v", err)
		}
	})
	return r
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// testNext waits for the next watch event matching ok.
func testNext(t *testing.T, w Watcher, ok func(*RegistryEvent) bool) *RegistryEvent {
	t.Helper()
	for {
		ev, err := w.Next()
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		if ok(ev) {
			return ev
		}
	}
}

func testNode(name, id, addr string, md map[string]string) *ServiceInfo {
	return &ServiceInfo{Name: name, Version: "1.0.0", Nodes: []*Node{{ID: id, Address: addr, Metadata: md}}}
}

func TestMDNSLookupFromAnotherRegistry(t *testing.T) {
	checkGoroutines(t)
	a, b := newTestMDNS(t), newTestMDNS(t)
	ctx := testCtx(t)
	svc := testNode("mdns-lookup", "mdns-lookup-1", "127.0.0.1:4321", map[string]string{"zone": "a", "name": "x"})
	assertNoError(t, a.Register(ctx, svc, time.Minute))
	got, err := b.Lookup(ctx, "mdns-lookup")
	assertNoError(t, err)
	if len(got) != 1 || len(got[0].Nodes) != 1 {
		t.Fatalf("lookup: %+v", got)
	}
	n := got[0].Nodes[0]
	assertEqual(t, got[0].Version, "1.0.0")
	assertEqual(t, n.ID, "mdns-lookup-1")
	assertEqual(t, n.Address, "127.0.0.1:4321")
	assertEqual(t, n.Metadata["zone"], "a")
	assertEqual(t, n.Metadata["name"], "x") // a reserved TXT key survives
	// A second lookup is answered from the cache.
	again, err := b.Lookup(ctx, "mdns-lookup")
	assertNoError(t, err)
	assertEqual(t, again[0].Nodes[0].Address, n.Address)
	// The registering registry finds its own node without the network.
	own, err := a.Lookup(ctx, "mdns-lookup")
	assertNoError(t, err)
	assertEqual(t, own[0].Nodes[0].Address, "127.0.0.1:4321")
}

func TestMDNSLookupMissingService(t *testing.T) {
	checkGoroutines(t)
	r := newTestMDNS(t, MDNSLookupWait(200*time.Millisecond))
	_, err := r.Lookup(testCtx(t), "mdns-nobody")
	if !errors.Is(err, ErrNotFound) || CodeOf(err) != CodeNotFound {
		t.Fatalf("lookup of a missing service: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.Lookup(ctx, "mdns-nobody"); !errors.Is(err, context.Canceled) {
		t.Fatalf("lookup with an ended context: %v", err)
	}
}

func TestMDNSWatchCreateUpdateDelete(t *testing.T) {
	checkGoroutines(t)
	a, b := newTestMDNS(t), newTestMDNS(t)
	ctx := testCtx(t)
	w, err := b.Watch(ctx, "mdns-watch")
	assertNoError(t, err)
	defer w.Stop()
	svc := testNode("mdns-watch", "mdns-watch-1", "127.0.0.1:1111", nil)
	assertNoError(t, a.Register(ctx, svc, time.Minute))
	ev := testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventCreate)
	assertEqual(t, ev.Service.Nodes[0].Address, "127.0.0.1:1111")

	svc.Nodes[0].Metadata = map[string]string{"color": "blue"}
	assertNoError(t, a.Register(ctx, svc, time.Minute))
	ev = testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventUpdate)
	assertEqual(t, ev.Service.Nodes[0].Metadata["color"], "blue")

	// Every event is checked, in order: a late copy of an answer sent
	// before the update or the goodbye (b reads its IPv4, IPv6 and one-shot
	// sockets in goroutines of their own) must not bring the old record
	// back. A second node registered after the goodbye must be the next
	// thing b sees, not the first one again.
	assertNoError(t, a.Deregister(ctx, svc))
	ev = testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventDelete)
	assertEqual(t, ev.Service.Nodes[0].ID, "mdns-watch-1")
	assertNoError(t, a.Register(ctx, testNode("mdns-watch", "mdns-watch-2", "127.0.0.1:2222", nil), time.Minute))
	ev = testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventCreate)
	assertEqual(t, ev.Service.Nodes[0].ID, "mdns-watch-2")
}

func TestMDNSConflictRenames(t *testing.T) {
	checkGoroutines(t)
	a, b, c := newTestMDNS(t), newTestMDNS(t), newTestMDNS(t)
	ctx := testCtx(t)
	w, err := c.Watch(ctx, "mdns-dup")
	assertNoError(t, err)
	defer w.Stop()
	// Two registries claim one instance name with different ports.
	assertNoError(t, a.Register(ctx, testNode("mdns-dup", "dup", "127.0.0.1:1001", nil), time.Minute))
	assertNoError(t, b.Register(ctx, testNode("mdns-dup", "dup", "127.0.0.1:1002", nil), time.Minute))
	seen := map[string]bool{}
	for !seen["127.0.0.1:1001"] || !seen["127.0.0.1:1002"] {
		ev := testNext(t, w, func(ev *RegistryEvent) bool { return ev.Type != EventDelete })
		seen[ev.Service.Nodes[0].Address] = true
		got, _ := c.Lookup(ctx, "mdns-dup")
		if len(got) == 1 && len(got[0].Nodes) == 2 {
			seen[got[0].Nodes[0].Address], seen[got[0].Nodes[1].Address] = true, true
		}
	}
	// Both are resolvable at once, under two names: one of them renamed.
	for {
		got, err := c.Lookup(ctx, "mdns-dup")
		assertNoError(t, err)
		if len(got[0].Nodes) == 2 {
			break
		}
		testNext(t, w, func(*RegistryEvent) bool { return true })
	}
	conflicts := a.Stats().Conflicts + b.Stats().Conflicts
	if conflicts < 1 {
		t.Fatalf("no rename counted (a %+v, b %+v)", a.Stats(), b.Stats())
	}
	var names []string
	for _, r := range []*MDNSRegistry{a, b} {
		r.mu.Lock()
		for _, e := range r.entries {
			names = append(names, e.label)
		}
		r.mu.Unlock()
	}
	if names[0] == names[1] || (names[0] != "dup" && names[1] != "dup") {
		t.Fatalf("instance names after the conflict: %q", names)
	}
}

func TestMDNSFiftyServices(t *testing.T) {
	checkGoroutines(t)
	a, b := newTestMDNS(t), newTestMDNS(t)
	ctx := testCtx(t)
	w, err := b.Watch(ctx, "")
	assertNoError(t, err)
	defer w.Stop()
	for i := range 50 {
		name := fmt.Sprintf("mdns-fifty-%02d", i)
		assertNoError(t, a.Register(ctx, testNode(name, name+"-node", fmt.Sprintf("127.0.0.1:%d", 2000+i), nil), time.Minute))
	}
	found := map[string]bool{}
	for len(found) < 50 {
		ev := testNext(t, w, func(ev *RegistryEvent) bool {
			return ev.Type == EventCreate && strings.HasPrefix(ev.Service.Name, "mdns-fifty-")
		})
		found[ev.Service.Name] = true
	}
	all, err := b.List(ctx)
	assertNoError(t, err)
	n := 0
	for _, s := range all {
		if strings.HasPrefix(s.Name, "mdns-fifty-") {
			n++
		}
	}
	assertEqual(t, n, 50)
	got, err := b.Lookup(ctx, "mdns-fifty-49")
	assertNoError(t, err)
	assertEqual(t, got[0].Nodes[0].Address, "127.0.0.1:2049")
}

// TestMDNSIPv6 finds a node over IPv6 only, across the veth pair of the
// namespace, by the link-local address of the interface the query came in
// on, and connects to it.
func TestMDNSIPv6(t *testing.T) {
	if !testInNetns() {
		t.Skip("needs the private network namespace's veth pair")
	}
	checkGoroutines(t)
	ln, err := net.Listen("tcp6", "[::]:0")
	assertNoError(t, err)
	defer ln.Close()
	a := newTestMDNS(t, MDNSNetwork("udp6"), MDNSInterfaces("veth0"))
	b := newTestMDNS(t, MDNSNetwork("udp6"), MDNSInterfaces("veth1"))
	ctx := testCtx(t)
	port := ln.Addr().(*net.TCPAddr).Port
	assertNoError(t, a.Register(ctx, testNode("mdns-six", "six-1", fmt.Sprintf("[::]:%d", port), nil), time.Minute))
	got, err := b.Lookup(ctx, "mdns-six")
	assertNoError(t, err)
	addr := got[0].Nodes[0].Address
	ap, err := netip.ParseAddrPort(addr)
	assertNoError(t, err)
	if !ap.Addr().Is6() || !ap.Addr().IsLinkLocalUnicast() || ap.Addr().Zone() != "veth1" {
		t.Fatalf("resolved %s; want a link-local address through veth1", addr)
	}
	conn, err := net.Dial("tcp", addr)
	assertNoError(t, err)
	conn.Close()
}

// TestMDNSLegacyQuery asks as a one-shot resolver does (dig -p 5353), from
// an ordinary port, and gets a unicast answer with its ID and question.
func TestMDNSLegacyQuery(t *testing.T) {
	checkGoroutines(t)
	r := newTestMDNS(t)
	ctx := testCtx(t)
	assertNoError(t, r.Register(ctx, testNode("mdns-legacy", "legacy-1", "127.0.0.1:7070", nil), time.Minute))
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	assertNoError(t, err)
	defer c.Close()
	for _, q := range []struct {
		name string
		typ  dnsmessage.Type
	}{{mdnsSubtype("mdns-legacy"), mdnsTypePTR}, {mdnsMetaQuery, mdnsTypePTR}} {
		m := dnsmessage.Message{Header: dnsmessage.Header{ID: 0x4242},
			Questions: []dnsmessage.Question{{Name: mdnsName(q.name), Type: q.typ, Class: dnsmessage.ClassINET}}}
		b, err := m.Pack()
		assertNoError(t, err)
		var rsp dnsmessage.Message
		for attempt := 0; ; attempt++ {
			_, err = c.WriteToUDP(b, &net.UDPAddr{IP: net.IPv4(224, 0, 0, 251), Port: mdnsPort})
			assertNoError(t, err)
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 9000)
			n, err := c.Read(buf)
			if err != nil && attempt < 3 {
				continue // the registry may not have joined yet
			}
			assertNoError(t, err)
			assertNoError(t, rsp.Unpack(buf[:n]))
			break
		}
		assertEqual(t, rsp.Header.ID, uint16(0x4242))
		if len(rsp.Questions) != 1 || len(rsp.Answers) == 0 {
			t.Fatalf("answer to %s: %+v", q.name, rsp)
		}
		for _, rr := range append(rsp.Answers, rsp.Additionals...) {
			if rr.Header.TTL > mdnsLegacyTTL || rr.Header.Class&mdnsFlush != 0 {
				t.Fatalf("legacy answer record %v: TTL %d, class %#x", rr.Header.Name, rr.Header.TTL, rr.Header.Class)
			}
		}
	}
}

// The kill -9 test and the two-process tests run this test binary again as
// a node: MICRO_MDNS_CHILD=name,ttl registers a node and prints "ready";
// MICRO_MDNS_FIND=name also looks a service up and prints what it found.
func TestMDNSHelperProcess(t *testing.T) {
	spec := os.Getenv("MICRO_MDNS_CHILD")
	if spec == "" {
		t.Skip("run as a child by the mDNS process tests")
	}
	name, ttlStr, _ := strings.Cut(spec, ",")
	ttl, _ := time.ParseDuration(ttlStr)
	r, err := NewMDNSRegistry(testMDNSOptions(t)...)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	ctx := context.Background()
	if err := r.Register(ctx, testNode(name, name+"-child", "127.0.0.1:9999", nil), ttl); err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	if find := os.Getenv("MICRO_MDNS_FIND"); find != "" {
		lctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		w, _ := r.Watch(lctx, find)
		for {
			got, err := r.Lookup(lctx, find)
			if err == nil {
				fmt.Println("found", got[0].Nodes[0].ID)
				break
			}
			if lctx.Err() != nil {
				fmt.Println("error", err)
				break
			}
			w.Next() // something changed; look again
		}
		cancel()
	}
	bufio.NewReader(os.Stdin).ReadString('\n') // until the parent says so, or kills us
	r.Close()
	os.Exit(0)
}

// testChild starts this binary as an mDNS node and waits for it to be ready.
func testChild(t *testing.T, name, ttl, find string) (*exec.Cmd, *bufio.Scanner, func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestMDNSHelperProcess$")
	cmd.Env = append(os.Environ(), "MICRO_MDNS_CHILD="+name+","+ttl, "MICRO_MDNS_FIND="+find)
	stdin, err := cmd.StdinPipe()
	assertNoError(t, err)
	stdout, err := cmd.StdoutPipe()
	assertNoError(t, err)
	cmd.Stderr = os.Stderr
	assertNoError(t, cmd.Start())
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || sc.Text() != "ready" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child %s did not start: %q", name, sc.Text())
	}
	stop := func() {
		stdin.Close()
		cmd.Wait()
	}
	return cmd, sc, stop
}

func TestMDNSNodeKilledExpires(t *testing.T) {
	checkGoroutines(t)
	r := newTestMDNS(t)
	ctx := testCtx(t)
	w, err := r.Watch(ctx, "mdns-killed")
	assertNoError(t, err)
	defer w.Stop()
	cmd, _, stop := testChild(t, "mdns-killed", "2s", "")
	defer stop()
	ev := testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventCreate)
	assertNoError(t, cmd.Process.Signal(syscall.SIGKILL)) // no goodbye
	start := time.Now()
	ev = testNext(t, w, func(*RegistryEvent) bool { return true })
	assertEqual(t, ev.Type, EventDelete)
	t.Logf("killed node gone after %v (TTL 2s)", time.Since(start))
}

// Two services in separate processes find each other, whichever started
// first.
func TestMDNSTwoProcesses(t *testing.T) {
	for _, childFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("childFirst=%v", childFirst), func(t *testing.T) {
			checkGoroutines(t)
			ctx := testCtx(t)
			parent, child := fmt.Sprintf("mdns-parent-%v", childFirst), fmt.Sprintf("mdns-child-%v", childFirst)
			r := newTestMDNS(t)
			register := func() {
				assertNoError(t, r.Register(ctx, testNode(parent, parent+"-node", "127.0.0.1:8888", nil), time.Minute))
			}
			if !childFirst {
				register()
			}
			_, sc, stop := testChild(t, child, "1m", parent)
			defer stop()
			if childFirst {
				register()
			}
			got, err := r.Lookup(ctx, child)
			assertNoError(t, err)
			assertEqual(t, got[0].Nodes[0].ID, child+"-child")
			if !sc.Scan() || sc.Text() != "found "+parent+"-node" {
				t.Fatalf("child: %q", sc.Text())
			}
		})
	}
}

// testMDNSOffline is a registry with an interface but no sockets, for
// feeding packets straight to its handler.
func testMDNSOffline(t testing.TB) *MDNSRegistry {
	r, err := NewMDNSRegistry()
	if err != nil {
		t.Fatal(err)
	}
	r.ifaces = map[int]*mdnsIface{1: {index: 1, name: "test0", loopback: true, v4: true, v6: true,
		addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("fe80::1%test0")}}}
	now := time.Now()
	for _, info := range []*ServiceInfo{
		testNode("greeter", "greeter-1", "127.0.0.1:8080", map[string]string{"zone": "a"}),
		testNode("greeter", "greeter-2", "[::]:8081", nil),
		testNode("ext", "ext-1", "api.example.com:443", nil),
	} {
		e, err := mdnsNewEntry(info, info.Nodes[0], time.Minute, now)
		if err != nil {
			t.Fatal(err)
		}
		r.entries[e.key] = e
	}
	return r
}

// testMDNSSeeds are packets of every kind the registry itself sends.
func testMDNSSeeds(t testing.TB) [][]byte {
	r := testMDNSOffline(t)
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	for _, e := range r.entries {
		r.announceLocked(e, now)
		r.probeLocked(e, now)
	}
	r.queryLocked("", now)
	r.queryLocked("greeter", now)
	r.oneShotLocked("greeter")
	var seeds [][]byte
	for _, o := range r.out {
		seeds = append(seeds, o.msg)
	}
	return seeds
}

func FuzzMDNSPacket(f *testing.F) {
	for _, s := range testMDNSSeeds(f) {
		f.Add(s)
	}
	f.Add([]byte{})
	f.Add([]byte{0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xc0, 0x0c}) // a name pointing at itself
	f.Fuzz(func(t *testing.T, b []byte) {
		r := testMDNSOffline(t)
		r.mu.Lock()
		defer r.mu.Unlock()
		now := time.Now()
		for _, src := range []netip.AddrPort{
			netip.MustParseAddrPort("127.0.0.1:5353"), netip.MustParseAddrPort("127.0.0.1:40000"),
		} {
			r.handleLocked(mdnsIn{buf: b, ifIndex: 1, src: src}, now)
			r.handleLocked(mdnsIn{buf: b, ifIndex: 1, src: src, oneShot: true}, now)
		}
		r.tickLocked(now.Add(time.Second))
		for _, o := range r.out {
			var m dnsmessage.Message
			if err := m.Unpack(o.msg); err != nil {
				t.Fatalf("we sent a packet that does not parse: %v", err)
			}
		}
		if len(r.cache.srv) > mdnsMaxInstances || len(r.entries) != 3 {
			t.Fatalf("state out of bounds: %d cached, %d entries", len(r.cache.srv), len(r.entries))
		}
	})
}

func TestMDNSAnswerAndKnownAnswers(t *testing.T) {
	r := testMDNSOffline(t)
	entries := r.liveEntriesLocked()
	ifc := r.ifaces[1]
	q := func(name string, typ dnsmessage.Type) dnsmessage.Question {
		return dnsmessage.Question{Name: mdnsName(name), Type: typ, Class: dnsmessage.ClassINET}
	}
	ans, extra := mdnsAnswer(entries, q(mdnsSubtype("greeter"), mdnsTypePTR), ifc, false)
	assertEqual(t, len(ans), 2) // both greeter nodes, not ext
	if len(extra) < 6 {
		t.Fatalf("additional records: %d", len(extra))
	}
	ans, _ = mdnsAnswer(entries, q(mdnsServiceType, mdnsTypePTR), ifc, false)
	assertEqual(t, len(ans), 3)
	ans, _ = mdnsAnswer(entries, q(mdnsMetaQuery, mdnsTypePTR), ifc, false)
	assertEqual(t, len(ans), 1)
	// A wildcard node answers with the interface's addresses; a name is
	// given as the SRV target, with no address records of ours.
	ans, _ = mdnsAnswer(entries, q("greeter-2.local.", mdnsTypeANY), ifc, false)
	assertEqual(t, len(ans), 2)
	ans, _ = mdnsAnswer(entries, q("ext-1."+mdnsServiceType, mdnsTypeSRV), ifc, false)
	assertEqual(t, ans[0].Body.(*dnsmessage.SRVResource).Target.String(), "api.example.com.")
	// Records the asker knows with over half their TTL left are left out.
	ans, _ = mdnsAnswer(entries, q(mdnsSubtype("greeter"), mdnsTypePTR), ifc, false)
	known := map[string]uint32{mdnsKey(&ans[0]): ans[0].Header.TTL}
	assertEqual(t, len(mdnsDropKnown(ans, known)), 1)
	known[mdnsKey(&ans[0])] = ans[0].Header.TTL/2 - 1
	assertEqual(t, len(mdnsDropKnown(ans, known)), 2)
}

func TestMDNSTXT(t *testing.T) {
	txt, err := mdnsTXT("greeter", "1.0", "n1", map[string]string{"zone": "a", "node": "x", "_p": "y"})
	assertNoError(t, err)
	service, version, node, md, ok := mdnsParseTXT(txt)
	if !ok || service != "greeter" || version != "1.0" || node != "n1" ||
		md["zone"] != "a" || md["node"] != "x" || md["_p"] != "y" || len(md) != 3 {
		t.Fatalf("round trip: %q -> %v %v %v %v", txt, service, version, node, md)
	}
	if _, err := mdnsTXT("greeter", "", "n1", map[string]string{"big": strings.Repeat("x", 300)}); CodeOf(err) != CodeInvalidArgument {
		t.Fatalf("oversized TXT string: %v", err)
	}
	many := map[string]string{}
	for i := range 20 {
		many[fmt.Sprint("k", i)] = strings.Repeat("v", 100)
	}
	if _, err := mdnsTXT("greeter", "", "n1", many); err == nil || !strings.Contains(err.Error(), "bytes of TXT") {
		t.Fatalf("oversized TXT record: %v", err)
	}
	assertEqual(t, mdnsLabel("go.micro.srv.greeter", 63), "go-micro-srv-greeter")
	assertEqual(t, mdnsSubtype("Go.Greeter"), "_go-greeter._sub._micro._tcp.local.")
	assertEqual(t, mdnsHostLabel("Greeter_1.x", 63), "greeter-1-x")
}

// TestMDNSListReturnsOnceAnswered lists from a fresh registry whose lookup
// wait is a minute: List must return with the node once the link has
// answered and gone quiet, not wait out the lookup wait (the context's
// deadline is only the guard against that).
func TestMDNSListReturnsOnceAnswered(t *testing.T) {
	checkGoroutines(t)
	a := newTestMDNS(t)
	b := newTestMDNS(t, MDNSLookupWait(time.Minute))
	assertNoError(t, a.Register(testCtx(t), testNode("mdns-list", "mdns-list-1", "127.0.0.1:4322", nil), time.Minute))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	all, err := b.List(ctx)
	assertNoError(t, err)
	if ctx.Err() != nil {
		t.Fatal("List waited for the lookup wait after the link had answered")
	}
	found := false
	for _, s := range all {
		found = found || s.Name == "mdns-list"
	}
	if !found {
		t.Fatalf("List after the answers: %+v", all)
	}
}

// TestMDNSCacheOrderAcrossSockets feeds the cache packets as the readers of
// different sockets can hand them over: a copy sent before a change may be
// handled after it, through another socket (reader 0 is IPv4, 1 IPv6, 2 a
// one-shot socket). A late copy must not bring back what the change took
// away; a socket that has delivered the change is in order from then on.
func TestMDNSCacheOrderAcrossSockets(t *testing.T) {
	ifc := &mdnsIface{index: 1, name: "test0", v4: true, v6: true}
	entry := func(color, addr string) *mdnsEntry {
		info := testNode("order", "order-1", addr, map[string]string{"color": color})
		e, err := mdnsNewEntry(info, info.Nodes[0], time.Minute, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	red, blue := entry("red", "api.example.com:443"), entry("blue", "api.example.com:443")
	ours, theirs := entry("ours", "api.example.com:443"), entry("theirs", "api.example.com:444")
	instance := strings.ToLower(red.fqdn())
	type step struct {
		e      *mdnsEntry
		ttl    uint32 // 0: a goodbye
		reader int
		after  time.Duration // since the start
		want   string        // the color seen after the step; "" for none
		disown bool          // e is our own, deregistered or renamed
	}
	A, B, G := func(r int, want string) step { return step{red, 60, r, 0, want, false} },
		func(r int, want string) step { return step{blue, 60, r, 0, want, false} },
		func(r int, want string) step { return step{red, 0, r, 0, want, false} }
	O, T := func(r int, want string) step { return step{ours, 60, r, 0, want, false} },
		func(r int, want string) step { return step{theirs, 60, r, 0, want, false} }
	disown := func(e *mdnsEntry, want string) step { return step{e, 0, 0, 0, want, true} }
	later := func(s step) step { s.after = mdnsReorder + time.Millisecond; return s }
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"goodbye, then a late announcement", []step{A(0, "red"), G(0, ""), A(1, ""), G(1, ""), A(2, "")}},
		{"update, then a late copy", []step{A(0, "red"), A(1, "red"), B(0, "blue"), A(1, "blue"), B(1, "blue")}},
		{"update, then a late one-shot answer", []step{A(0, "red"), B(0, "blue"), A(2, "blue"), B(2, "blue"), A(2, "red")}},
		{"a socket level with the change is in order", []step{A(0, "red"), A(1, "red"), B(0, "blue"), B(1, "blue"), A(1, "red"), A(0, "red")}},
		{"a new announcement on the socket of the goodbye", []step{A(0, "red"), G(0, ""), A(0, "red")}},
		{"a copy after the window is news", []step{A(0, "red"), G(0, ""), later(A(1, "red"))}},
		{"a new value after a goodbye, then late copies", []step{A(0, "red"), A(1, "red"), G(0, ""), B(0, "blue"), A(1, "blue"), G(1, "blue"), B(1, "blue"), A(1, "red")}},
		{"a late goodbye of the instance before", []step{A(0, "red"), G(0, ""), A(0, "red"), G(1, "red"), G(0, "")}},
		{"withdrawn by its own registry", []step{A(0, "red"), disown(red, ""), A(0, ""), A(1, ""), later(A(1, "red"))}},
		{"renamed after another host's claim", []step{O(0, "ours"), T(0, "theirs"), disown(ours, "theirs"), O(1, "theirs"), T(0, "theirs"), T(1, "theirs")}},
		{"renamed before another host's claim is heard", []step{O(0, "ours"), disown(ours, ""), T(0, "theirs"), O(1, "theirs"), T(1, "theirs")}},
		{"a late copy from another address on the socket", []step{A(0, "red"), A(3, "red"), G(0, ""), A(3, ""), G(3, "")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newMDNSCache()
			start := time.Now()
			for i, s := range tc.steps {
				now := start.Add(s.after)
				if s.disown {
					c.disown(s.e.instanceRRs(), now)
				} else {
					m := &dnsmessage.Message{Header: dnsmessage.Header{Response: true}, Answers: s.e.records(ifc, s.ttl)}
					c.absorb(m, ifc.index, ifc.name, 1<<s.reader, s.reader == 2, now)
				}
				c.sweep(now)
				got := ""
				if info := c.resolve()[instance]; info != nil {
					got = info.Nodes[0].Metadata["color"]
				}
				if got != s.want {
					t.Fatalf("step %d: color %q, want %q", i, got, s.want)
				}
			}
		})
	}
	// A goodbye's mark goes when its time is up, and taking it away is no
	// change to the view.
	c := newMDNSCache()
	now := time.Now()
	c.absorb(&dnsmessage.Message{Answers: red.records(ifc, 60)}, 1, "test0", 1, false, now)
	c.absorb(&dnsmessage.Message{Answers: red.records(ifc, 0)}, 1, "test0", 1, false, now)
	if len(c.srv) != 1 || len(c.txt) != 1 {
		t.Fatalf("no mark kept after a goodbye: %d SRV, %d TXT", len(c.srv), len(c.txt))
	}
	if _, changed := c.sweep(now.Add(mdnsReorder)); changed || len(c.srv) != 0 || len(c.txt) != 0 {
		t.Fatalf("after the window: changed %v, %d SRV, %d TXT", changed, len(c.srv), len(c.txt))
	}
	// The values a live record no longer has go too, when their time is up.
	c.absorb(&dnsmessage.Message{Answers: red.records(ifc, 60)}, 1, "test0", 1, false, now)
	c.absorb(&dnsmessage.Message{Answers: blue.records(ifc, 60)}, 1, "test0", 1, false, now)
	if w := len(c.txt[instance].was); w != 1 {
		t.Fatalf("%d values kept after a change, want 1", w)
	}
	if !c.next.After(now) || c.next.After(now.Add(mdnsReorder)) {
		t.Fatalf("next sweep at %v, want within %v", c.next.Sub(now), mdnsReorder)
	}
	c.sweep(now.Add(mdnsReorder))
	if w := len(c.txt[instance].was); w != 0 {
		t.Fatalf("%d values kept after the window, want 0", w)
	}
}

// TestMDNSOrderPerInterfaceAndAddress: one socket hears a responder on two
// interfaces (or from two addresses), whose copies are not in order with
// each other; a late copy through the other one must not undo a goodbye.
func TestMDNSOrderPerInterfaceAndAddress(t *testing.T) {
	r := testMDNSOffline(t)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ifaces[2] = &mdnsIface{index: 2, name: "test1", v4: true, addrs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}}
	info := testNode("far", "far-1", "api.example.com:443", nil)
	e, err := mdnsNewEntry(info, info.Nodes[0], time.Minute, time.Now())
	assertNoError(t, err)
	pack := func(ttl uint32) []byte {
		b := mdnsPack(dnsmessage.Header{Response: true, Authoritative: true}, nil, e.records(r.ifaces[1], ttl), nil)
		assertEqual(t, len(b), 1)
		return b[0]
	}
	announce, goodbye := pack(60), pack(0)
	a1 := netip.MustParseAddrPort("192.168.1.5:5353")
	a2 := netip.MustParseAddrPort("192.168.1.6:5353")
	instance := strings.ToLower(e.fqdn())
	now := time.Now()
	for i, p := range []struct {
		buf     []byte
		ifIndex int
		src     netip.AddrPort
		want    bool
		later   bool // after the first goodbye's window
	}{
		{announce, 1, a1, true, false}, {announce, 2, a1, true, false}, {goodbye, 1, a1, false, false},
		{announce, 2, a1, false, false}, // late, through the other interface
		{goodbye, 2, a1, false, false},
		{announce, 1, a2, true, true}, {announce, 1, a1, true, true}, {goodbye, 1, a2, false, true},
		{announce, 1, a1, false, true}, // late, from the other address
	} {
		at := now
		if p.later {
			at = now.Add(2 * mdnsReorder)
		}
		r.handleLocked(mdnsIn{buf: p.buf, ifIndex: p.ifIndex, src: p.src}, at)
		if _, got := r.cache.resolve()[instance]; got != p.want {
			t.Fatalf("packet %d: instance known %v, want %v", i, got, p.want)
		}
	}
}

// TestMDNSWithdrawRetractsDelayedAnswers: an answer parked for its random
// delay (RFC 6762 §6) when the entry is withdrawn must not go out after the
// goodbye with the old records and their full TTL.
func TestMDNSWithdrawRetractsDelayedAnswers(t *testing.T) {
	r := testMDNSOffline(t)
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	q := mdnsPack(dnsmessage.Header{}, []dnsmessage.Question{{Name: mdnsName(mdnsSubtype("greeter")), Type: mdnsTypePTR, Class: dnsmessage.ClassINET}}, nil, nil)
	r.handleLocked(mdnsIn{buf: q[0], ifIndex: 1, src: netip.MustParseAddrPort("127.0.0.1:5353")}, now)
	if len(r.pending) == 0 {
		t.Fatal("the query parked no answer")
	}
	var key string
	var gone *mdnsEntry
	for k, e := range r.entries {
		if e.base == "greeter-1" {
			key, gone = k, e
		}
	}
	r.withdrawLocked(key, gone)
	r.tickLocked(now.Add(2 * time.Second))
	byeSent, greeter2 := false, false
	for _, o := range r.out {
		var m dnsmessage.Message
		assertNoError(t, m.Unpack(o.msg))
		for _, rr := range slices.Concat(m.Answers, m.Additionals) {
			if _, ok := rr.Body.(*dnsmessage.SRVResource); !ok {
				continue
			}
			switch name := rr.Header.Name.String(); {
			case name == gone.fqdn() && rr.Header.TTL == 0:
				byeSent = true
			case name == gone.fqdn():
				t.Fatalf("%s sent with TTL %d after its goodbye", name, rr.Header.TTL)
			case strings.HasPrefix(name, "greeter-2"):
				greeter2 = true
			}
		}
	}
	if !byeSent || !greeter2 {
		t.Fatalf("goodbye sent %v, the other node's answer sent %v", byeSent, greeter2)
	}
}

// TestMDNSProbedNameChangeIsAnnounced: with probing on, a change to a node
// whose name is already ours is announced at once (RFC 6762 §8.4), not
// probed again; so a deregistration right after it still says goodbye.
func TestMDNSProbedNameChangeIsAnnounced(t *testing.T) {
	checkGoroutines(t)
	a, b := newTestMDNS(t, MDNSProbe(true)), newTestMDNS(t)
	ctx := testCtx(t)
	w, err := b.Watch(ctx, "mdns-probed")
	assertNoError(t, err)
	defer w.Stop()
	svc := testNode("mdns-probed", "mdns-probed-1", "127.0.0.1:3333", nil)
	assertNoError(t, a.Register(ctx, svc, time.Minute))
	assertEqual(t, testNext(t, w, func(*RegistryEvent) bool { return true }).Type, EventCreate)

	svc.Nodes[0].Metadata = map[string]string{"color": "green"}
	assertNoError(t, a.Register(ctx, svc, time.Minute))
	a.mu.Lock()
	for _, e := range a.entries {
		if e.probes != 0 {
			t.Errorf("changed entry probes again (%d probes left)", e.probes)
		}
	}
	a.mu.Unlock()
	assertNoError(t, a.Deregister(ctx, svc))
	ev := testNext(t, w, func(*RegistryEvent) bool { return true })
	if ev.Type == EventUpdate { // the change may be heard before the goodbye
		ev = testNext(t, w, func(*RegistryEvent) bool { return true })
	}
	assertEqual(t, ev.Type, EventDelete)
}

// TestMDNSChangedNodeAddress: a node re-registered with another address
// keeps its instance name; its SRV target follows the address (its own
// .local name for an IP, the name itself for a DNS name), and moving from
// an IP to a DNS name says goodbye to the address records it gave.
func TestMDNSChangedNodeAddress(t *testing.T) {
	r := testMDNSOffline(t)
	r.mu.Lock()
	defer r.mu.Unlock()
	var old *mdnsEntry
	for _, e := range r.entries {
		if e.base == "greeter-1" {
			old = e
		}
	}
	old.renames, old.label, old.host = 1, "greeter-1 (2)", "greeter-1-2.local." // as after a conflict
	next := func(addr string) *mdnsEntry {
		info := testNode("greeter", "greeter-1", addr, map[string]string{"zone": "a"})
		e, err := mdnsNewEntry(info, info.Nodes[0], time.Minute, time.Now())
		assertNoError(t, err)
		return e
	}
	byes := func() bool { // whether a goodbye of the old A record went out (on either family)
		n := 0
		for _, o := range r.out {
			var m dnsmessage.Message
			assertNoError(t, m.Unpack(o.msg))
			for _, rr := range m.Answers {
				if _, ok := rr.Body.(*dnsmessage.AResource); ok && rr.Header.TTL == 0 && rr.Header.Name.String() == "greeter-1-2.local." {
					n++
				}
			}
		}
		r.out = nil
		return n > 0
	}
	steps := []struct {
		addr, host string
		bye        bool
	}{
		{"a.example:8080", "a.example.", true}, // the IP's A record goes
		{"b.example:8080", "b.example.", false},
		{"10.0.0.7:8080", "greeter-1-2.local.", false}, // its own name, renamed as before
		{"127.0.0.1:8080", "greeter-1-2.local.", false},
	}
	for _, s := range steps {
		e := next(s.addr)
		if probe := r.replaceLocked(old, e); probe {
			t.Fatalf("%s: an announced name probed again", s.addr)
		}
		assertEqual(t, e.label, "greeter-1 (2)")
		assertEqual(t, e.host, s.host)
		assertEqual(t, byes(), s.bye)
		r.entries[e.key] = e
		// The same registration again is no change.
		if again := next(s.addr); !e.sameAs(again) {
			t.Fatalf("%s: registering it again is taken for a change", s.addr)
		}
		old = e
	}
}
