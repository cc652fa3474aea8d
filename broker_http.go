package micro

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// The HTTP broker is a Service's default [Broker]. Deliveries are unary RPCs
// to the endpoint micro.Broker.Deliver (POST /micro.Broker/Deliver) on the
// subscribers' own ports, so they ride the client's pooled HTTP/1.1
// connections and the server's fast path, and pass through the server's
// [HandlerWrapper]s and the client's [CallWrapper]s like any call.
//
// Subscribers are announced in the registry: a node's metadata lists its
// subscriptions under "broker.topics" (continued in "broker.topics.2",
// ".3", ... so that each value stays under 200 bytes and each key=value fits
// one 255-byte mDNS TXT string) as comma-separated entries "topic" (a plain
// subscriber) or "topic:queue" (a member of a queue group). A publisher
// lists the registry, indexes the entries by topic, keeps the index until a
// registry watch reports a change, and delivers to every plain subscriber
// and to one member of each queue group (picked by the client's
// [Balancer]; on failure, another member). On mDNS the first publish of a
// process waits for that listing: one round trip and the settle time
// ([MDNSListSettle]), or the lookup wait if nothing on the link answers.
//
// Deliveries to one node that queue up while a request to it is in flight
// are gathered into the next request (up to 512 messages or 256 KiB), and
// each message is acknowledged on its own in the reply. When deliveries
// have waited 2 ms and no request in flight to the node has come back (a
// slow handler, or a handler publishing to its own node and waiting),
// another request is sent beside them, up to 16 in flight.
//
// The envelope of a request (content type application/octet-stream; str is
// a uvarint length and the bytes):
//
//	batch   = 0x01 count:uvarint item*count
//	item    = queue:str payload:str           ; queue "" for plain subscribers
//	payload = topic:str n:uvarint (key:str value:str)*n body:rest-of-payload
//
// and of its reply, one result per item in order:
//
//	reply   = 0x01 count:uvarint result*count
//	result  = 0x00                            ; acknowledged
//	        | 0x01                            ; not subscribed here (any more)
//	        | 0x02 code:uvarint message:str   ; the subscriber's error
//
// A malformed envelope is refused whole with [CodeInvalidArgument]; a message
// over the node's [MaxMessageSize] gets [CodeResourceExhausted] in its
// result.
const (
	brokerEndpoint     = "micro.Broker.Deliver"
	brokerMetaKey      = "broker.topics"
	brokerMetaValueMax = 200
	brokerSendersMax   = 16 // requests in flight to one node, at most (see enqueue)
	brokerBatchItems   = 512
	brokerBatchBytes   = 256 << 10
	brokerVersion      = 0x01

	// brokerStall is how long deliveries wait behind the requests in flight
	// to their node, with none of those coming back, before another request
	// (up to brokerSendersMax) is sent beside them.
	brokerStall = 2 * time.Millisecond
)

// brokerHTTP is the HTTP broker of one service: it receives deliveries on
// the service's server and publishes with the service's client.
type brokerHTTP struct {
	opts     brokerOptions
	server   *Server
	client   *Client
	table    brokerTable
	async    brokerAsync
	announce func() // re-registers the node with its current subscriptions; set before use

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // senders and the index watch

	stall time.Duration // brokerStall; tests set it

	mu      sync.Mutex
	nodes   map[string]*brokerNodeQueue
	closed  bool
	mounted bool // micro.Broker.Deliver is registered on the server

	index brokerIndex
}

