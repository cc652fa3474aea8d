package micro

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// The fast path's client: keep-alive connections by node, shared by
// pipelining (RFC 9112 §9.3.2) once a node has maxConns of them.
//
// A call takes an idle connection if there is one (checked alive first), or
// dials one while the node has fewer than maxConns. Once maxConns are busy
// (or being checked) it joins the busy connection with the fewest calls in
// flight, unless every one holds maxDepth calls or an unanswered call older
// than maxWait (a slow handler would hold every reply behind it); then it
// waits for a connection being dialed or checked, or dials one more.
//
// Writes: the caller that finds nobody writing writes what is queued, its
// own request and those of callers that join meanwhile, in one write. A
// request made while a caller reads replies already in the buffer waits for
// that caller, who writes it before it waits on the network. Small requests
// are written under no caller's deadline, and a write that would block for
// longer than http1SpillAfter goes on in a goroutine, so that the caller
// whose turn it is to read never waits in a write. No call joins a
// connection while such a write is under way (the server is not reading),
// and once every call on it has its reply the write has http1OrphanWrite
// left, or none after Client.Close: a server that answered early and then
// neither reads nor closes does not hold the goroutine.
// Reads: replies come in request order. The caller whose reply is next reads
// it from the connection in its own goroutine, then hands the read turn to
// the next caller, whose reply is often in the buffer already. A lone caller
// writes, reads and returns with no goroutine hand-off.
//
// Giving up: a caller whose context or deadline ends while it waits for its
// turn leaves its call abandoned, and whoever reads next discards its reply.
// One that ends while reading (its deadline is then the connection's read
// deadline; a cancellation sets a past one) leaves what it did not read for
// the next reader to discard, and hands on the turn. A connection left with
// only abandoned replies is closed.
//
// Failure: a broken connection fails every call on it. A call whose request
// was not wholly written is retried on another connection; one that was is
// not (it may have run), except the calls after a reply that said
// Connection: close, which the server did not serve (RFC 9112 §9.6).

// http1Client is a client's connections, by node address.
type http1Client struct {
	dialer      net.Dialer
	maxIdle     int           // idle connections kept per node
	idleTimeout time.Duration // idle connections older than this are closed
	maxConns    int           // connections per node before calls share them
	maxDepth    int           // calls in flight on one shared connection, at most
	maxWait     time.Duration // no call joins one waiting longer than this

	enqueued func() // tests: called (under locks) as a call joins a connection

	shut atomic.Bool // close has begun: closed, readable under a connection's lock

	mu     sync.Mutex
	nodes  map[string]*http1Node
	swept  time.Time // when idle connections were last checked for age
	closed bool
}

// http1Node is one node's connections. Guarded by http1Client.mu.
type http1Node struct {
	idle    []*http1ClientConn // nothing in flight; the last went idle last
	busy    []*http1ClientConn // calls in flight, open to more
	open    int                // connections counted: idle, busy, being dialed or checked
	dialing int                // connections being dialed
	claimed int                // connections taken from idle, being checked
	ready   chan struct{}      // closed when a dial or a check ends; nil if nobody waits
}

// http1ClientConn is one connection. Lock order: http1Client.mu, then mu,
// then dlMu.
type http1ClientConn struct {
	c     net.Conn
	probe *http1Prober  // checks it is alive before reuse
	br    *bufio.Reader // reads through rd
	rd    http1ConnSource
	addr  string
	node  *http1Node
	p     *http1Client

	// Guarded by http1Client.mu.
	used    time.Time // when it went idle
	isIdle  bool
	isBusy  bool
	dropped bool // no longer counted in node.open

	mu       sync.Mutex
	queue    []*http1Wait  // calls whose replies are unread, in request order
	qarr     [4]*http1Wait // queue's array while it is short
	reading  bool          // a caller holds the read turn
	inRead   bool          // it waits on the network
	skip     int64         // bytes of an abandoned reply's body still to discard
	wq       []http1Seg    // requests queued for the next write
	wbytes   int           // bytes in wq
	wcalls   []*http1Wait  // the calls in wq (a server may answer before a request is written, so not the end of queue)
	writing  bool          // a caller is writing
	spilling bool          // the writing goes on in a goroutine (see http1SpillAfter)
	inWrite  []*http1Wait  // the calls of the write under way; the writer's
	wspare   []http1Seg    // the writer's
	wbufs    net.Buffers   // the writer's
	wdl      time.Time     // the writer's: the spill deadline set last; zero if another
	fromIdle bool          // taken from idle, and no reply read since
	broken   error         // once set, nothing more goes on the connection
	settle   sync.Cond     // on mu: a write's calls were settled (written, or not)

	// The caller whose deadline and cancellation the connection's write and
	// read deadlines serve.
	dlMu   sync.Mutex
	writer *http1Call
	reader *http1Call
}

