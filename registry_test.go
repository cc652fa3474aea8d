package micro

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestMemoryRegistryLifecycle(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	reg := NewMemoryRegistry()
	defer reg.Close()
	w, err := reg.Watch(ctx, "greeter")
	assertNoError(t, err)
	defer w.Stop()
	all, err := reg.Watch(ctx, "")
	assertNoError(t, err)
	defer all.Stop()

	v1 := &ServiceInfo{Name: "greeter", Version: "1", Endpoints: []*Endpoint{{Name: "Greeter.Hello"}},
		Nodes: []*Node{{ID: "a", Address: "127.0.0.1:1"}, {ID: "b", Address: "127.0.0.1:2"}}}
	v2 := &ServiceInfo{Name: "greeter", Version: "2", Nodes: []*Node{{ID: "c", Address: "127.0.0.1:3"}}}
	other := &ServiceInfo{Name: "other", Nodes: []*Node{{ID: "o", Address: "127.0.0.1:4"}}}
	for _, s := range []*ServiceInfo{v1, v2, other} {
		assertNoError(t, reg.Register(ctx, s, 0))
	}
	// The registry keeps its own copy.
	v1.Nodes[0].Address = "changed"

	got, err := reg.Lookup(ctx, "greeter")
	assertNoError(t, err)
	assertEqual(t, len(got), 2)
	assertEqual(t, got[0].Version, "1")
	assertEqual(t, len(got[0].Nodes), 2)
	assertEqual(t, got[0].Nodes[0].Address, "127.0.0.1:1")
	assertEqual(t, got[0].Endpoints[0].Name, "Greeter.Hello")
	list, err := reg.List(ctx)
	assertNoError(t, err)
	assertEqual(t, len(list), 3)

	// A refresh with nothing new is not an event; a change is an update.
	v1.Nodes[0].Address = "127.0.0.1:1"
	assertNoError(t, reg.Register(ctx, v1, 0))
	v1.Nodes[1].Metadata = map[string]string{"zone": "eu"}
	assertNoError(t, reg.Register(ctx, v1, 0))
	assertNoError(t, reg.Deregister(ctx, &ServiceInfo{Name: "greeter", Version: "1", Nodes: []*Node{{ID: "a"}}}))

	want := []struct {
		typ   EventType
		nodes string
	}{{EventCreate, "ab"}, {EventCreate, "c"}, {EventUpdate, "b"}, {EventDelete, "a"}}
	for _, w2 := range want {
		ev, err := w.Next()
		assertNoError(t, err)
		ids := ""
		for _, n := range ev.Service.Nodes {
			ids += n.ID
		}
		if ev.Type != w2.typ || ids != w2.nodes {
			t.Fatalf("event %v %q, want %v %q", ev.Type, ids, w2.typ, w2.nodes)
		}
	}
	// The all-services watcher saw "other" too.
	seen := map[string]bool{}
	for i := 0; i < 5; i++ {
		ev, err := all.Next()
		assertNoError(t, err)
		seen[ev.Service.Name] = true
	}
	if !seen["other"] || !seen["greeter"] {
		t.Fatalf("all-services watcher saw %v", seen)
	}

	assertNoError(t, reg.Deregister(ctx, v2))
	assertNoError(t, reg.Deregister(ctx, &ServiceInfo{Name: "greeter", Version: "1", Nodes: []*Node{{ID: "b"}}}))
	_, err = reg.Lookup(ctx, "greeter")
	if !errors.Is(err, ErrNotFound) || CodeOf(err) != CodeNotFound {
		t.Fatalf("lookup of a gone service: %v", err)
	}

	// Bad records are refused.
	if err := reg.Register(ctx, &ServiceInfo{}, 0); CodeOf(err) != CodeInvalidArgument {
		t.Fatalf("nameless service: %v", err)
	}
	if err := reg.Register(ctx, &ServiceInfo{Name: "x", Nodes: []*Node{{}}}, 0); CodeOf(err) != CodeInvalidArgument {
		t.Fatalf("node without ID: %v", err)
	}
}

func TestMemoryRegistryTTLExpiry(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	reg := NewMemoryRegistry()
	defer reg.Close()
	w, err := reg.Watch(ctx, "greeter")
	assertNoError(t, err)
	defer w.Stop()
	assertNoError(t, reg.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "short", Address: "a"}}}, 20*time.Millisecond))
	assertNoError(t, reg.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "long", Address: "b"}}}, time.Hour))
	for _, want := range []EventType{EventCreate, EventCreate, EventDelete} {
		ev, err := w.Next() // the delete comes from the expiry timer, unprompted
		assertNoError(t, err)
		assertEqual(t, ev.Type, want)
		if want == EventDelete {
			assertEqual(t, ev.Service.Nodes[0].ID, "short")
		}
	}
	got, err := reg.Lookup(ctx, "greeter")
	assertNoError(t, err)
	assertEqual(t, len(got[0].Nodes), 1)
	assertEqual(t, got[0].Nodes[0].ID, "long")
}