func newBrokerHTTP(server *Server, client *Client, opts ...BrokerOption) *brokerHTTP {
	b := &brokerHTTP{opts: brokerDefaults(), server: server, client: client, nodes: make(map[string]*brokerNodeQueue), stall: brokerStall}
	for _, o := range opts {
		o.applyBroker(&b.opts)
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.async.init()
	return b
}

// Subscribe adds a subscriber on this node, registering the delivery
// endpoint on the server the first time, and has the node re-registered.
func (b *brokerHTTP) Subscribe(topic string, h MessageHandler, opts ...SubscribeOption) (Subscription, error) {
	if err := b.mount(); err != nil {
		return nil, err
	}
	s, err := b.table.add(topic, h, opts, b.unsubscribe)
	if err != nil {
		return nil, err
	}
	b.changed()
	return s, nil
}

func (b *brokerHTTP) unsubscribe(s *brokerSub) error {
	if b.table.remove(s) {
		b.changed()
	}
	return nil
}

func (b *brokerHTTP) changed() {
	if b.announce != nil {
		b.announce()
	}
}

// metadata returns the node metadata that announces the subscriptions.
func (b *brokerHTTP) metadata() map[string]string {
	return brokerMetadata(b.table.entries())
}

func (b *brokerHTTP) mount() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	if b.mounted {
		return nil
	}
	if err := RegisterHandler(b.server, &brokerDeliverer{b: b}, HandlerName("micro.Broker")); err != nil {
		return err
	}
	b.mounted = true
	return nil
}

// Publish delivers msg to the topic's subscribers across the network.
func (b *brokerHTTP) Publish(ctx context.Context, topic string, msg *Message, opts ...PublishOption) error {
	o, err := brokerCheckPublish(topic, msg, b.opts.maxMessage, opts)
	if err != nil {
		return err
	}
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if o.async {
		return b.async.run(ctx, &o, func(ctx context.Context) error { return b.publish(ctx, topic, msg, &o) })
	}
	return b.publish(ctx, topic, msg, &o)
}

// brokerTarget is one recipient of a topic's messages: a plain subscriber's
// node, or a queue group and its members.
type brokerTarget struct {
	queue string
	nodes []*Node
}

// brokerResult is the outcome of one delivery attempt.
type brokerResult struct {
	i    int    // the target
	node string // the address tried
	err  error
	gone bool // the node does not subscribe (any more)
}

// brokerItem is one message queued for a node.
type brokerItem struct {
	ctx     context.Context // the publisher's: not sent once it has ended
	queue   string
	payload []byte
	i       int
	res     chan<- brokerResult // buffered for every target of the publish
}

// brokerNodeQueue is the deliveries waiting for one node.
type brokerNodeQueue struct {
	addr    string
	nodes   []*Node    // just this one, for the client
	opt     CallOption // to it, no retries
	items   []*brokerItem
	senders int

	taken      uint64      // batches taken off the queue, ever
	stall      *time.Timer // runs b.unstall; nil until first needed
	stallArmed bool
	stallTaken uint64 // taken when the timer was armed
}

// brokerAttempt is the state of one target during a publish.
type brokerAttempt struct {
	node     string
	done     func(error) // the balancer's, for a queue member
	tried    []string    // members tried since the last back-off
	gone     []string    // members that no longer subscribe
	attempts int
	rounds   int
	last     error
	retryAt  time.Time
	waiting  bool
	finished bool
}