// http1ConnSource is what a connection's reader reads from: before it waits
// on the network, it writes the requests queued meanwhile.
type http1ConnSource struct{ cc *http1ClientConn }

func (r *http1ConnSource) Read(b []byte) (int, error) {
	cc := r.cc
	cc.mu.Lock()
	for len(cc.wq) > 0 && !cc.writing && cc.broken == nil {
		cc.writing = true
		cc.p.writeLoop(cc, false, false) // releases cc.mu
		cc.mu.Lock()
	}
	cc.inRead = true // in the same hold of mu that saw nothing left to write
	cc.mu.Unlock()
	n, err := cc.c.Read(b)
	cc.mu.Lock()
	cc.inRead = false
	cc.mu.Unlock()
	return n, err
}

// http1Seg is a piece of a write: a pooled buffer of requests, or a large
// body written uncopied.
type http1Seg struct {
	bp  *[]byte
	big []byte
}

// http1Wait is a call's place on a connection. Guarded by the connection's mu.
type http1Wait struct {
	state   int8
	end     int  // where the request ends in the write that carries it
	handed  bool // its request went to a write: it may run
	written bool // and was wholly written
	settled bool // its writer has said which (written, retry)
	retry   bool // it failed without reaching the server: may go elsewhere
	head    bool // its reply's head was read
	err     error
	turn    chan struct{} // made when the caller must wait; 1-buffered
	since   time.Time
}

// The states of an http1Wait.
const (
	http1Queued int8 = iota // written or to be written, its reply to come
	http1Turn               // its caller holds the read turn
	http1Gone               // its caller gave up; the reply is to be discarded
	http1Failed             // the connection failed under it: err says why
)

var (
	errHTTP1Ended     = errors.New("micro: the server closed the connection after an earlier reply")
	errHTTP1Stray     = errors.New("micro: bytes past the last reply")
	errHTTP1Abandoned = errors.New("micro: every call left on the connection gave up")
)

func newHTTP1Client() *http1Client {
	return &http1Client{
		dialer:      net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second},
		maxIdle:     256,
		idleTimeout: 90 * time.Second,
		maxConns:    4,
		maxDepth:    16,
		maxWait:     time.Millisecond,
		nodes:       make(map[string]*http1Node),
	}
}

// roundTrip makes one attempt. A call that failed without reaching the
// server (a reused connection found dead, a connection that broke before
// its request was written, or requests after a Connection: close) goes once
// more, on a fresh connection. Sent says the request may have reached the
// server. With headers, the reply's headers are kept even on success.
func (p *http1Client) roundTrip(ctx context.Context, call *http1Call, maxRsp int64, headers bool) (head http1Head, body *[]byte, sent bool, err error) {
	for fresh := false; ; fresh = true {
		if fresh { // the first attempt's place may still be referred to, and written
			call = &http1Call{addr: call.addr, path: call.path, codec: call.codec, body: call.body, md: call.md, deadline: call.deadline}
		}
		cc, err := p.start(ctx, call, fresh)
		if err != nil {
			return http1Head{}, nil, false, err
		}
		head, body, sent, retry, err := p.finish(ctx, cc, call, maxRsp, headers)
		if err != nil && retry && !fresh && ctx.Err() == nil {
			continue
		}
		return head, body, sent, err
	}
}

