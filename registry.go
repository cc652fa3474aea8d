package micro

import (
	"context"
	"errors"
	"maps"
	"reflect"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// Registry records which services run where. Services register their nodes
// with a TTL and refresh them on an interval; clients look services up and
// watch for changes.
//
// Implementations must be safe for concurrent use by any number of goroutines.
type Registry interface {
	// Register adds or refreshes the nodes of s (keyed by name, version and
	// node ID). A node not refreshed within ttl expires; ttl 0 never expires.
	Register(ctx context.Context, s *ServiceInfo, ttl time.Duration) error
	// Deregister removes the nodes of s.
	Deregister(ctx context.Context, s *ServiceInfo) error
	// Lookup returns every version of the named service that has a node,
	// or an error wrapping ErrNotFound.
	Lookup(ctx context.Context, name string) ([]*ServiceInfo, error)
	// List returns every service with a node, each version once.
	List(ctx context.Context) ([]*ServiceInfo, error)
	// Watch reports changes to the named service ("" for all) until the
	// watcher is stopped or ctx ends.
	Watch(ctx context.Context, service string) (Watcher, error)
}

// Watcher delivers registry changes in order. Next and Stop may be called
// from different goroutines.
type Watcher interface {
	// Next blocks until the next event. It returns ErrClosed once the
	// watcher is stopped or its context ends, and ErrWatchOverflow if the
	// reader fell so far behind that events were lost: the reader should
	// list again and watch anew.
	Next() (*RegistryEvent, error)
	// Stop ends the watcher; it is idempotent.
	Stop()
}

// RegistryEvent is one change seen by a [Watcher]. Service holds the
// service's record with just the nodes that changed.
type RegistryEvent struct {
	Type    EventType
	Service *ServiceInfo
}

// EventType says what a [RegistryEvent] did.
type EventType int

// The kinds of registry change.
const (
	EventCreate EventType = iota + 1 // nodes appeared
	EventUpdate                      // known nodes or the record changed
	EventDelete                      // nodes left or expired
)

// String returns "create", "update" or "delete".
func (t EventType) String() string {
	switch t {
	case EventCreate:
		return "create"
	case EventUpdate:
		return "update"
	case EventDelete:
		return "delete"
	}
	return "unknown"
}

// ErrWatchOverflow is returned by [Watcher.Next] when events were lost
// because the reader fell behind.
var ErrWatchOverflow = errors.New("micro: registry watcher fell behind; list again")

// ServiceInfo is a service's registry record: one version of a named service,
// its endpoints and its nodes. (Service is the runnable service.)
type ServiceInfo struct {
	Name      string            `json:"name"`
	Version   string            `json:"version,omitempty"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	Endpoints []*Endpoint       `json:"endpoints,omitempty"`
	Nodes     []*Node           `json:"nodes,omitempty"`
}

// Node is one running instance of a service.
type Node struct {
	// ID is unique per running instance ("greeter-3f2a...").
	ID string `json:"id"`
	// Address is the host:port that serves the node's RPC.
	Address  string            `json:"address"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Endpoint describes one RPC method: "Greeter.Hello" with the Go type names
// of its request and response.
type Endpoint struct {
	Name     string            `json:"name"`
	Request  string            `json:"request,omitempty"`
	Response string            `json:"response,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Clone returns a deep copy of s.
func (s *ServiceInfo) Clone() *ServiceInfo {
	if s == nil {
		return nil
	}
	c := *s
	c.Metadata = maps.Clone(s.Metadata)
	c.Endpoints = make([]*Endpoint, len(s.Endpoints))
	for i, e := range s.Endpoints {
		ec := *e
		ec.Metadata = maps.Clone(e.Metadata)
		c.Endpoints[i] = &ec
	}
	c.Nodes = make([]*Node, len(s.Nodes))
	for i, n := range s.Nodes {
		c.Nodes[i] = n.clone()
	}
	return &c
}

func (n *Node) clone() *Node {
	c := *n
	c.Metadata = maps.Clone(n.Metadata)
	return &c
}

// MemoryRegistry is a [Registry] inside one process: services that share it
// find each other. Nodes expire when their TTL runs out, and watchers are told.
// The zero value is not usable; call [NewMemoryRegistry]. Close stops its
// expiry timer.
type MemoryRegistry struct {
	mu       sync.Mutex
	services map[string]map[string]*registryRecord // name → version → record
	watchers map[*registryWatcher]struct{}
	timer    *time.Timer // fires at the earliest node expiry
	closed   bool
	now      func() time.Time
}

type registryRecord struct {
	info  *ServiceInfo // without nodes
	nodes map[string]*registryNode
}

type registryNode struct {
	node    *Node
	expires time.Time // zero: never
}

// NewMemoryRegistry returns an empty registry.
func NewMemoryRegistry() *MemoryRegistry {
	return &MemoryRegistry{
		services: make(map[string]map[string]*registryRecord),
		watchers: make(map[*registryWatcher]struct{}),
		now:      time.Now,
	}
}

// Register adds or refreshes the nodes of s.
func (r *MemoryRegistry) Register(ctx context.Context, s *ServiceInfo, ttl time.Duration) error {
	if err := registryValidate(s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	versions := r.services[s.Name]
	if versions == nil {
		versions = make(map[string]*registryRecord)
		r.services[s.Name] = versions
	}
	rec := versions[s.Version]
	info := s.Clone()
	info.Nodes = nil
	recordChanged := false
	if rec == nil {
		rec = &registryRecord{info: info, nodes: make(map[string]*registryNode)}
		versions[s.Version] = rec
	} else if !reflect.DeepEqual(rec.info, info) {
		rec.info = info
		recordChanged = true
	}
	var expires time.Time
	if ttl > 0 {
		expires = r.now().Add(ttl)
	}
	var created, updated []*Node
	for _, n := range s.Nodes {
		old := rec.nodes[n.ID]
		rec.nodes[n.ID] = &registryNode{node: n.clone(), expires: expires}
		switch {
		case old == nil:
			created = append(created, n)
		case recordChanged || !reflect.DeepEqual(old.node, n):
			updated = append(updated, n)
		}
	}
	if len(created) > 0 {
		r.notify(EventCreate, rec.info, created)
	}
	if len(updated) > 0 {
		r.notify(EventUpdate, rec.info, updated)
	}
	r.scheduleLocked()
	return nil
}

// Deregister removes the nodes of s.
func (r *MemoryRegistry) Deregister(ctx context.Context, s *ServiceInfo) error {
	if err := registryValidate(s); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	rec := r.services[s.Name][s.Version]
	if rec == nil {
		return nil
	}
	var gone []*Node
	for _, n := range s.Nodes {
		if old, ok := rec.nodes[n.ID]; ok {
			delete(rec.nodes, n.ID)
			gone = append(gone, old.node)
		}
	}
	if len(gone) > 0 {
		r.notify(EventDelete, rec.info, gone)
	}
	r.dropEmptyLocked(s.Name, s.Version)
	return nil
}

// Lookup returns the versions of the named service that have live nodes.
func (r *MemoryRegistry) Lookup(ctx context.Context, name string) ([]*ServiceInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	r.expireLocked()
	out := r.snapshotLocked(name)
	if len(out) == 0 {
		return nil, &Error{Code: CodeNotFound, Message: "service " + name + " not found", cause: ErrNotFound}
	}
	return out, nil
}

// List returns every service with live nodes.
func (r *MemoryRegistry) List(ctx context.Context) ([]*ServiceInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	r.expireLocked()
	var out []*ServiceInfo
	for _, name := range slices.Sorted(maps.Keys(r.services)) {
		out = append(out, r.snapshotLocked(name)...)
	}
	return out, nil
}

// Watch reports changes to the named service ("" for all).
func (r *MemoryRegistry) Watch(ctx context.Context, service string) (Watcher, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	w := &registryWatcher{service: service, ready: make(chan struct{}, 1), done: make(chan struct{})}
	r.watchers[w] = struct{}{}
	w.stop = context.AfterFunc(ctx, w.Stop)
	w.remove = func() {
		r.mu.Lock()
		delete(r.watchers, w)
		r.mu.Unlock()
	}
	return w, nil
}

// Close stops the expiry timer and every watcher. It is idempotent.
func (r *MemoryRegistry) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	if r.timer != nil {
		r.timer.Stop()
	}
	ws := slices.Collect(maps.Keys(r.watchers))
	r.mu.Unlock()
	for _, w := range ws {
		w.Stop()
	}
	return nil
}

func (r *MemoryRegistry) snapshotLocked(name string) []*ServiceInfo {
	var out []*ServiceInfo
	versions := r.services[name]
	for _, v := range slices.Sorted(maps.Keys(versions)) {
		rec := versions[v]
		if len(rec.nodes) == 0 {
			continue
		}
		s := rec.info.Clone()
		for _, id := range slices.Sorted(maps.Keys(rec.nodes)) {
			s.Nodes = append(s.Nodes, rec.nodes[id].node.clone())
		}
		out = append(out, s)
	}
	return out
}

// expireLocked removes nodes whose TTL ran out and tells the watchers.
func (r *MemoryRegistry) expireLocked() {
	now := r.now()
	for name, versions := range r.services {
		for v, rec := range versions {
			var gone []*Node
			for id, n := range rec.nodes {
				if !n.expires.IsZero() && !now.Before(n.expires) {
					delete(rec.nodes, id)
					gone = append(gone, n.node)
				}
			}
			if len(gone) > 0 {
				r.notify(EventDelete, rec.info, gone)
			}
			r.dropEmptyLocked(name, v)
		}
	}
}

func (r *MemoryRegistry) dropEmptyLocked(name, version string) {
	versions := r.services[name]
	if rec := versions[version]; rec != nil && len(rec.nodes) == 0 {
		delete(versions, version)
	}
	if len(versions) == 0 {
		delete(r.services, name)
	}
}

// scheduleLocked sets the timer for the earliest expiry.
func (r *MemoryRegistry) scheduleLocked() {
	var next time.Time
	for _, versions := range r.services {
		for _, rec := range versions {
			for _, n := range rec.nodes {
				if !n.expires.IsZero() && (next.IsZero() || n.expires.Before(next)) {
					next = n.expires
				}
			}
		}
	}
	if next.IsZero() {
		return
	}
	d := max(next.Sub(r.now()), time.Millisecond)
	if r.timer == nil {
		r.timer = time.AfterFunc(d, r.onTimer)
	} else {
		r.timer.Reset(d)
	}
}

func (r *MemoryRegistry) onTimer() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.expireLocked()
	r.scheduleLocked()
}

func (r *MemoryRegistry) notify(t EventType, info *ServiceInfo, nodes []*Node) {
	for w := range r.watchers {
		if w.service != "" && w.service != info.Name {
			continue
		}
		s := info.Clone()
		for _, n := range nodes {
			s.Nodes = append(s.Nodes, n.clone())
		}
		w.push(&RegistryEvent{Type: t, Service: s})
	}
}

func registryValidate(s *ServiceInfo) error {
	if s == nil || s.Name == "" {
		return Errorf(CodeInvalidArgument, "micro: registry: service has no name")
	}
	for _, n := range s.Nodes {
		if n == nil || n.ID == "" {
			return Errorf(CodeInvalidArgument, "micro: registry: service %s has a node with no ID", s.Name)
		}
	}
	for _, e := range s.Endpoints {
		if e == nil {
			return Errorf(CodeInvalidArgument, "micro: registry: service %s has a nil endpoint", s.Name)
		}
	}
	return nil
}

// registryWatchBuffer bounds the events a watcher holds for a slow reader;
// past it the watcher reports ErrWatchOverflow rather than drop silently.
const registryWatchBuffer = 1024

// registryWatcher is a Watcher fed by a registry through push.
type registryWatcher struct {
	service string
	ready   chan struct{} // a token when the queue may be non-empty
	done    chan struct{}
	stop    func() bool // unhooks the context
	remove  func()      // unhooks the registry

	mu       sync.Mutex
	queue    []*RegistryEvent
	overflow bool
	stopped  bool
}

func (w *registryWatcher) push(ev *RegistryEvent) {
	w.mu.Lock()
	if w.stopped || w.overflow {
		w.mu.Unlock()
		return
	}
	if len(w.queue) >= registryWatchBuffer {
		w.overflow = true
		w.queue = nil
	} else {
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.ready <- struct{}{}:
	default:
	}
}

func (w *registryWatcher) Next() (*RegistryEvent, error) {
	for {
		w.mu.Lock()
		switch {
		case w.stopped:
			w.mu.Unlock()
			return nil, ErrClosed
		case w.overflow:
			w.mu.Unlock()
			return nil, ErrWatchOverflow
		case len(w.queue) > 0:
			ev := w.queue[0]
			w.queue[0] = nil
			w.queue = w.queue[1:]
			w.mu.Unlock()
			return ev, nil
		}
		w.mu.Unlock()
		select {
		case <-w.ready:
		case <-w.done:
		}
	}
}

func (w *registryWatcher) Stop() {
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	w.stopped = true
	w.queue = nil
	w.mu.Unlock()
	close(w.done)
	if w.stop != nil {
		w.stop()
	}
	if w.remove != nil {
		w.remove()
	}
}

// registryCache is a client's view of a registry: lookups are cached and
// refreshed by one watch over all services, and concurrent misses for one
// name share a single lookup.
//
// A lookup's result is cached only if the watch was live (registered with the
// registry) when the lookup began and no watch event, restart or failure
// happened before it ended, so every change the lookup may have missed is one
// the watch reports, and a cached entry is dropped as soon as the watch
// delivers its change. Lookups made before the watch is live are not cached.
type registryCache struct {
	reg Registry
	ttl time.Duration // how long an entry lives without a watch event

	sf singleflight.Group

	mu        sync.Mutex
	entries   map[string]registryCacheEntry
	epoch     uint64 // bumped by every watch event and every watch start or failure
	watchLive bool   // a Watch call returned and its watcher has not failed since
	watchOn   bool   // the watch goroutine runs
	closed    bool
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

type registryCacheEntry struct {
	services []*ServiceInfo
	expires  time.Time
}

func newRegistryCache(reg Registry, ttl time.Duration) *registryCache {
	ctx, cancel := context.WithCancel(context.Background())
	return &registryCache{
		reg: reg, ttl: ttl,
		entries: make(map[string]registryCacheEntry),
		ctx:     ctx, cancel: cancel,
	}
}

// peek returns the records of a service when the cache has them fresh.
func (c *registryCache) peek(name string) ([]*ServiceInfo, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[name]; ok && !c.closed && time.Now().Before(e.expires) {
		return e.services, true
	}
	return nil, false
}

// lookup returns the records of a service, from the cache when fresh. The
// caller must not modify them.
func (c *registryCache) lookup(ctx context.Context, name string) ([]*ServiceInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if e, ok := c.entries[name]; ok && time.Now().Before(e.expires) {
		c.mu.Unlock()
		return e.services, nil
	}
	if !c.watchOn {
		c.watchOn = true
		c.wg.Add(1)
		go c.watch()
	}
	c.mu.Unlock()

	ch := c.sf.DoChan(name, func() (any, error) {
		c.mu.Lock()
		e, ok := c.entries[name] // filled by a lookup that ended just now
		live, epoch := c.watchLive, c.epoch
		c.mu.Unlock()
		if ok && time.Now().Before(e.expires) {
			return e.services, nil
		}
		// Detached from any one caller, so a canceled caller does not fail
		// the others waiting on the same lookup.
		lctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
		defer cancel()
		services, err := c.reg.Lookup(lctx, name)
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		if live && c.epoch == epoch && !c.closed {
			c.entries[name] = registryCacheEntry{services: services, expires: time.Now().Add(c.ttl)}
		}
		c.mu.Unlock()
		return services, nil
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.([]*ServiceInfo), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// watch drops cache entries when their service changes. If the watch cannot
// start or fails, the cache is emptied (entries could be stale), nothing is
// cached until it is live again, and it is retried with a backoff.
func (c *registryCache) watch() {
	defer c.wg.Done()
	backoff := 100 * time.Millisecond
	for c.ctx.Err() == nil {
		w, err := c.reg.Watch(c.ctx, "")
		if err == nil {
			backoff = 100 * time.Millisecond
			c.mu.Lock()
			c.watchLive = true
			c.epoch++ // lookups begun before now may have missed a change
			c.mu.Unlock()
			for {
				ev, err := w.Next()
				if err != nil {
					break
				}
				c.invalidate(ev)
			}
			w.Stop()
		}
		c.mu.Lock()
		c.watchLive = false
		c.epoch++
		clear(c.entries)
		c.mu.Unlock()
		select {
		case <-c.ctx.Done():
		case <-time.After(backoff):
			backoff = min(2*backoff, 10*time.Second)
		}
	}
}

// invalidate drops the entry of the service ev changed (every entry if ev
// names none) and ends the caching of lookups in flight.
func (c *registryCache) invalidate(ev *RegistryEvent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.epoch++
	if ev == nil || ev.Service == nil {
		clear(c.entries)
		return
	}
	delete(c.entries, ev.Service.Name)
}

func (c *registryCache) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}