func (b *brokerHTTP) publish(ctx context.Context, topic string, msg *Message, o *publishOptions) error {
	if _, has := ctx.Deadline(); !has && o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	targets, err := b.index.targets(ctx, b, topic)
	if err != nil {
		return err
	}
	if o.delivered != nil {
		*o.delivered = 0
	}
	if len(targets) == 0 {
		return nil
	}
	payload := brokerAppendPayload(make([]byte, 0, brokerPayloadSize(topic, msg)), topic, msg)
	res := make(chan brokerResult, len(targets))
	st := make([]brokerAttempt, len(targets))
	pending, acked := len(targets), 0
	var failures []PublishFailure
	finish := func(i int, err error) {
		st[i].finished = true
		pending--
		if err != nil {
			failures = append(failures, PublishFailure{Node: st[i].node, Queue: targets[i].queue, Err: err})
		}
	}
	// send starts an attempt; false when no member of the group is left.
	send := func(i int) bool {
		t, s := targets[i], &st[i]
		addr := ""
		if t.queue == "" {
			addr = t.nodes[0].Address
		} else {
			members := t.nodes
			if len(s.gone) > 0 {
				members = slices.DeleteFunc(slices.Clone(members), func(n *Node) bool { return slices.Contains(s.gone, n.Address) })
			}
			if len(members) == 0 {
				return false
			}
			node, done, err := b.client.opts.balancer.Pick(ctx, rpcUntried(members, s.tried))
			if err != nil || node == nil {
				node, done = members[0], nil
			}
			addr, s.done = node.Address, done
		}
		s.node = addr
		b.enqueue(addr, &brokerItem{ctx: ctx, queue: t.queue, payload: payload, i: i, res: res}, len(targets) == 1)
		return true
	}
	for i := range targets {
		send(i)
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for pending > 0 {
		var timerC <-chan time.Time
		var next time.Time
		for i := range st {
			if st[i].waiting && (next.IsZero() || st[i].retryAt.Before(next)) {
				next = st[i].retryAt
			}
		}
		if !next.IsZero() {
			if timer == nil {
				timer = time.NewTimer(time.Until(next))
			} else {
				timer.Reset(time.Until(next))
			}
			timerC = timer.C
		}
		select {
		case r := <-res:
			s := &st[r.i]
			if s.finished {
				continue
			}
			if s.done != nil {
				if r.gone {
					s.done(nil)
				} else {
					s.done(r.err)
				}
				s.done = nil
			}
			switch {
			case r.err == nil && !r.gone:
				acked++
				finish(r.i, nil)
			case r.gone:
				if targets[r.i].queue == "" {
					finish(r.i, nil) // it unsubscribed: nothing to deliver
					continue
				}
				s.gone = append(s.gone, r.node)
				if !send(r.i) {
					finish(r.i, nil)
				}
			default:
				s.last = r.err
				s.attempts++
				if !brokerRetryable(r.err) || errors.Is(r.err, ErrClosed) || (o.retries >= 0 && s.attempts > o.retries) {
					finish(r.i, r.err)
					continue
				}
				if targets[r.i].queue == "" && CodeOf(r.err) == CodeUnavailable && b.ejected(r.node) {
					// A node that keeps failing (dead, but still registered)
					// is tried once per publish, not until the deadline.
					finish(r.i, fmt.Errorf("%w (node ejected after repeated failures; not retried)", r.err))
					continue
				}
				s.tried = append(s.tried, r.node)
				if t := targets[r.i]; t.queue != "" && slices.ContainsFunc(t.nodes, func(n *Node) bool {
					return !slices.Contains(s.tried, n.Address) && !slices.Contains(s.gone, n.Address)
				}) {
					send(r.i) // another member, at once
					continue
				}
				s.tried = s.tried[:0]
				s.retryAt = time.Now().Add(brokerBackoff(s.rounds))
				s.rounds++
				s.waiting = true
			}
		case <-timerC:
			now := time.Now()
			for i := range st {
				if st[i].waiting && !now.Before(st[i].retryAt) {
					st[i].waiting = false
					if !send(i) {
						finish(i, nil)
					}
				}
			}
		case <-ctx.Done():
			for i := range st {
				if !st[i].finished {
					if st[i].done != nil {
						st[i].done(ctx.Err())
						st[i].done = nil
					}
					finish(i, brokerContextError(ctx, st[i].last))
				}
			}
		}
	}
	if o.delivered != nil {
		*o.delivered = acked
	}
	if len(failures) > 0 {
		return &PublishError{Topic: topic, ID: msg.Header.Get(HeaderID), Failures: failures}
	}
	return nil
}

// ejected reports whether the client's balancer has ejected the node for
// failing repeatedly (only the built-in NodeBalancer says).
func (b *brokerHTTP) ejected(addr string) bool {
	nb, ok := b.client.opts.balancer.(*NodeBalancer)
	if !ok {
		return false
	}
	nb.mu.Lock()
	defer nb.mu.Unlock()
	st := nb.nodes[addr]
	return st != nil && nb.now().Before(st.until)
}

var brokerClosedError = &Error{Code: CodeCanceled, Message: "micro: broker closed", cause: ErrClosed}

// enqueue queues an item for a node and starts a sender for it if none
// runs. With inline (the publish has this one delivery in flight), a node
// with no sender is sent to from the caller's goroutine, saving two
// goroutine hand-offs.
//
// One request in flight to a node lets deliveries that queue meanwhile
// leave together in the next, in the biggest batches. But a request can be
// held: by a slow handler, or by a handler that publishes to its own node
// and waits, whose nested delivery queues behind the request waiting for
// it. So when deliveries wait and no request has come back for
// brokerStall, another sender starts beside the first, and so on up to
// brokerSendersMax requests in flight to the node, counting the outer one
// and any held by slow handlers: nested publishes to one node more than 15
// levels deep, counting every chain in flight to it, wait until their
// deadline. Senders end when they find the queue empty, so under a load
// whose requests take over brokerStall, more than one stays in flight.
func (b *brokerHTTP) enqueue(addr string, it *brokerItem, inline bool) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		it.res <- brokerResult{i: it.i, node: addr, err: brokerClosedError}
		return
	}
	q := b.nodes[addr]
	if q == nil {
		q = &brokerNodeQueue{addr: addr, nodes: []*Node{{ID: addr, Address: addr}}}
		q.opt = rpcOption{call: func(o *callOptions) { o.nodes, o.retries = q.nodes, 0 }}
		b.nodes[addr] = q
	}
	q.items = append(q.items, it)
	start := q.senders == 0
	inline = inline && start
	if start {
		q.senders++
		b.wg.Add(1)
	} else if !q.stallArmed {
		b.armStallLocked(q)
	}
	b.mu.Unlock()
	switch {
	case inline:
		b.sender(q, true)
	case start:
		go b.sender(q, false)
	}
}