// start queues call on a connection and writes, unless a write under way
// takes it along.
func (p *http1Client) start(ctx context.Context, call *http1Call, fresh bool) (*http1ClientConn, error) {
	now := time.Now()
	call.w.since = now
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	small := len(call.body) <= 64<<10
	var n *http1Node
	for {
		if n = p.nodes[call.addr]; n == nil {
			n = &http1Node{}
			p.nodes[call.addr] = n
		}
		if fresh {
			break
		}
		// maxConns busy: share the one with the fewest calls.
		if small && len(n.busy)+n.claimed >= p.maxConns {
			if cc := p.pickLocked(n, now); cc != nil {
				if p.enqueueLocked(cc, call) {
					p.mu.Unlock()
					p.write(ctx, cc, call)
				} else {
					p.mu.Unlock()
				}
				return cc, nil
			}
		}
		if len(n.idle) > 0 {
			cc := n.idle[len(n.idle)-1]
			n.idle[len(n.idle)-1] = nil
			n.idle = n.idle[:len(n.idle)-1]
			cc.isIdle = false
			n.claimed++
			p.mu.Unlock()
			// A connection the server has closed, or that holds bytes we
			// did not ask for, is dropped before anything is written on it.
			ok := now.Sub(cc.used) < p.idleTimeout && cc.br.Buffered() == 0 && cc.probe.check()
			p.mu.Lock()
			n.claimed--
			n.wake()
			if ok && !p.closed {
				cc.fromIdle = true
				if p.enqueueLocked(cc, call) {
					p.mu.Unlock()
					p.write(ctx, cc, call)
				} else {
					p.mu.Unlock()
				}
				if !small {
					p.publish(cc)
				}
				return cc, nil
			}
			p.dropLocked(cc)
			cc.c.Close()
			if p.closed {
				p.mu.Unlock()
				return nil, ErrClosed
			}
			continue
		}
		if n.open < p.maxConns || n.dialing+n.claimed == 0 || !small {
			break
		}
		// Enough connections are being dialed or checked: wait for one,
		// to share it.
		if n.ready == nil {
			n.ready = make(chan struct{})
		}
		ch := n.ready
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrClosed
		}
	}
	n.open++
	n.dialing++
	p.mu.Unlock()

	d := p.dialer
	d.Deadline = call.deadline
	c, err := d.DialContext(ctx, "tcp", call.addr)
	p.mu.Lock()
	n.dialing--
	n.wake()
	if err == nil && p.closed {
		c.Close()
		err = ErrClosed
	}
	if err != nil {
		n.open--
		p.mu.Unlock()
		return nil, err
	}
	cc := &http1ClientConn{c: c, probe: newHTTP1Prober(c), addr: call.addr, node: n, p: p}
	cc.rd.cc = cc
	cc.settle.L = &cc.mu
	cc.br = bufio.NewReaderSize(&cc.rd, http1ReadBuffer)
	p.enqueueLocked(cc, call) // new: nobody else can write
	p.mu.Unlock()
	p.write(ctx, cc, call)
	if !small {
		p.publish(cc)
	}
	return cc, nil
}

// wake lets callers waiting for a connection being dialed or checked look
// again. Called with http1Client.mu held.
func (n *http1Node) wake() {
	if n.ready != nil {
		close(n.ready)
		n.ready = nil
	}
}

// pickLocked returns the busy connection with the fewest calls in flight
// that takes one more, or nil.
func (p *http1Client) pickLocked(n *http1Node, now time.Time) *http1ClientConn {
	var best *http1ClientConn
	bestLen := p.maxDepth
	for _, cc := range n.busy {
		cc.mu.Lock()
		l := len(cc.queue)
		// Not behind a write that spilled: the server is not reading.
		ok := cc.broken == nil && !cc.spilling && l < bestLen && (l == 0 || now.Sub(cc.queue[0].since) < p.maxWait)
		cc.mu.Unlock()
		if ok {
			best, bestLen = cc, l
		}
	}
	return best
}

