package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// rawImpl is the floor: a 4-byte big-endian length, then the payload, echoed
// back on the same connection. One call owns a connection at a time; the
// client keeps idle connections in a pool and dials when none is free, as an
// HTTP/1.1 client does.
type rawImpl struct{}

func init() {
	benchImpls.register("raw", 0, "raw TCP ping-pong: 4-byte length prefix + payload, echoed; pooled connections", rawImpl{})
}

// rawMaxFrame bounds a frame, so a stray client cannot make the server
// allocate without limit.
const rawMaxFrame = 16 << 20

func (rawImpl) serve(l net.Listener) (io.Closer, error) {
	return benchServeConns(l, rawServeConn), nil
}

// rawServeConn echoes frames until the peer closes, reusing one buffer.
func rawServeConn(c net.Conn) {
	br := bufio.NewReaderSize(c, 32<<10)
	buf := make([]byte, 4, 4+4096)
	for {
		if _, err := io.ReadFull(br, buf[:4]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(buf[:4])
		if n > rawMaxFrame {
			return
		}
		buf = rawResize(buf, int(n))
		if _, err := io.ReadFull(br, buf[4:]); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// rawResize returns buf resized to 4+n bytes, keeping its first 4.
func rawResize(buf []byte, n int) []byte {
	if cap(buf) < 4+n {
		nb := make([]byte, 4+n)
		copy(nb, buf[:4])
		return nb
	}
	return buf[:4+n]
}

func (rawImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	p := &rawPool{addr: addr}
	return p.call, p, nil
}

// rawPool holds idle client connections.
type rawPool struct {
	addr string

	mu     sync.Mutex
	idle   []*rawConn
	closed bool
}

type rawConn struct {
	c    net.Conn
	br   *bufio.Reader
	wbuf []byte
}

func (p *rawPool) get(ctx context.Context) (*rawConn, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, errors.New("bench: raw client closed")
	}
	if n := len(p.idle); n > 0 {
		rc := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return rc, nil
	}
	p.mu.Unlock()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, err
	}
	return &rawConn{c: c, br: bufio.NewReaderSize(c, 32<<10), wbuf: make([]byte, 0, 4+4096)}, nil
}

func (p *rawPool) put(rc *rawConn) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		rc.c.Close()
		return
	}
	p.idle = append(p.idle, rc)
	p.mu.Unlock()
}

func (p *rawPool) call(ctx context.Context, payload []byte) ([]byte, error) {
	rc, err := p.get(ctx)
	if err != nil {
		return nil, err
	}
	rc.wbuf = binary.BigEndian.AppendUint32(rc.wbuf[:0], uint32(len(payload)))
	rc.wbuf = append(rc.wbuf, payload...)
	if _, err := rc.c.Write(rc.wbuf); err != nil {
		rc.c.Close()
		return nil, err
	}
	var hdr [4]byte
	if _, err := io.ReadFull(rc.br, hdr[:]); err != nil {
		rc.c.Close()
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > rawMaxFrame {
		rc.c.Close()
		return nil, fmt.Errorf("bench: raw frame of %d bytes", n)
	}
	out := make([]byte, n)
	if _, err := io.ReadFull(rc.br, out); err != nil {
		rc.c.Close()
		return nil, err
	}
	p.put(rc)
	return out, nil
}

func (p *rawPool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, rc := range p.idle {
		rc.c.Close()
	}
	p.idle = nil
	return nil
}
