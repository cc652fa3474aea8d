// Package bench measures unary RPC in micro against its peers: raw TCP,
// net/rpc, grpc-go, connect-go, stock net/http, and micro itself.
//
// Every implementation echoes a payload of bytes. [Serve] runs one
// implementation's server in its own process and answers a small control
// protocol on stdin and stdout; [Run] drives the matrix from another process,
// starting a server process for every measurement, so client and server never
// share a heap or a scheduler. The command cmd/rpcbench wraps both.
//
// An implementation lives in a file of its own and registers itself in that
// file's init with benchRegister: adding one is adding a file.
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

// benchEntry is a registered implementation.
type benchEntry struct {
	name  string
	rank  int    // position in the default order
	about string // one line for -list and the README
	impl  benchImpl
}

// benchImpls holds every implementation by name. It is written only by the
// init functions of the implementation files and never after.
var benchImpls = map[string]*benchEntry{}

func benchRegister(name string, rank int, about string, impl benchImpl) {
	if _, dup := benchImpls[name]; dup {
		panic("bench: implementation " + name + " registered twice")
	}
	benchImpls[name] = &benchEntry{name: name, rank: rank, about: about, impl: impl}
}

// Impls returns the names of the implementations in their default order: the
// floor (raw TCP) first, micro last.
func Impls() []string {
	entries := make([]*benchEntry, 0, len(benchImpls))
	for _, e := range benchImpls {
		entries = append(entries, e)
	}
	slices.SortFunc(entries, func(a, b *benchEntry) int { return a.rank - b.rank })
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.name
	}
	return names
}

// About returns a one-line description of the implementation name, or "".
func About(name string) string {
	if e, ok := benchImpls[name]; ok {
		return e.about
	}
	return ""
}

func benchLookup(name string) (benchImpl, error) {
	e, ok := benchImpls[name]
	if !ok {
		return nil, fmt.Errorf("bench: unknown implementation %q; have %v", name, Impls())
	}
	return e.impl, nil
}

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