// enqueueLocked queues call's request on cc. Called with p.mu held. A
// large body is not copied, so its call must write it before anything
// else can: its connection (idle or new) is made busy, and so visible to
// other callers, only by publish after the write; other connections are made
// busy here.
func (p *http1Client) enqueueLocked(cc *http1ClientConn, call *http1Call) (write bool) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.broken != nil { // it broke between the pick and now: the call fails unsent
		call.w.state, call.w.err, call.w.retry = http1Failed, cc.broken, true
		return false
	}
	big := len(call.body) > 64<<10
	if !big && !cc.isBusy {
		cc.isBusy = true
		cc.node.busy = append(cc.node.busy, cc)
	}
	if n := len(cc.wq); n == 0 || cc.wq[n-1].bp == nil {
		cc.wq = append(cc.wq, http1Seg{bp: http1GetBuf(256 + min(len(call.body), 64<<10))})
	}
	bp := cc.wq[len(cc.wq)-1].bp
	before := len(*bp)
	*bp = http1AppendRequest(*bp, call)
	if !big {
		*bp = append(*bp, call.body...)
		cc.wbytes += len(*bp) - before
	} else {
		cc.wbytes += len(*bp) - before + len(call.body)
		cc.wq = append(cc.wq, http1Seg{big: call.body})
	}
	call.w.end = cc.wbytes
	cc.wcalls = append(cc.wcalls, &call.w)
	if len(cc.queue) == 0 {
		cc.queue = cc.qarr[:0]
	}
	cc.queue = append(cc.queue, &call.w)
	if p.enqueued != nil {
		p.enqueued()
	}
	// A caller reading replies from the buffer, not waiting on the network,
	// writes this before it waits: requests made while a batch of replies is
	// read leave together.
	return big || !cc.reading || cc.inRead
}

// publish makes cc, which carried a large body, busy: open to other calls.
func (p *http1Client) publish(cc *http1ClientConn) {
	p.mu.Lock()
	cc.mu.Lock()
	if cc.broken == nil && !cc.isBusy && !cc.dropped {
		cc.isBusy = true
		cc.node.busy = append(cc.node.busy, cc)
	}
	cc.mu.Unlock()
	p.mu.Unlock()
}

// http1SpillAfter is how long a caller's write of small requests may block
// before the rest of it goes on in a goroutine of its own. The caller may be
// the one to read the next replies, and a server blocked writing those reads
// no more requests: a caller blocked in a write must not hold up the reading.
const http1SpillAfter = time.Millisecond

// http1OrphanWrite is how long a spilled write may go on once every call on
// its connection has its reply: the bytes left are of requests the server
// has answered, and a server that neither reads them nor closes would hold
// the goroutine, and the connection, for ever. Client.Close ends it at once.
const http1OrphanWrite = time.Second

// write writes what is queued on cc, unless another caller is writing: that
// one takes the queued requests along. Small requests, perhaps other
// callers' too, are written under no caller's deadline: one caller giving up
// does not break the connection for the others, and a write that would
// block goes on in a goroutine (see http1SpillAfter). A large body (written
// alone: its connection is busy only after it) is written by its caller,
// by its deadline, and stops when ctx ends.
func (p *http1Client) write(ctx context.Context, cc *http1ClientConn, call *http1Call) {
	cc.mu.Lock()
	if cc.writing || len(cc.wq) == 0 || cc.broken != nil {
		cc.mu.Unlock()
		return
	}
	cc.writing = true
	big := len(call.body) > 64<<10
	if big {
		if ctx.Done() != nil {
			stop := context.AfterFunc(ctx, func() {
				cc.dlMu.Lock()
				if cc.writer == call {
					cc.c.SetWriteDeadline(http1Past)
				}
				cc.dlMu.Unlock()
			})
			defer stop()
		}
		cc.wdl = time.Time{}
		cc.dlMu.Lock()
		cc.writer = call
		if ctx.Err() != nil {
			cc.c.SetWriteDeadline(http1Past)
		} else {
			cc.c.SetWriteDeadline(call.deadline)
		}
		cc.dlMu.Unlock()
		defer func() {
			cc.dlMu.Lock()
			cc.writer = nil
			cc.dlMu.Unlock()
		}()
	}
	p.writeLoop(cc, big, false)
}

