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
	for name, s := range map[string]*ServiceInfo{
		"no service":    nil,
		"no name":       {},
		"nil node":      {Name: "x", Nodes: []*Node{nil}},
		"node no ID":    {Name: "x", Nodes: []*Node{{}}},
		"nil endpoint":  {Name: "x", Endpoints: []*Endpoint{nil}, Nodes: []*Node{{ID: "a"}}},
		"nil endpoint2": {Name: "x", Endpoints: []*Endpoint{{Name: "X.Y"}, nil}},
	} {
		t.Run(name, func(t *testing.T) {
			if err := reg.Register(ctx, s, 0); CodeOf(err) != CodeInvalidArgument {
				t.Fatalf("Register: %v", err)
			}
			if err := reg.Deregister(ctx, s); CodeOf(err) != CodeInvalidArgument {
				t.Fatalf("Deregister: %v", err)
			}
		})
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

// countingRegistry counts lookups and lists, and can hold each lookup, after it has read
// the registry, until released; it can hold each Watch call before it
// registers, and says when a watcher's Next is called.
type countingRegistry struct {
	Registry
	entered   chan struct{} // a token per lookup, once it has read the registry
	hold      chan struct{} // a lookup returns on a token (or once closed)
	watching  chan struct{} // if not nil, a token per Watch call
	watchHold chan struct{} // if not nil, Watch registers on a token
	nexts     chan struct{} // a token per Next call of a watcher

	mu       sync.Mutex
	lookups  int
	lists    int
	watchers []Watcher
}

func (r *countingRegistry) Lookup(ctx context.Context, name string) ([]*ServiceInfo, error) {
	r.mu.Lock()
	r.lookups++
	r.mu.Unlock()
	services, err := r.Registry.Lookup(ctx, name)
	r.entered <- struct{}{}
	select {
	case <-r.hold:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return services, err
}

func (r *countingRegistry) List(ctx context.Context) ([]*ServiceInfo, error) {
	r.mu.Lock()
	r.lists++
	r.mu.Unlock()
	return r.Registry.List(ctx)
}

func (r *countingRegistry) Watch(ctx context.Context, service string) (Watcher, error) {
	if r.watching != nil {
		r.watching <- struct{}{}
	}
	if r.watchHold != nil {
		select {
		case <-r.watchHold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	w, err := r.Registry.Watch(ctx, service)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.watchers = append(r.watchers, w)
	r.mu.Unlock()
	return &signalWatcher{Watcher: w, nexts: r.nexts}, nil
}

func (r *countingRegistry) lookupCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lookups
}

// lastWatcher returns the watcher the last Watch call made.
func (r *countingRegistry) lastWatcher() Watcher {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.watchers[len(r.watchers)-1]
}

type signalWatcher struct {
	Watcher
	nexts chan struct{}
}

func (w *signalWatcher) Next() (*RegistryEvent, error) {
	w.nexts <- struct{}{}
	return w.Watcher.Next()
}

func newCountingRegistry(mem Registry) *countingRegistry {
	return &countingRegistry{Registry: mem, entered: make(chan struct{}, 100), hold: make(chan struct{}), nexts: make(chan struct{}, 100)}
}

type registryCacheResult struct {
	services []*ServiceInfo
	err      error
}

// registryCacheLookup looks name up through the cache and checks whether the
// cache asked the registry (fresh) or answered from its entry. It returns the
// number of nodes found.
func registryCacheLookup(t *testing.T, cache *registryCache, reg *countingRegistry, name string, fresh bool) int {
	t.Helper()
	res := make(chan registryCacheResult, 1)
	go func() {
		services, err := cache.lookup(context.Background(), name)
		res <- registryCacheResult{services, err}
	}()
	var r registryCacheResult
	select {
	case <-reg.entered:
		if !fresh {
			t.Errorf("lookup of %s asked the registry; want it cached", name)
		}
		reg.hold <- struct{}{}
		r = <-res
	case r = <-res:
		if fresh {
			t.Errorf("lookup of %s answered from the cache; want a fresh lookup", name)
		}
	}
	assertNoError(t, r.err)
	nodes := 0
	for _, s := range r.services {
		nodes += len(s.Nodes)
	}
	return nodes
}

// registryCacheStartWatch makes the cache start its watch, with a lookup of a
// service that does not exist, and waits until the watch is live.
func registryCacheStartWatch(t *testing.T, cache *registryCache, reg *countingRegistry) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := cache.lookup(context.Background(), "nothing")
		done <- err
	}()
	<-reg.entered
	reg.hold <- struct{}{}
	if err := <-done; !errors.Is(err, ErrNotFound) {
		t.Fatalf("lookup of a missing service: %v", err)
	}
	<-reg.nexts // the watch calls Next once it is live
}

func TestRegistryCacheSharesLookupsAndFollowsWatch(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	mem := NewMemoryRegistry()
	defer mem.Close()
	reg := newCountingRegistry(mem)
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "a", Address: "a"}}}, 0))
	cache := newRegistryCache(reg, time.Hour)
	defer cache.close()
	registryCacheStartWatch(t, cache, reg)
	assertEqual(t, reg.lookupCount(), 1)

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
	reg.hold <- struct{}{}
	wg.Wait()
	assertEqual(t, reg.lookupCount(), 2)

	// A caller whose context has ended gets its error at once.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := cache.lookup(cctx, "greeter"); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled lookup: %v", err)
	}

	// A registry change drops the entry, and the next lookup sees the new
	// node. The cache's watch calls Next again once it has handled the event.
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "b", Address: "b"}}}, 0))
	<-reg.nexts
	assertEqual(t, registryCacheLookup(t, cache, reg, "greeter", true), 2)
	assertEqual(t, registryCacheLookup(t, cache, reg, "greeter", false), 2)
	assertEqual(t, reg.lookupCount(), 3)
}

