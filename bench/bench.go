// Package bench measures unary RPC in micro against its peers: raw TCP,
// net/rpc, grpc-go, connect-go, stock net/http, and micro itself; and
// bidirectional streams in micro, grpc-go and connect-go.
//
// Every implementation echoes a payload of bytes. [Serve] runs one
// implementation's server in its own process and answers a small control
// protocol on stdin and stdout; [Run] drives the matrix from another process,
// starting a server process for every measurement, so client and server never
// share a heap or a scheduler. [ServeStream] and [RunStream] do the same for
// streams. The command cmd/rpcbench wraps all four.
//
// An implementation lives in a file of its own and registers itself in that
// file's init with benchImpls.register (streamImpls.register for streams):
// adding one is adding a file.
package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
)

// benchImpl is one RPC implementation under test.
type benchImpl interface {
	// serve starts serving the echo service on l and returns at once; the
	// closer stops the server, closes l and waits for the goroutines serve
	// started.
	serve(l net.Listener) (io.Closer, error)
	// newCaller returns a client of the server at addr. The call func is
	// safe for concurrent use and returns a response the caller owns; the
	// closer releases the client's connections.
	newCaller(addr string) (benchCallFunc, io.Closer, error)
}

// benchCallFunc makes one echo call.
type benchCallFunc func(ctx context.Context, payload []byte) ([]byte, error)

// registry holds the implementations of one kind (unary or streaming) by
// name. It is written only by the init functions of the implementation files
// and never after.
type registry[I any] struct {
	kind    string // "implementation" or "stream implementation", for messages
	entries map[string]registryEntry[I]
}

type registryEntry[I any] struct {
	rank  int    // position in the default order
	about string // one line for -list and the README
	impl  I
}

func newRegistry[I any](kind string) *registry[I] {
	return &registry[I]{kind: kind, entries: map[string]registryEntry[I]{}}
}

// benchImpls holds every unary implementation by name.
var benchImpls = newRegistry[benchImpl]("implementation")

func (r *registry[I]) register(name string, rank int, about string, impl I) {
	if _, dup := r.entries[name]; dup {
		panic("bench: " + r.kind + " " + name + " registered twice")
	}
	r.entries[name] = registryEntry[I]{rank: rank, about: about, impl: impl}
}

// names returns the names in their default order, by rank.
func (r *registry[I]) names() []string {
	names := make([]string, 0, len(r.entries))
	for name := range r.entries {
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b string) int { return r.entries[a].rank - r.entries[b].rank })
	return names
}

// about returns the one-line description of name, or "".
func (r *registry[I]) about(name string) string { return r.entries[name].about }

// known reports an error unless name is registered.
func (r *registry[I]) known(name string) error {
	_, err := r.lookup(name)
	return err
}

func (r *registry[I]) lookup(name string) (I, error) {
	e, ok := r.entries[name]
	if !ok {
		return e.impl, fmt.Errorf("bench: unknown %s %q; have %v", r.kind, name, r.names())
	}
	return e.impl, nil
}

// Impls returns the names of the implementations in their default order: the
// floor (raw TCP) first, micro last.
func Impls() []string { return benchImpls.names() }

// About returns a one-line description of the implementation name, or "".
func About(name string) string { return benchImpls.about(name) }

// benchCloserFunc adapts a func to io.Closer.
type benchCloserFunc func() error

func (f benchCloserFunc) Close() error { return f() }

// benchConnServer runs an accept loop that hands each connection to handle
// in its own goroutine, for the implementations that speak plain TCP. Close
// closes the listener and every open connection and waits for the
// goroutines.
type benchConnServer struct {
	l      net.Listener
	handle func(net.Conn)

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func benchServeConns(l net.Listener, handle func(net.Conn)) *benchConnServer {
	s := &benchConnServer{l: l, handle: handle, conns: make(map[net.Conn]struct{})}
	s.wg.Add(1)
	go s.accept()
	return s
}

func (s *benchConnServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			return // closed; a benchmark has no use for retrying
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
			s.handle(c)
		}()
	}
}

func (s *benchConnServer) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	err := s.l.Close()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}