// writeLoop writes batches while requests are queued. It is called with
// cc.mu held and cc.writing set, and returns with cc.mu released and
// cc.writing cleared, or handed to a goroutine that goes on writing.
func (p *http1Client) writeLoop(cc *http1ClientConn, big, spilled bool) {
	for len(cc.wq) > 0 && cc.broken == nil {
		segs := cc.wq
		cc.wq, cc.wspare = cc.wspare[:0], nil
		clear(cc.inWrite)
		cc.inWrite, cc.wcalls = cc.wcalls, cc.inWrite[:0]
		for _, w := range cc.inWrite {
			w.handed = true
		}
		cc.wbytes = 0
		cc.mu.Unlock()
		bufs := cc.wbufs[:0]
		for _, sg := range segs {
			if sg.bp != nil {
				bufs = append(bufs, *sg.bp)
			} else {
				bufs = append(bufs, sg.big)
			}
		}
		cc.wbufs = bufs
		if !big && !spilled {
			// Setting a deadline costs; one set up to half a spill ago
			// still serves.
			if now := time.Now(); cc.wdl.Sub(now) < http1SpillAfter/2 {
				cc.wdl = now.Add(http1SpillAfter)
				cc.c.SetWriteDeadline(cc.wdl)
			}
		}
		n, err := bufs.WriteTo(cc.c) // consumes bufs, not cc.wbufs
		if err != nil && !big && !spilled && errors.Is(err, os.ErrDeadlineExceeded) {
			// The rest goes on in a goroutine of its own, under no deadline
			// until a reader or Close sets one (see http1OrphanWrite).
			cc.wdl = time.Time{}
			cc.c.SetWriteDeadline(time.Time{})
			cc.mu.Lock()
			cc.spilling = true
			cc.mu.Unlock()
			go func() {
				m, err := bufs.WriteTo(cc.c)
				if p.wrote(cc, segs, n+m, err, true) {
					p.writeLoop(cc, false, true)
				}
			}()
			return
		}
		if !p.wrote(cc, segs, n, err, spilled) {
			return
		}
	}
	cc.writing, cc.spilling = false, false
	// A goroutine that wrote the last of it may leave nothing in flight:
	// nobody else would make the connection idle.
	idle := spilled && cc.broken == nil && !cc.reading && len(cc.queue) == 0
	cc.mu.Unlock()
	if idle {
		p.put(cc)
	}
}

// wrote settles a write of segs that wrote n bytes. It returns with cc.mu
// held and true, or, when the write failed, with cc.mu released, writing
// cleared and cc failed.
func (p *http1Client) wrote(cc *http1ClientConn, segs []http1Seg, n int64, err error, spilled bool) bool {
	clear(cc.wbufs)
	for _, sg := range segs {
		if sg.bp != nil {
			http1PutBuf(sg.bp)
		}
	}
	clear(segs)
	cc.mu.Lock()
	cc.wspare = segs[:0]
	defer cc.settle.Broadcast()
	if err == nil {
		for _, w := range cc.inWrite {
			w.written, w.settled = true, true
		}
		return true
	}
	// A connection reused from idle that fails at once was closed by the
	// server before our requests: they were not served. Not after a spill:
	// by then the server may have been busy with them.
	stale := !spilled && cc.fromIdle && http1Stale(err)
	for _, w := range cc.inWrite {
		w.written = int64(w.end) <= n
		w.retry = !w.written || stale
		w.settled = true
	}
	clear(cc.inWrite)
	cc.failLocked(err, false)
	cc.writing, cc.spilling = false, false
	cc.mu.Unlock()
	p.drop(cc)
	return false
}