func (b *brokerHTTP) armStallLocked(q *brokerNodeQueue) {
	q.stallArmed, q.stallTaken = true, q.taken
	if q.stall == nil {
		q.stall = time.AfterFunc(b.stall, func() { b.unstall(q) })
	} else {
		q.stall.Reset(b.stall)
	}
}

// unstall starts another sender for a node whose deliveries have waited
// brokerStall with no batch taken off its queue, and watches again while
// deliveries wait.
func (b *brokerHTTP) unstall(q *brokerNodeQueue) {
	b.mu.Lock()
	defer b.mu.Unlock()
	q.stallArmed = false
	if b.closed || b.nodes[q.addr] != q {
		return
	}
	// Deliveries whose publish has returned go now, not when a sender is
	// free: with every sender held, they would keep their payloads queued.
	q.items = slices.DeleteFunc(q.items, func(it *brokerItem) bool { return it.ctx.Err() != nil })
	if len(q.items) == 0 {
		return
	}
	started := q.taken == q.stallTaken && q.senders < brokerSendersMax
	if started {
		q.senders++
		b.wg.Add(1)
		go b.sender(q, false)
	}
	b.armStallLocked(q)
	if started {
		q.stallTaken++ // the new sender's first batch is not progress of those held
	}
}

// dropLocked forgets a node's queue once no sender runs and nothing waits.
func (b *brokerHTTP) dropLocked(q *brokerNodeQueue) {
	if q.senders == 0 && len(q.items) == 0 && b.nodes[q.addr] == q {
		delete(b.nodes, q.addr)
		if q.stall != nil {
			q.stall.Stop()
			q.stallArmed = false
		}
	}
}

// sender sends what is queued for a node, a batch at a time, until the
// queue is empty. Inline, it runs on a publisher's goroutine and sends one
// batch (its own item first), then hands what is left to a goroutine.
func (b *brokerHTTP) sender(q *brokerNodeQueue, inline bool) {
	defer b.wg.Done()
	var batch []*brokerItem
	var buf []byte
	for round := 0; ; round++ {
		if inline && round == 1 {
			b.mu.Lock()
			if len(q.items) > 0 { // more came meanwhile: a goroutine takes over this sender's turn
				b.wg.Add(1)
				go b.sender(q, false)
			} else {
				q.senders--
				b.dropLocked(q)
			}
			b.mu.Unlock()
			return
		}
		batch = batch[:0]
		size := 0
		b.mu.Lock()
		for len(q.items) > 0 && len(batch) < brokerBatchItems && (len(batch) == 0 || size+len(q.items[0].payload) <= brokerBatchBytes) {
			it := q.items[0]
			q.items[0] = nil
			q.items = q.items[1:]
			if it.ctx.Err() != nil { // its publish has returned
				continue
			}
			batch = append(batch, it)
			size += len(it.payload)
		}
		if len(batch) == 0 {
			q.senders--
			b.dropLocked(q)
			b.mu.Unlock()
			return
		}
		q.taken++
		b.mu.Unlock()
		buf = b.sendBatch(q, batch, buf[:0])
	}
}