func TestRegistryWatcherStopsAndOverflows(t *testing.T) {
	checkGoroutines(t)
	reg := NewMemoryRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := reg.Watch(ctx, "")
	assertNoError(t, err)
	// A reader blocked in Next wakes when the context ends.
	done := make(chan error, 1)
	go func() {
		_, err := w.Next()
		done <- err
	}()
	cancel()
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("Next after cancel: %v", err)
	}

	// A reader that never reads is told it fell behind, not silently skipped.
	slow, err := reg.Watch(context.Background(), "")
	assertNoError(t, err)
	for i := 0; i <= registryWatchBuffer; i++ {
		assertNoError(t, reg.Register(context.Background(), &ServiceInfo{Name: "s", Nodes: []*Node{{ID: string(rune('a'+i%26)) + string(rune(i))}}}, 0))
	}
	if _, err := slow.Next(); !errors.Is(err, ErrWatchOverflow) {
		t.Fatalf("overflowed watcher: %v", err)
	}
	slow.Stop()
	slow.Stop() // idempotent

	// Close ends every watcher and refuses further use.
	w3, err := reg.Watch(context.Background(), "")
	assertNoError(t, err)
	assertNoError(t, reg.Close())
	if _, err := w3.Next(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Next after registry Close: %v", err)
	}
	if _, err := reg.Lookup(context.Background(), "s"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Lookup after Close: %v", err)
	}
}

// countingRegistry counts lookups, can hold them until released, and says
// when a watcher's Next is called.
type countingRegistry struct {
	Registry
	mu      sync.Mutex
	lookups int
	entered chan struct{} // a token per lookup
	hold    chan struct{}
	nexts   chan struct{} // a token per Next call of a watcher
}

func (r *countingRegistry) Lookup(ctx context.Context, name string) ([]*ServiceInfo, error) {
	r.mu.Lock()
	r.lookups++
	r.mu.Unlock()
	r.entered <- struct{}{}
	<-r.hold
	return r.Registry.Lookup(ctx, name)
}

func (r *countingRegistry) Watch(ctx context.Context, service string) (Watcher, error) {
	w, err := r.Registry.Watch(ctx, service)
	if err != nil {
		return nil, err
	}
	return &signalWatcher{Watcher: w, nexts: r.nexts}, nil
}

type signalWatcher struct {
	Watcher
	nexts chan struct{}
}

func (w *signalWatcher) Next() (*RegistryEvent, error) {
	w.nexts <- struct{}{}
	return w.Watcher.Next()
}

func TestRegistryCacheSharesLookupsAndFollowsWatch(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	mem := NewMemoryRegistry()
	defer mem.Close()
	reg := &countingRegistry{Registry: mem, entered: make(chan struct{}, 100), hold: make(chan struct{}), nexts: make(chan struct{}, 100)}
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "a", Address: "a"}}}, 0))
	cache := newRegistryCache(reg, time.Hour)
	defer cache.close()

	// Ten concurrent misses make one lookup: the first holds it open, the
	// rest join it, or find its result cached if they come late.
	var wg sync.WaitGroup
	lookup := func() {
		defer wg.Done()
		got, err := cache.lookup(ctx, "greeter")
		if err != nil || len(got) != 1 {
			t.Errorf("lookup: %v %v", got, err)
		}
	}
	wg.Add(10)
	go lookup()
	<-reg.entered
	for i := 0; i < 9; i++ {
		go lookup()
	}
	close(reg.hold)
	wg.Wait()
	reg.mu.Lock()
	assertEqual(t, reg.lookups, 1)
	reg.mu.Unlock()

	// A caller whose context has ended gets its error at once.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := cache.lookup(cctx, "greeter"); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled lookup: %v", err)
	}

	// A registry change drops the entry, and the next lookup sees the new
	// node. The cache's watch calls Next once when it starts and again once
	// it has handled an event.
	<-reg.nexts
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "b", Address: "b"}}}, 0))
	<-reg.nexts
	got, err := cache.lookup(ctx, "greeter")
	assertNoError(t, err)
	assertEqual(t, len(got[0].Nodes), 2)
	reg.mu.Lock()
	assertEqual(t, reg.lookups, 2)
	reg.mu.Unlock()
}