// finish waits for call's turn to read, reads its reply, and hands on the
// turn. Sent says the request may have reached the server; retry that it
// did not, or was not served, and may go to another connection. Both are
// read from call's place under the connection's lock: once finish returns,
// others may still touch the place of a call that gave up.
func (p *http1Client) finish(ctx context.Context, cc *http1ClientConn, call *http1Call, maxRsp int64, headers bool) (_ http1Head, _ *[]byte, sent, retry bool, _ error) {
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() {
			cc.dlMu.Lock()
			if cc.reader == call {
				cc.c.SetReadDeadline(http1Past)
			}
			cc.dlMu.Unlock()
		})
		defer stop()
	}
	w := &call.w
	cc.mu.Lock()
	if w.state == http1Queued && !cc.reading {
		cc.passTurnLocked() // to the first caller still waiting: maybe this one
	}
	if w.state == http1Queued {
		w.turn = make(chan struct{}, 1)
		cc.mu.Unlock()
		var timeout <-chan time.Time
		if d, ok := ctx.Deadline(); !call.deadline.IsZero() && (!ok || d.After(call.deadline)) {
			t := time.NewTimer(time.Until(call.deadline))
			defer t.Stop()
			timeout = t.C
		}
		var gave error
		select {
		case <-w.turn:
		case <-ctx.Done():
			gave = ctx.Err()
		case <-timeout:
			gave = os.ErrDeadlineExceeded
		}
		cc.mu.Lock()
		if w.state == http1Queued {
			w.state = http1Gone
			sent = w.handed
			cc.mu.Unlock()
			return http1Head{}, nil, sent, false, gave
		}
	}
	if w.state == http1Failed {
		cc.awaitSettledLocked(w)
		err, sent, retry := w.err, w.handed && !w.retry, w.retry
		cc.mu.Unlock()
		return http1Head{}, nil, sent, retry, err
	}
	cc.mu.Unlock()

	// This caller holds the read turn.
	cc.dlMu.Lock()
	cc.reader = call
	cc.c.SetReadDeadline(call.deadline)
	cc.dlMu.Unlock()
	var head http1Head
	var out *[]byte
	err := ctx.Err()
	if err == nil && !call.deadline.IsZero() && !time.Now().Before(call.deadline) {
		err = os.ErrDeadlineExceeded
	}
	resumable := true
	if err == nil {
		head, out, resumable, err = cc.readTurn(call, maxRsp, headers)
	}
	cc.dlMu.Lock()
	cc.reader = nil
	cc.dlMu.Unlock()

	cc.mu.Lock()
	switch {
	case err == nil && cc.broken != nil:
		// Another caller's write failed while this reply was read: it is
		// whole, and this call is done.
	case err == nil:
		cc.popLocked(w)
		cc.fromIdle = false
		switch {
		case head.close:
			cc.failLocked(errHTTP1Ended, head.final) // if it said so, the calls after it were not served
		case len(cc.queue) == 0 && cc.br.Buffered() > 0:
			cc.failLocked(errHTTP1Stray, false)
		default:
			cc.passTurnLocked()
		}
	case resumable && (errors.Is(err, os.ErrDeadlineExceeded) || err == ctx.Err()):
		// This caller gave up; the next reader discards the rest of its reply.
		if w.head {
			cc.popLocked(w)
		} else {
			w.state = http1Gone
		}
		cc.passTurnLocked()
	default:
		cc.failLocked(err, errors.Is(err, errHTTP1Ended) && head.final)
	}
	broken := cc.broken != nil
	idle := !broken && !cc.reading && len(cc.queue) == 0 && len(cc.wq) == 0 && !cc.writing
	if !broken && !cc.reading && len(cc.queue) == 0 && cc.spilling {
		if p.shut.Load() { // Client.Close came first
			cc.c.SetWriteDeadline(http1Past)
		} else {
			cc.c.SetWriteDeadline(time.Now().Add(http1OrphanWrite))
		}
	}
	if broken {
		cc.awaitSettledLocked(w)
	}
	sent, retry = w.handed && !w.retry, w.retry
	if err == nil {
		sent, retry = true, false
	}
	cc.mu.Unlock()
	if broken {
		p.drop(cc)
	} else if idle {
		p.put(cc)
	}
	if err != nil && out != nil {
		http1PutBuf(out)
		out = nil
	}
	return head, out, sent, retry, err
}