// A lookup that read the registry before a change the watch cannot report
// (the watch was not yet registered, or was being restarted) must not be
// cached: the next lookup asks the registry again and sees the change.
func TestRegistryCacheDoesNotCacheLookupsRacingChanges(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	mem := NewMemoryRegistry()
	defer mem.Close()
	reg := newCountingRegistry(mem)
	reg.watching = make(chan struct{}, 100)
	reg.watchHold = make(chan struct{})
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "a", Address: "a"}}}, 0))
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "echo", Nodes: []*Node{{ID: "a", Address: "a"}}}, 0))
	cache := newRegistryCache(reg, time.Hour)
	defer cache.close()

	// The first lookup starts the watch; it reads the registry, the registry
	// changes before the watch is registered, then the lookup ends.
	res := make(chan registryCacheResult, 1)
	go func() {
		services, err := cache.lookup(ctx, "greeter")
		res <- registryCacheResult{services, err}
	}()
	<-reg.entered
	<-reg.watching
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "greeter", Nodes: []*Node{{ID: "b", Address: "b"}}}, 0))
	reg.hold <- struct{}{}
	r := <-res
	assertNoError(t, r.err)
	assertEqual(t, len(r.services[0].Nodes), 1) // read before the change
	reg.watchHold <- struct{}{}
	<-reg.nexts // live
	assertEqual(t, registryCacheLookup(t, cache, reg, "greeter", true), 2)
	assertEqual(t, registryCacheLookup(t, cache, reg, "greeter", false), 2)

	// A lookup in flight while the watch fails and restarts, with a change
	// in between that no watcher sees.
	go func() {
		services, err := cache.lookup(ctx, "echo")
		res <- registryCacheResult{services, err}
	}()
	<-reg.entered
	reg.lastWatcher().Stop()
	<-reg.watching // the failure is handled; the watch is being restarted
	assertNoError(t, mem.Register(ctx, &ServiceInfo{Name: "echo", Nodes: []*Node{{ID: "b", Address: "b"}}}, 0))
	reg.hold <- struct{}{}
	r = <-res
	assertNoError(t, r.err)
	assertEqual(t, len(r.services[0].Nodes), 1)
	reg.watchHold <- struct{}{}
	<-reg.nexts // live again
	assertEqual(t, registryCacheLookup(t, cache, reg, "echo", true), 2)
	assertEqual(t, registryCacheLookup(t, cache, reg, "echo", false), 2)
	assertEqual(t, registryCacheLookup(t, cache, reg, "greeter", true), 2) // emptied by the failure
	assertEqual(t, reg.lookupCount(), 5)
}