// sendBatch delivers a batch in one request and reports each item's result.
func (b *brokerHTTP) sendBatch(q *brokerNodeQueue, batch []*brokerItem, buf []byte) []byte {
	var deadline time.Time
	for _, it := range batch {
		if d, ok := it.ctx.Deadline(); ok && d.After(deadline) {
			deadline = d
		}
	}
	size := 1 + binary.MaxVarintLen64
	for _, it := range batch {
		size += 2*binary.MaxVarintLen64 + len(it.queue) + len(it.payload)
	}
	buf = slices.Grow(buf, size)
	buf = append(buf, brokerVersion)
	buf = binary.AppendUvarint(buf, uint64(len(batch)))
	for _, it := range batch {
		buf = brokerAppendString(buf, it.queue)
		buf = binary.AppendUvarint(buf, uint64(len(it.payload)))
		buf = append(buf, it.payload...)
	}
	// The batch's deadline is its latest publisher's, given as a timeout
	// (which the client's fast path keeps aside, with no timer) rather
	// than a context with a deadline.
	opt := q.opt
	if !deadline.IsZero() {
		timeout := max(time.Until(deadline), time.Millisecond)
		opt = rpcOption{call: func(o *callOptions) {
			o.nodes, o.retries, o.timeout = q.nodes, 0, timeout
		}}
	}
	var rsp []byte
	err := b.client.call(b.ctx, &Request{Endpoint: brokerEndpoint, ContentType: ContentTypeBytes, Body: buf}, &rsp, opt)
	var results []brokerResult
	if err == nil {
		results, err = brokerParseReply(rsp, len(batch))
	}
	if err != nil {
		if b.ctx.Err() != nil {
			err = brokerClosedError
		}
		gone := CodeOf(err) == CodeUnimplemented // no delivery endpoint there: nothing subscribes
		for _, it := range batch {
			it.res <- brokerResult{i: it.i, node: q.addr, err: err, gone: gone}
		}
		return buf
	}
	for k, it := range batch {
		r := results[k]
		r.i, r.node = it.i, q.addr
		it.res <- r
	}
	return buf
}

// Close ends the node's subscriptions (and has it re-registered without
// them), fails what is queued, cancels deliveries and asynchronous
// publishes in flight, and waits for its goroutines.
func (b *brokerHTTP) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	var queued []*brokerItem
	for _, q := range b.nodes {
		queued = append(queued, q.items...)
		q.items = nil
		if q.stall != nil {
			q.stall.Stop()
		}
	}
	b.mu.Unlock()
	had := len(b.table.entries()) > 0
	b.table.close()
	for _, it := range queued {
		it.res <- brokerResult{i: it.i, err: brokerClosedError}
	}
	b.async.close()
	b.cancel()
	b.wg.Wait()
	if had {
		b.changed()
	}
	return nil
}

// brokerDeliverer serves micro.Broker.Deliver.
type brokerDeliverer struct{ b *brokerHTTP }

// Deliver runs a batch of deliveries on this node's subscribers, one after
// another, and answers each.
func (d *brokerDeliverer) Deliver(ctx context.Context, req *[]byte) (*[]byte, error) {
	items, err := brokerParseBatch(*req)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, 2+len(items))
	out = append(out, brokerVersion)
	out = binary.AppendUvarint(out, uint64(len(items)))
	for _, it := range items {
		if n := brokerMessageSize(&it.msg); n > d.b.opts.maxMessage {
			out = brokerAppendResult(out, true, Errorf(CodeResourceExhausted, "message of %d bytes is larger than %d", n, d.b.opts.maxMessage))
			continue
		}
		found, err := d.b.table.deliverLocal(ctx, it.topic, it.queue, &it.msg)
		out = brokerAppendResult(out, found, err)
	}
	return &out, nil
}

// brokerDelivery is one decoded item of a batch.
type brokerDelivery struct {
	topic, queue string
	msg          Message
}

func brokerAppendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// brokerPayloadSize bounds the size of a message's encoded payload.
func brokerPayloadSize(topic string, msg *Message) int {
	n := 2*binary.MaxVarintLen64 + len(topic) + len(msg.Body)
	for k, v := range msg.Header {
		n += 2*binary.MaxVarintLen64 + len(k) + len(v)
	}
	return n
}