// readTurn reads replies, discarding those of callers who gave up, up to
// and including call's. Resumable says the connection is still in step
// after an error: it stopped between reads, and skip says what is left of a
// reply that was begun.
func (cc *http1ClientConn) readTurn(call *http1Call, maxRsp int64, headers bool) (head http1Head, out *[]byte, resumable bool, err error) {
	for informational := 0; ; {
		if cc.skip > 0 {
			n, err := cc.br.Discard(int(min(cc.skip, 1<<30)))
			cc.skip -= int64(n)
			if err != nil {
				return head, nil, true, err
			}
			continue
		}
		cc.mu.Lock()
		if cc.broken != nil { // another caller's write failed
			err := cc.broken
			cc.mu.Unlock()
			return head, nil, false, err
		}
		w := cc.queue[0]
		cc.mu.Unlock()
		mine := w == &call.w
		if _, err := http1PeekHead(cc.br, cc.br.Size()); err != nil {
			return head, nil, true, err
		}
		h, pre, err := http1ReadHead(cc.br, call.codec.ContentType(), headers && mine, maxRsp)
		if err != nil {
			return h, nil, false, err
		}
		if h.status < 200 {
			if h.status == http.StatusSwitchingProtocols || informational == 5 {
				return h, nil, false, errors.New("micro: reply " + http.StatusText(h.status) + " where a final reply was due")
			}
			informational++
			continue
		}
		informational = 0
		if h.length > maxRsp {
			return h, nil, false, Errorf(CodeResourceExhausted, "micro: response larger than %d bytes", maxRsp)
		}
		if !mine { // a reply nobody waits for
			if pre == nil {
				cc.skip = h.length
			}
			cc.mu.Lock()
			cc.popLocked(w)
			cc.mu.Unlock()
			if h.close {
				return h, nil, false, errHTTP1Ended
			}
			continue
		}
		w.head = true
		out = http1GetBuf(0)
		if pre != nil {
			*out = append(*out, pre...)
			return h, out, true, nil
		}
		if err := http1ReadN(cc.br, out, h.length); err != nil {
			cc.skip = h.length - int64(len(*out))
			http1PutBuf(out)
			return h, nil, true, err
		}
		return h, out, true, nil
	}
}

// awaitSettledLocked waits, on a failed connection, until the write that
// carries w (closed under it, so soon over) has said how much of w it wrote:
// until then whether w may go again is unknown.
func (cc *http1ClientConn) awaitSettledLocked(w *http1Wait) {
	for w.handed && !w.settled {
		cc.settle.Wait()
	}
}

// popLocked removes w, the first call, whose reply has been read; unless the
// connection failed meanwhile and let go of every call.
func (cc *http1ClientConn) popLocked(w *http1Wait) {
	if len(cc.queue) == 0 || cc.queue[0] != w {
		return
	}
	cc.queue[0] = nil
	cc.queue = cc.queue[1:]
}

// passTurnLocked gives the read turn to the first caller still waiting. A
// connection left with only abandoned replies is failed: nobody would read
// them.
func (cc *http1ClientConn) passTurnLocked() {
	cc.reading = false
	if cc.broken != nil {
		return
	}
	for _, w := range cc.queue {
		if w.state == http1Queued {
			w.state = http1Turn
			cc.reading = true
			if w.turn != nil {
				w.turn <- struct{}{}
			}
			return
		}
	}
	if len(cc.queue) > 0 || cc.skip > 0 {
		cc.failLocked(errHTTP1Abandoned, false)
	}
}

// failLocked closes cc and fails the calls still on it with err. A call
// whose request was not wholly written, or that unserved says the server
// did not serve, may be retried elsewhere.
func (cc *http1ClientConn) failLocked(err error, unserved bool) {
	if cc.broken != nil {
		return
	}
	cc.broken = err
	cc.c.Close()
	for _, w := range cc.queue {
		if w.state == http1Queued || w.state == http1Turn {
			if !w.handed || unserved { // one being written is settled by its writer
				w.retry = true
			}
			w.state, w.err = http1Failed, err
			if w.turn != nil {
				select {
				case w.turn <- struct{}{}:
				default:
				}
			}
		}
	}
	clear(cc.queue)
	cc.queue = nil
	for _, sg := range cc.wq {
		if sg.bp != nil {
			http1PutBuf(sg.bp)
		}
	}
	clear(cc.wq)
	clear(cc.wcalls)
	cc.wq, cc.wbytes, cc.wcalls = cc.wq[:0], 0, cc.wcalls[:0]
}

// drop stops counting a broken connection.
func (p *http1Client) drop(cc *http1ClientConn) {
	p.mu.Lock()
	p.dropLocked(cc)
	p.mu.Unlock()
}

func (p *http1Client) dropLocked(cc *http1ClientConn) {
	if cc.dropped {
		return
	}
	cc.dropped = true
	n := cc.node
	n.open--
	p.unbusyLocked(cc)
}

// unbusyLocked takes cc off its node's busy list.
func (p *http1Client) unbusyLocked(cc *http1ClientConn) {
	if !cc.isBusy {
		return
	}
	cc.isBusy = false
	n := cc.node
	if i := slices.Index(n.busy, cc); i >= 0 {
		n.busy = slices.Delete(n.busy, i, i+1)
	}
}

// put makes a connection with nothing in flight idle, unless a call joined
// it meanwhile. Now and then it also closes connections idle too long, to
// nodes that may be gone.
func (p *http1Client) put(cc *http1ClientConn) {
	now := time.Now()
	var stale []*http1ClientConn
	p.mu.Lock()
	cc.mu.Lock()
	// Only a busy connection goes idle: one taken from idle meanwhile, and
	// not yet busy again, is another caller's, whatever an earlier put says.
	if cc.broken != nil || cc.reading || len(cc.queue) > 0 || len(cc.wq) > 0 || cc.writing || cc.dropped || !cc.isBusy {
		cc.mu.Unlock()
		p.mu.Unlock()
		return
	}
	n := cc.node
	if p.closed || len(n.idle) >= p.maxIdle {
		cc.broken = ErrClosed
		cc.mu.Unlock()
		p.dropLocked(cc)
		p.mu.Unlock()
		cc.c.Close()
		return
	}
	cc.mu.Unlock()
	p.unbusyLocked(cc)
	cc.used, cc.isIdle = now, true
	n.idle = append(n.idle, cc)
	if now.Sub(p.swept) > p.idleTimeout/2 {
		p.swept = now
		for addr, n := range p.nodes {
			if n.open == 0 { // nothing refers to it: start holds a count while it uses one
				delete(p.nodes, addr)
				continue
			}
			fresh := n.idle[:0]
			for _, c := range n.idle {
				if now.Sub(c.used) < p.idleTimeout {
					fresh = append(fresh, c)
				} else {
					c.isIdle = false
					stale = append(stale, c)
				}
			}
			clear(n.idle[len(fresh):])
			n.idle = fresh
		}
		for _, c := range stale {
			p.dropLocked(c)
		}
	}
	p.mu.Unlock()
	for _, c := range stale {
		c.c.Close()
	}
}

// close closes the idle connections; those in use close when they go idle,
// and a spilled write whose calls all have their replies ends at once.
func (p *http1Client) close() {
	p.shut.Store(true)
	p.mu.Lock()
	p.closed = true
	var idle []*http1ClientConn
	for _, n := range p.nodes {
		for _, cc := range n.idle {
			cc.isIdle = false
			idle = append(idle, cc)
		}
		n.idle = nil
	}
	for _, cc := range idle {
		p.dropLocked(cc)
	}
	// A write that spilled on a connection whose calls all have their
	// replies serves nobody: it ends now, and its connection with it.
	for _, n := range p.nodes {
		for _, cc := range n.busy {
			cc.mu.Lock()
			if cc.spilling && len(cc.queue) == 0 {
				cc.c.SetWriteDeadline(http1Past)
			}
			cc.mu.Unlock()
		}
	}
	p.mu.Unlock()
	for _, cc := range idle {
		cc.c.Close()
	}
}

// http1Call is one call's request, as the fast path sends it, and its place
// on a connection.
type http1Call struct {
	addr     string
	path     rpcTarget
	codec    Codec
	body     []byte
	md       MD
	deadline time.Time // zero: none
	w        http1Wait
}