// brokerAppendPayload encodes a message for delivery (see the envelope
// above).
func brokerAppendPayload(b []byte, topic string, msg *Message) []byte {
	b = brokerAppendString(b, topic)
	b = binary.AppendUvarint(b, uint64(len(msg.Header)))
	for k, v := range msg.Header {
		b = brokerAppendString(b, k)
		b = brokerAppendString(b, v)
	}
	return append(b, msg.Body...)
}

func brokerAppendResult(b []byte, found bool, err error) []byte {
	switch {
	case !found:
		return append(b, 0x01)
	case err == nil:
		return append(b, 0x00)
	}
	e := AsError(err)
	b = append(b, 0x02)
	b = binary.AppendUvarint(b, uint64(e.code()))
	return brokerAppendString(b, e.Message)
}

// brokerReader reads an envelope, remembering the first problem.
type brokerReader struct {
	b   []byte
	bad string
}

func (r *brokerReader) uvarint(what string) uint64 {
	if r.bad != "" {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.bad = "bad " + what
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *brokerReader) bytes(what string) []byte {
	n := r.uvarint(what + " length")
	if r.bad != "" {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.bad = what + " runs past the end"
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// brokerParseBatch decodes a delivery request. Bodies alias req; an item's
// topic, queue and headers share one string.
func brokerParseBatch(req []byte) ([]brokerDelivery, error) {
	if len(req) == 0 || req[0] != brokerVersion {
		return nil, Errorf(CodeInvalidArgument, "micro: malformed delivery: unknown envelope version")
	}
	r := brokerReader{b: req[1:]}
	count := r.uvarint("count")
	if count > uint64(len(r.b))/2 { // every item takes at least two bytes
		return nil, Errorf(CodeInvalidArgument, "micro: malformed delivery: count %d exceeds the body", count)
	}
	items := make([]brokerDelivery, 0, count)
	var spans []int // offsets into the payload: topic, then each header's key and value
	for i := uint64(0); i < count && r.bad == ""; i++ {
		queue := r.bytes("queue")
		payload := r.bytes("payload")
		if r.bad != "" {
			break
		}
		p := brokerReader{b: payload}
		spans = spans[:0]
		span := func(what string) {
			v := p.bytes(what)
			if p.bad == "" {
				end := len(payload) - len(p.b)
				spans = append(spans, end-len(v), end)
			}
		}
		span("topic")
		nh := p.uvarint("header count")
		if p.bad == "" && nh > uint64(len(p.b))/2 {
			p.bad = "header count exceeds the payload"
		}
		for j := uint64(0); j < nh && p.bad == ""; j++ {
			span("header name")
			span("header value")
		}
		if p.bad != "" {
			r.bad = p.bad
			break
		}
		head := string(payload[:len(payload)-len(p.b)]) // one allocation for every name
		d := brokerDelivery{topic: head[spans[0]:spans[1]], queue: string(queue)}
		if !brokerValidName(d.topic, brokerMaxTopic) || (d.queue != "" && !brokerValidName(d.queue, brokerMaxQueue)) {
			r.bad = "bad topic or queue name"
			break
		}
		if nh > 0 {
			d.msg.Header = make(MD, nh)
			for k := 2; k < len(spans); k += 4 {
				d.msg.Header[head[spans[k]:spans[k+1]]] = head[spans[k+2]:spans[k+3]]
			}
		}
		d.msg.Body = p.b
		items = append(items, d)
	}
	if r.bad == "" && len(r.b) > 0 {
		r.bad = "trailing bytes"
	}
	if r.bad != "" {
		return nil, Errorf(CodeInvalidArgument, "micro: malformed delivery: %s", r.bad)
	}
	return items, nil
}

// brokerParseReply decodes the reply to a batch of n items.
func brokerParseReply(rsp []byte, n int) ([]brokerResult, error) {
	bad := func(why string) error { return Errorf(CodeInternal, "micro: malformed delivery reply: %s", why) }
	if len(rsp) == 0 || rsp[0] != brokerVersion {
		return nil, bad("unknown version")
	}
	r := brokerReader{b: rsp[1:]}
	if c := r.uvarint("count"); r.bad == "" && c != uint64(n) {
		return nil, bad("count " + strconv.FormatUint(c, 10) + ", want " + strconv.Itoa(n))
	}
	out := make([]brokerResult, n)
	for i := 0; i < n && r.bad == ""; i++ {
		if len(r.b) == 0 {
			r.bad = "short"
			break
		}
		status := r.b[0]
		r.b = r.b[1:]
		switch status {
		case 0x00:
		case 0x01:
			out[i].gone = true
		case 0x02:
			code := r.uvarint("code")
			msg := r.bytes("message")
			if code == 0 || code > uint64(CodeUnauthenticated) {
				code = uint64(CodeUnknown)
			}
			out[i].err = &Error{Code: Code(code), Message: string(msg)}
		default:
			r.bad = "unknown status"
		}
	}
	if r.bad == "" && len(r.b) > 0 {
		r.bad = "trailing bytes"
	}
	if r.bad != "" {
		return nil, bad(r.bad)
	}
	return out, nil
}

// brokerMetadata packs subscription entries into node metadata values of at
// most brokerMetaValueMax bytes.
func brokerMetadata(entries []string) map[string]string {
	if len(entries) == 0 {
		return nil
	}
	md := map[string]string{}
	key, n := brokerMetaKey, 1
	var cur strings.Builder
	for _, e := range entries {
		if cur.Len() > 0 && cur.Len()+1+len(e) > brokerMetaValueMax {
			md[key] = cur.String()
			cur.Reset()
			n++
			key = brokerMetaKey + "." + strconv.Itoa(n)
		}
		if cur.Len() > 0 {
			cur.WriteByte(',')
		}
		cur.WriteString(e)
	}
	md[key] = cur.String()
	return md
}

// brokerParseMetadata calls fn for every valid subscription entry of a
// node's metadata.
func brokerParseMetadata(md map[string]string, fn func(topic, queue string)) {
	for k, v := range md {
		if k != brokerMetaKey && !strings.HasPrefix(k, brokerMetaKey+".") {
			continue
		}
		for _, e := range strings.Split(v, ",") {
			topic, queue, _ := strings.Cut(e, ":")
			if brokerValidName(topic, brokerMaxTopic) && (queue == "" || brokerValidName(queue, brokerMaxQueue)) {
				fn(topic, queue)
			}
		}
	}
}

// brokerIndex is a publisher's view of who subscribes to what, built from a
// registry List and kept until a watch event says the registry changed. As
// with the client's registry cache, a listing is kept only if the watch was
// live when it began and saw no change before it ended.
type brokerIndex struct {
	sf singleflight.Group

	mu      sync.Mutex
	topics  map[string][]*brokerTarget
	valid   bool
	expires time.Time
	epoch   uint64
	live    bool
	watchOn bool
	started chan struct{} // closed once the watch's first Watch call has returned; nil once waited for
}

// brokerWatchWait bounds how long the first listing waits for the index's
// registry watch to start.
const brokerWatchWait = time.Second

// brokerIndexTTL bounds how long an index lives even without watch events.
const brokerIndexTTL = time.Minute

// targets returns the recipients of topic.
func (ix *brokerIndex) targets(ctx context.Context, b *brokerHTTP, topic string) ([]*brokerTarget, error) {
	reg := b.client.opts.registry
	if reg == nil {
		return nil, Errorf(CodeFailedPrecondition, "micro: publish %s: the client has no registry to find subscribers in", topic)
	}
	ix.mu.Lock()
	if ix.valid && time.Now().Before(ix.expires) {
		t := ix.topics[topic]
		ix.mu.Unlock()
		return t, nil
	}
	var started chan struct{} // made by the first publish, which starts the watch
	if !ix.watchOn {
		started = make(chan struct{})
		ix.watchOn, ix.started = true, started
	}
	ix.mu.Unlock()
	if started != nil {
		b.mu.Lock()
		if b.closed {
			close(started)
		} else {
			b.wg.Add(1)
			go b.watch(reg, started)
		}
		b.mu.Unlock()
	}
	ch := ix.sf.DoChan("", func() (any, error) {
		// The first listing waits for the watch to start, so that it can be
		// kept: one made before would be stale at once, and the next
		// publish would list the registry again. A registry whose Watch
		// has not returned within brokerWatchWait is waited for no more.
		ix.mu.Lock()
		started := ix.started
		ix.mu.Unlock()
		if started != nil {
			t := time.NewTimer(brokerWatchWait)
			select {
			case <-started:
			case <-t.C:
			case <-b.ctx.Done():
			}
			t.Stop()
			ix.mu.Lock()
			ix.started = nil
			ix.mu.Unlock()
		}
		ix.mu.Lock()
		if ix.valid && time.Now().Before(ix.expires) {
			t := ix.topics
			ix.mu.Unlock()
			return t, nil
		}
		live, epoch := ix.live, ix.epoch
		ix.mu.Unlock()
		lctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
		defer cancel()
		services, err := reg.List(lctx)
		if err != nil {
			return nil, err
		}
		m := brokerBuildIndex(services)
		ix.mu.Lock()
		if live && ix.epoch == epoch {
			ix.topics, ix.valid, ix.expires = m, true, time.Now().Add(brokerIndexTTL)
		}
		ix.mu.Unlock()
		return m, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			if ctx.Err() != nil {
				return nil, AsError(ctx.Err())
			}
			return nil, Errorf(CodeUnavailable, "micro: publish %s: listing subscribers: %w", topic, r.Err)
		}
		return r.Val.(map[string][]*brokerTarget)[topic], nil
	case <-ctx.Done():
		return nil, AsError(ctx.Err())
	}
}

// watch invalidates the index on every registry change; if the watch fails
// it is retried with back-off, and nothing is kept meanwhile. It closes
// started once its first Watch call has returned.
func (b *brokerHTTP) watch(reg Registry, started chan struct{}) {
	defer b.wg.Done()
	defer func() {
		if started != nil { // closed before the first Watch
			close(started)
		}
	}()
	ix := &b.index
	backoff := 100 * time.Millisecond
	for b.ctx.Err() == nil {
		w, err := reg.Watch(b.ctx, "")
		if err == nil {
			backoff = 100 * time.Millisecond
			ix.mu.Lock()
			ix.live = true
			ix.epoch++
			ix.mu.Unlock()
		}
		if started != nil {
			close(started)
			started = nil
		}
		if err == nil {
			for {
				if _, err := w.Next(); err != nil {
					break
				}
				ix.mu.Lock()
				ix.epoch++
				ix.valid = false
				ix.mu.Unlock()
			}
			w.Stop()
		}
		ix.mu.Lock()
		ix.live = false
		ix.epoch++
		ix.valid = false
		ix.mu.Unlock()
		t := time.NewTimer(backoff)
		select {
		case <-b.ctx.Done():
		case <-t.C:
			backoff = min(2*backoff, 10*time.Second)
		}
		t.Stop()
	}
}

// brokerBuildIndex indexes the subscriptions the services' nodes announce.
func brokerBuildIndex(services []*ServiceInfo) map[string][]*brokerTarget {
	type key struct{ topic, queue string }
	found := map[key][]*Node{}
	for _, s := range services {
		for _, n := range s.Nodes {
			if n == nil || !rpcValidAddr(n.Address) {
				continue
			}
			brokerParseMetadata(n.Metadata, func(topic, queue string) {
				k := key{topic, queue}
				if !slices.ContainsFunc(found[k], func(m *Node) bool { return m.Address == n.Address }) {
					found[k] = append(found[k], &Node{ID: n.ID, Address: n.Address})
				}
			})
		}
	}
	out := make(map[string][]*brokerTarget)
	for _, k := range slices.SortedFunc(maps.Keys(found), func(a, b key) int {
		if c := strings.Compare(a.topic, b.topic); c != 0 {
			return c
		}
		return strings.Compare(a.queue, b.queue)
	}) {
		nodes := found[k]
		if k.queue != "" {
			out[k.topic] = append(out[k.topic], &brokerTarget{queue: k.queue, nodes: nodes})
			continue
		}
		for _, n := range nodes {
			out[k.topic] = append(out[k.topic], &brokerTarget{nodes: []*Node{n}})
		}
	}
	return out
}
