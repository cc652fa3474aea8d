package micro

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Broker is publish/subscribe messaging: a publisher sends a message on a
// topic, and every subscriber of the topic receives it, except that the
// members of a queue group ([Queue]) share the messages: each message goes to
// one member of each group.
//
// Publish returns when every subscriber it targets has acknowledged the
// message (its handler returned nil) or has failed: a subscriber's error or
// an unreachable subscriber is retried with back-off until the context ends
// (or [Retries] runs out), and what still fails is reported in a
// [*PublishError]. Delivery is at least once: a subscriber may see a message
// twice when an acknowledgement was lost (the connection broke after its
// handler ran, or its node died before answering) and the message was sent
// again, to it or to another member of its queue group. Each message carries
// an ID ([HeaderID]) so that handlers can drop repeats. A subscriber that has
// unsubscribed by the time a delivery reaches it is skipped, not failed; a
// subscriber whose node the client's balancer has ejected (it kept failing:
// dead but still registered) is tried once per publish rather than until the
// deadline.
//
// Topics are tokens of ASCII letters, digits, '_' and '-' separated by
// single dots ("user.created", "orders.eu-west.v2"), at most 128 bytes, with
// no wildcards; queue group names follow the same grammar, at most 64 bytes.
// A message's body and headers together are bounded by [MaxMessageSize].
//
// [NewMemoryBroker] serves one process. A [Service] uses the HTTP broker
// unless [WithBroker] says otherwise: deliveries travel point to point, as
// RPCs on the nodes' own ports, to subscribers found through the registry.
//
// Implementations must be safe for concurrent use.
type Broker interface {
	// Publish delivers msg to the subscribers of topic and returns once
	// each has acknowledged it or failed. With no subscriber it returns
	// nil at once ([Delivered] tells how many acknowledged). The broker
	// does not keep msg after Publish returns (unless [PublishAsync]).
	Publish(ctx context.Context, topic string, msg *Message, opts ...PublishOption) error
	// Subscribe calls h for every message published on topic until the
	// subscription ends. h may run on several goroutines at once.
	Subscribe(topic string, h MessageHandler, opts ...SubscribeOption) (Subscription, error)
	// Close ends the broker's subscriptions and its publishes in flight,
	// and waits for the goroutines it started. It is idempotent.
	Close() error
}

// Subscription is one subscriber of a topic. Its methods are safe for
// concurrent use.
type Subscription interface {
	// Topic returns the subscribed topic.
	Topic() string
	// Unsubscribe ends the subscription: no delivery to it starts once it
	// returns (the HTTP broker also re-registers the node without the
	// topic, so publishers stop targeting it). It is idempotent.
	Unsubscribe() error
}

// Message is what a broker carries: headers and a body. [Client.Publish]
// sets Content-Type, [HeaderID] and [HeaderTimestamp]. A handler must treat
// the message as read-only (other subscribers in the process may share it);
// it may keep it after returning.
type Message struct {
	Header MD
	Body   []byte
}

// MessageHandler handles one message. Returning nil acknowledges it; an
// error is reported to the publisher, which retries it unless the error's
// code is [CodeInvalidArgument], [CodePermissionDenied],
// [CodeUnauthenticated], [CodeUnimplemented] or [CodeResourceExhausted] (the
// message itself is at fault: returning one of these is how a handler
// refuses a message for good).
type MessageHandler func(ctx context.Context, msg *Message) error

// SubscriberWrapper is subscriber middleware: it wraps a subscription's
// handler. Wrappers apply in the order given, the first outermost.
type SubscriberWrapper func(MessageHandler) MessageHandler

// The message headers [Client.Publish] sets.
const (
	HeaderID        = "Micro-Id"        // a random 128-bit ID in hex, for dropping repeats
	HeaderTimestamp = "Micro-Timestamp" // when it was published, RFC 3339 with nanoseconds, UTC
	HeaderTopic     = "Micro-Topic"     // the topic it was published on
)

// Broker limits.
const (
	// DefaultMaxMessageSize bounds a message's body plus its headers,
	// unless [MaxMessageSize] says otherwise.
	DefaultMaxMessageSize = 1 << 20
	// brokerMaxTopic and brokerMaxQueue bound the names, so that an
	// announcement fits one mDNS TXT string.
	brokerMaxTopic = 128
	brokerMaxQueue = 64
)

// ErrNoBroker is returned by [Client.Publish] and [RegisterSubscriber] when
// the client or server has no broker (a Service's have one; a bare
// [NewClient] or [NewServer] needs [WithBroker]).
var ErrNoBroker = errors.New("micro: no broker; use a Service's client and server, or pass micro.WithBroker")

// PublishError reports the subscribers a publish could not reach or that
// did not acknowledge. errors.Is and errors.As see each failure's error.
type PublishError struct {
	Topic    string
	ID       string // the message's HeaderID, if it had one
	Failures []PublishFailure
}

// PublishFailure is one subscriber that failed: a node (Queue "") or a
// queue group, with the last error it gave.
type PublishFailure struct {
	Node  string // the address of the last node tried
	Queue string // the queue group, or "" for a plain subscriber
	Err   error  // the last error: the subscriber's own (an *Error), a transport failure, or the context's
}

// Error lists the failures.
func (e *PublishError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "micro: publish %s", e.Topic)
	if e.ID != "" {
		fmt.Fprintf(&b, " (id %s)", e.ID)
	}
	fmt.Fprintf(&b, ": %d subscriber(s) failed:", len(e.Failures))
	for i, f := range e.Failures {
		if i > 0 {
			b.WriteString(";")
		}
		if f.Queue != "" {
			fmt.Fprintf(&b, " queue %s (last tried %s): %v", f.Queue, f.Node, f.Err)
		} else {
			fmt.Fprintf(&b, " %s: %v", f.Node, f.Err)
		}
	}
	return b.String()
}

// Unwrap returns each failure's error.
func (e *PublishError) Unwrap() []error {
	out := make([]error, len(e.Failures))
	for i, f := range e.Failures {
		out[i] = f.Err
	}
	return out
}

// PublishOption configures one publish. Besides the options below,
// [ContentType] (how [Client.Publish] encodes), [WithMetadata] (headers),
// [RequestTimeout] (the deadline when the context has none, default 10s) and
// [Retries] (a bound on retries per subscriber; default: retry until the
// deadline) are publish options.
type PublishOption interface {
	applyPublish(*publishOptions)
}

// SubscribeOption configures one subscription: [Queue], [WrapSubscriber].
type SubscribeOption interface {
	applySubscribe(*subscribeOptions)
}

// BrokerOption configures a broker: [MaxMessageSize]. Given to a service, it
// configures the service's default broker.
type BrokerOption interface {
	ServiceOption
	applyBroker(*brokerOptions)
}

type publishOptions struct {
	contentType string
	md          MD
	timeout     time.Duration
	retries     int // -1: until the deadline
	async       bool
	done        func(error)
	delivered   *int
}

type subscribeOptions struct {
	queue    string
	wrappers []SubscriberWrapper
}

type brokerOptions struct {
	maxMessage int
}

func brokerDefaults() brokerOptions { return brokerOptions{maxMessage: DefaultMaxMessageSize} }

// brokerOption is the option type of this file: each func says what it
// configures.
type brokerOption struct {
	server    func(*serverOptions)
	broker    func(*brokerOptions)
	publish   func(*publishOptions)
	subscribe func(*subscribeOptions)
}

func (o brokerOption) applyService(s *serviceOptions) {
	if o.server != nil {
		s.serverOpts = append(s.serverOpts, o)
	}
	if o.broker != nil {
		s.brokerOpts = append(s.brokerOpts, o)
	}
}

func (o brokerOption) applyServer(s *serverOptions) {
	if o.server != nil {
		o.server(s)
	}
}

func (o brokerOption) applyBroker(b *brokerOptions) {
	if o.broker != nil {
		o.broker(b)
	}
}

func (o brokerOption) applyPublish(p *publishOptions) {
	if o.publish != nil {
		o.publish(p)
	}
}

func (o brokerOption) applySubscribe(s *subscribeOptions) {
	if o.subscribe != nil {
		o.subscribe(s)
	}
}

// applyPublish lets the call options that mean something to a publish
// (ContentType, WithMetadata, RequestTimeout, Retries) configure one.
func (o rpcOption) applyPublish(p *publishOptions) {
	if o.call == nil {
		return
	}
	c := callOptions{contentType: p.contentType, md: p.md, timeout: p.timeout, retries: -1}
	o.call(&c)
	p.contentType, p.md, p.timeout = c.contentType, c.md, c.timeout
	if c.retries >= 0 {
		p.retries = c.retries
	}
}

// WithBroker sets the broker of a service, a server ([RegisterSubscriber])
// and a client ([Client.Publish]); default: a service's own HTTP broker,
// and none for a bare server or client. The caller keeps ownership: closing
// it is theirs.
func WithBroker(b Broker) Option {
	return rpcOption{
		service: func(o *serviceOptions) { o.broker = b },
		server:  func(o *serverOptions) { o.broker = b },
		client:  func(o *clientOptions) { o.broker = b },
	}
}

// Queue makes the subscriber a member of the named queue group: each message
// on the topic goes to one member of the group (balanced; on failure,
// another), rather than to all. The name follows the topic grammar
// ([Broker]'s topics), up to 64 bytes. Default: no group.
func Queue(name string) SubscribeOption {
	return brokerOption{subscribe: func(o *subscribeOptions) { o.queue = name }}
}

// SubscriberOption is an option for a server (applying to every
// [RegisterSubscriber] on it) and for one subscription.
type SubscriberOption interface {
	ServerOption
	SubscribeOption
}

// WrapSubscriber adds subscriber middleware: given to a server or service,
// around every subscriber registered with [RegisterSubscriber] (outermost);
// given to one subscription, around its handler.
func WrapSubscriber(w ...SubscriberWrapper) SubscriberOption {
	return brokerOption{
		server:    func(o *serverOptions) { o.subWrappers = append(slices.Clip(o.subWrappers), w...) },
		subscribe: func(o *subscribeOptions) { o.wrappers = append(slices.Clip(o.wrappers), w...) },
	}
}

// PublishAsync makes Publish return as soon as the message is accepted,
// and deliver it in the background with the same retries, within the
// publish's deadline ([RequestTimeout] or 10s; the caller's context's
// cancellation does not stop it, its values are kept). done, if not nil, is
// called once with the result (the error Publish would have returned).
//
// What it gives up: the caller no longer waits for acknowledgements, so it
// learns of a failure only through done (without done, a failure is
// dropped); the message lives only in this process's memory until
// delivered, so it is lost if the process exits or the broker closes first
// (done then sees the error); messages published one after another may
// arrive in another order; and at most 1024 asynchronous publishes are
// pending per broker, beyond which Publish blocks until one finishes (or its
// context ends). For delivery that survives a crash, use event streams.
func PublishAsync(done func(error)) PublishOption {
	return brokerOption{publish: func(o *publishOptions) { o.async, o.done = true, done }}
}

// Delivered stores in *n how many subscribers (each plain subscriber and
// each queue group counting once) acknowledged the message: 0 when the topic
// had none. With [PublishAsync], it is set before done is called.
func Delivered(n *int) PublishOption {
	return brokerOption{publish: func(o *publishOptions) { o.delivered = n }}
}

// MaxMessageSize bounds a message's body plus headers (default
// [DefaultMaxMessageSize], 1 MiB). A larger publish fails with
// [CodeResourceExhausted]; so does a delivery of one to a node with a lower
// bound.
func MaxMessageSize(n int) BrokerOption {
	return brokerOption{broker: func(o *brokerOptions) {
		if n > 0 {
			o.maxMessage = n
		}
	}}
}

// Publish encodes v with the client's codec ([ContentType], default JSON)
// and publishes it on topic through the client's broker, with headers
// Content-Type, [HeaderID], [HeaderTimestamp], [HeaderTopic], the metadata
// of ctx ([NewContext]) and [WithMetadata]. A *[Message] is published as it
// is (with those headers added where it has none). See [Broker.Publish] for
// what it waits for and returns.
func (c *Client) Publish(ctx context.Context, topic string, v any, opts ...PublishOption) error {
	b := c.opts.broker
	if b == nil {
		return &Error{Code: CodeFailedPrecondition, Message: ErrNoBroker.Error(), cause: ErrNoBroker}
	}
	if c.closed.Load() {
		return &Error{Code: CodeCanceled, Message: "micro: client closed", cause: ErrClosed}
	}
	o := publishOptions{contentType: c.opts.call.contentType, md: c.opts.call.md, timeout: c.opts.call.timeout}
	for _, opt := range opts {
		opt.applyPublish(&o)
	}
	msg, ok := v.(*Message)
	if ok && msg != nil {
		m := &Message{Header: make(MD, len(msg.Header)+4), Body: msg.Body}
		for k, v := range msg.Header {
			m.Header[k] = v
		}
		msg = m
	} else {
		codec := c.codecs.get(o.contentType)
		if codec == nil {
			return Errorf(CodeInvalidArgument, "micro: no codec for content type %q", o.contentType)
		}
		body, err := codec.Marshal(v)
		if err != nil {
			return Errorf(CodeInternal, "micro: encoding the message: %w", err)
		}
		msg = &Message{Header: make(MD, 4+len(o.md)), Body: body}
		msg.Header["Content-Type"] = codec.ContentType()
	}
	if md, ok := ctx.Value(rpcOutgoingKey{}).(MD); ok {
		for k, v := range md {
			if _, set := msg.Header[k]; !set {
				msg.Header[k] = v
			}
		}
	}
	for k, v := range o.md {
		msg.Header.Set(k, v)
	}
	if msg.Header[HeaderID] == "" {
		msg.Header[HeaderID] = brokerNewID()
	}
	if msg.Header[HeaderTimestamp] == "" {
		msg.Header[HeaderTimestamp] = time.Now().UTC().Format(time.RFC3339Nano)
	}
	if msg.Header[HeaderTopic] == "" {
		msg.Header[HeaderTopic] = topic
	}
	if _, has := ctx.Deadline(); !has && o.timeout > 0 && !o.async {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	if o.async && o.timeout > 0 {
		timeout := o.timeout // the client's default, for the background publish
		opts = append(slices.Clip(opts), rpcOption{call: func(c *callOptions) { c.timeout = timeout }})
	}
	return b.Publish(ctx, topic, msg, opts...)
}

// brokerNewID returns 128 random bits in hex. The runtime's per-thread
// ChaCha8 generator makes it cheap; IDs tell messages apart, they are not
// secrets.
func brokerNewID() string {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], rand.Uint64())
	return hex.EncodeToString(b[:])
}

type brokerMessageKey struct{}

// MessageFromContext returns the message a subscriber is handling, for a
// typed subscriber ([RegisterSubscriber]) that wants its headers.
func MessageFromContext(ctx context.Context) (*Message, bool) {
	m, ok := ctx.Value(brokerMessageKey{}).(*Message)
	return m, ok
}

var brokerMessageType = reflect.TypeFor[*Message]()

// RegisterSubscriber subscribes fn to topic on the server's broker (the
// service's, or [WithBroker]'s). fn has one of the forms
//
//	func(ctx context.Context, ev *T) error         // decoded by the message's Content-Type
//	func(ctx context.Context, msg *micro.Message) error
//
// (or is a [MessageHandler]). A typed subscriber decodes with the server's
// codecs, so gob needs WithCodec(GobCodec{}) on the server; a message it
// cannot decode is refused with [CodeInvalidArgument] (not retried). A
// message with no Content-Type is read as JSON. The server's
// [WrapSubscriber] wrappers apply outermost, then opts' own.
//
// With the HTTP broker the subscription is announced in the service's
// registration; subscribe before Start, or while running (the node is then
// re-registered).
func RegisterSubscriber(topic string, s *Server, fn any, opts ...SubscribeOption) (Subscription, error) {
	if s == nil {
		return nil, errors.New("micro: RegisterSubscriber: server is nil")
	}
	b := s.opts.broker
	if b == nil {
		return nil, fmt.Errorf("micro: RegisterSubscriber(%s): %w", topic, ErrNoBroker)
	}
	h, err := brokerHandlerOf(s, fn)
	if err != nil {
		return nil, fmt.Errorf("micro: RegisterSubscriber(%s): %w", topic, err)
	}
	if len(s.opts.subWrappers) > 0 {
		opts = append([]SubscribeOption{WrapSubscriber(s.opts.subWrappers...)}, opts...)
	}
	return b.Subscribe(topic, h, opts...)
}

// brokerHandlerOf turns a subscriber func into a MessageHandler.
func brokerHandlerOf(s *Server, fn any) (MessageHandler, error) {
	switch h := fn.(type) {
	case nil:
		return nil, errors.New("subscriber is nil")
	case MessageHandler:
		return h, nil
	case func(context.Context, *Message) error:
		return h, nil
	}
	v := reflect.ValueOf(fn)
	t := v.Type()
	want := "want func(ctx context.Context, ev *T) error or func(ctx context.Context, msg *micro.Message) error"
	if t.Kind() != reflect.Func || t.NumIn() != 2 || t.NumOut() != 1 || t.In(0) != rpcContextType || t.Out(0) != rpcErrorType {
		return nil, fmt.Errorf("subscriber has type %s; %s", t, want)
	}
	if v.IsNil() {
		return nil, errors.New("subscriber is nil")
	}
	evType := t.In(1)
	if evType == brokerMessageType {
		return func(ctx context.Context, msg *Message) error {
			out := v.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(msg)})
			err, _ := out[0].Interface().(error)
			return err
		}, nil
	}
	return func(ctx context.Context, msg *Message) error {
		ct := msg.Header.Get("Content-Type")
		if ct == "" {
			ct = ContentTypeJSON
		}
		codec := s.codecs.get(ct)
		if codec == nil {
			return Errorf(CodeInvalidArgument, "micro: subscriber cannot decode content type %q", ct)
		}
		ptr := codecNew(evType)
		if err := codec.Unmarshal(msg.Body, ptr.Interface()); err != nil {
			return Errorf(CodeInvalidArgument, "micro: malformed %s message: %v", codec.ContentType(), err)
		}
		arg := ptr
		if evType.Kind() != reflect.Pointer {
			arg = ptr.Elem()
		}
		ctx = context.WithValue(ctx, brokerMessageKey{}, msg)
		out := v.Call([]reflect.Value{reflect.ValueOf(ctx), arg})
		err, _ := out[0].Interface().(error)
		return err
	}, nil
}

// brokerValidName reports whether name follows the topic grammar: tokens of
// ASCII letters, digits, '_' and '-', separated by single dots, at most max
// bytes in all ("user.created", "orders.eu-west.v2").
func brokerValidName(name string, max int) bool {
	if len(name) == 0 || len(name) > max {
		return false
	}
	prev := byte('.')
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '.':
			if prev == '.' {
				return false
			}
		case c == '_' || c == '-' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z':
		default:
			return false
		}
		prev = c
	}
	return prev != '.'
}

func brokerCheckTopic(topic string) error {
	if !brokerValidName(topic, brokerMaxTopic) {
		return Errorf(CodeInvalidArgument, "micro: bad topic %q: want dot-separated tokens of letters, digits, '_' and '-', at most %d bytes", topic, brokerMaxTopic)
	}
	return nil
}

// brokerCheckPublish validates a publish's arguments and returns its options.
func brokerCheckPublish(topic string, msg *Message, max int, opts []PublishOption) (publishOptions, error) {
	o := publishOptions{retries: -1, timeout: 10 * time.Second}
	for _, opt := range opts {
		opt.applyPublish(&o)
	}
	if err := brokerCheckTopic(topic); err != nil {
		return o, err
	}
	if msg == nil {
		return o, Errorf(CodeInvalidArgument, "micro: publish %s: message is nil", topic)
	}
	if max <= 0 {
		max = DefaultMaxMessageSize
	}
	if n := brokerMessageSize(msg); n > max {
		return o, Errorf(CodeResourceExhausted, "micro: publish %s: message of %d bytes is larger than %d", topic, n, max)
	}
	return o, nil
}

func brokerMessageSize(msg *Message) int {
	n := len(msg.Body)
	for k, v := range msg.Header {
		n += len(k) + len(v)
	}
	return n
}

// brokerRetryable reports whether a subscriber's error may go away if the
// message is sent again.
func brokerRetryable(err error) bool {
	switch CodeOf(err) {
	case CodeInvalidArgument, CodePermissionDenied, CodeUnauthenticated, CodeUnimplemented, CodeResourceExhausted:
		return false
	}
	return true
}

// brokerBackoff returns the wait before retry n (from 0): 10ms doubling to
// 1s, with ±25% jitter.
func brokerBackoff(n int) time.Duration {
	d := 10 * time.Millisecond << min(n, 7)
	d = min(d, time.Second)
	return d - d/4 + rand.N(d/2+1)
}

// brokerSleep waits d or until ctx ends, and reports whether it waited.
func brokerSleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// brokerSub is one subscription in a brokerTable.
type brokerSub struct {
	topic, queue string
	h            MessageHandler
	closed       atomic.Bool
	unsubscribe  func(*brokerSub) error
}

func (s *brokerSub) Topic() string      { return s.topic }
func (s *brokerSub) Unsubscribe() error { return s.unsubscribe(s) }

// call runs the handler; a panic becomes an internal error.
func (s *brokerSub) call(ctx context.Context, msg *Message) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = Errorf(CodeInternal, "micro: subscriber of %s panicked", s.topic)
		}
	}()
	return s.h(ctx, msg)
}

// brokerTopic is the subscribers of one topic. A brokerTable replaces it
// whole on every change, so a reader may use it without a lock.
type brokerTopic struct {
	plain  []*brokerSub
	groups []*brokerGroup // sorted by name
}

type brokerGroup struct {
	name    string
	members []*brokerSub
	next    *atomic.Uint64 // round robin, kept across changes
}

func (t *brokerTopic) group(name string) *brokerGroup {
	if t == nil {
		return nil
	}
	for _, g := range t.groups {
		if g.name == name {
			return g
		}
	}
	return nil
}

// brokerTable holds subscriptions by topic: the memory broker's, and the
// HTTP broker's for its own node.
type brokerTable struct {
	mu     sync.RWMutex
	topics map[string]*brokerTopic
	closed bool
}

func (t *brokerTable) get(topic string) *brokerTopic {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.topics[topic]
}

// add subscribes h, wrapped by the options' wrappers.
func (t *brokerTable) add(topic string, h MessageHandler, opts []SubscribeOption, unsubscribe func(*brokerSub) error) (*brokerSub, error) {
	if err := brokerCheckTopic(topic); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, Errorf(CodeInvalidArgument, "micro: subscribe %s: handler is nil", topic)
	}
	var o subscribeOptions
	for _, opt := range opts {
		opt.applySubscribe(&o)
	}
	if o.queue != "" && !brokerValidName(o.queue, brokerMaxQueue) {
		return nil, Errorf(CodeInvalidArgument, "micro: bad queue group %q: want dot-separated tokens of letters, digits, '_' and '-', at most %d bytes", o.queue, brokerMaxQueue)
	}
	for i := len(o.wrappers) - 1; i >= 0; i-- {
		h = o.wrappers[i](h)
	}
	s := &brokerSub{topic: topic, queue: o.queue, h: h, unsubscribe: unsubscribe}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	if t.topics == nil {
		t.topics = make(map[string]*brokerTopic)
	}
	old := t.topics[topic]
	nt := &brokerTopic{}
	if old != nil {
		nt.plain, nt.groups = old.plain, slices.Clone(old.groups)
	}
	if s.queue == "" {
		nt.plain = append(slices.Clip(nt.plain), s)
	} else {
		i, found := slices.BinarySearchFunc(nt.groups, s.queue, func(g *brokerGroup, name string) int { return strings.Compare(g.name, name) })
		if found {
			g := *nt.groups[i]
			g.members = append(slices.Clip(g.members), s)
			nt.groups[i] = &g
		} else {
			nt.groups = slices.Insert(nt.groups, i, &brokerGroup{name: s.queue, members: []*brokerSub{s}, next: new(atomic.Uint64)})
		}
	}
	t.topics[topic] = nt
	return s, nil
}

// remove ends s and reports whether it was subscribed.
func (t *brokerTable) remove(s *brokerSub) bool {
	if s.closed.Swap(true) {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.topics[s.topic]
	if old == nil {
		return false
	}
	nt := &brokerTopic{plain: slices.DeleteFunc(slices.Clone(old.plain), func(x *brokerSub) bool { return x == s })}
	for _, g := range old.groups {
		if g.name != s.queue {
			nt.groups = append(nt.groups, g)
			continue
		}
		members := slices.DeleteFunc(slices.Clone(g.members), func(x *brokerSub) bool { return x == s })
		if len(members) > 0 {
			nt.groups = append(nt.groups, &brokerGroup{name: g.name, members: members, next: g.next})
		}
	}
	if len(nt.plain) == 0 && len(nt.groups) == 0 {
		delete(t.topics, s.topic)
	} else {
		t.topics[s.topic] = nt
	}
	return true
}

// close ends every subscription.
func (t *brokerTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for _, tp := range t.topics {
		for _, s := range tp.plain {
			s.closed.Store(true)
		}
		for _, g := range tp.groups {
			for _, s := range g.members {
				s.closed.Store(true)
			}
		}
	}
	t.topics = nil
}

// entries lists the subscriptions as "topic" and "topic:queue", sorted, each
// once: what a node announces.
func (t *brokerTable) entries() []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var out []string
	for name, tp := range t.topics {
		if len(tp.plain) > 0 {
			out = append(out, name)
		}
		for _, g := range tp.groups {
			out = append(out, name+":"+g.name)
		}
	}
	slices.Sort(out)
	return out
}

// picker returns the member for each attempt at one message: round robin
// from the group's next position, one member further on each retry,
// skipping members that have unsubscribed (nil when none is left).
func (g *brokerGroup) picker() func(attempt int) *brokerSub {
	start := g.next.Add(1)
	return func(attempt int) *brokerSub {
		for i := 0; i < len(g.members); i++ {
			s := g.members[(start+uint64(attempt+i))%uint64(len(g.members))]
			if !s.closed.Load() {
				return s
			}
		}
		return nil
	}
}

// deliverLocal runs one delivery on this node's subscribers: every plain
// subscriber of topic (queue ""), or one member of the queue group. It
// reports false when nothing here subscribes to it.
func (t *brokerTable) deliverLocal(ctx context.Context, topic, queue string, msg *Message) (bool, error) {
	tp := t.get(topic)
	if tp == nil {
		return false, nil
	}
	if queue == "" {
		ran := false
		var first error
		for _, s := range tp.plain {
			if s.closed.Load() {
				continue
			}
			ran = true
			if err := s.call(ctx, msg); err != nil && first == nil {
				first = err
			}
		}
		return ran, first
	}
	g := tp.group(queue)
	if g == nil {
		return false, nil
	}
	s := g.picker()(0)
	if s == nil {
		return false, nil
	}
	return true, s.call(ctx, msg)
}

// MemoryBroker is a [Broker] inside one process, for tests and single
// binaries. Publish runs the handlers in the publisher's goroutine, one
// subscriber after another, and returns when each has acknowledged or failed
// (with the retries [Broker] describes). The zero value is an empty broker
// with the default options; [NewMemoryBroker] takes options. Close it when
// done with asynchronous publishes. It is safe for concurrent use.
type MemoryBroker struct {
	opts  brokerOptions
	table brokerTable
	async brokerAsync
}

// NewMemoryBroker returns an empty memory broker.
func NewMemoryBroker(opts ...BrokerOption) *MemoryBroker {
	b := &MemoryBroker{opts: brokerDefaults()}
	for _, o := range opts {
		o.applyBroker(&b.opts)
	}
	return b
}

// Publish delivers msg to every plain subscriber of topic and to one member
// of each queue group.
func (b *MemoryBroker) Publish(ctx context.Context, topic string, msg *Message, opts ...PublishOption) error {
	o, err := brokerCheckPublish(topic, msg, b.opts.maxMessage, opts)
	if err != nil {
		return err
	}
	if b.async.isClosed() {
		return ErrClosed
	}
	if o.async {
		return b.async.run(ctx, &o, func(ctx context.Context) error { return b.publish(ctx, topic, msg, &o) })
	}
	return b.publish(ctx, topic, msg, &o)
}

func (b *MemoryBroker) publish(ctx context.Context, topic string, msg *Message, o *publishOptions) error {
	// A deadline is needed only once a retry waits: made then, for speed.
	if _, has := ctx.Deadline(); !has && o.timeout > 0 {
		lazy := &brokerLazyDeadline{parent: ctx, timeout: o.timeout, start: time.Now()}
		defer lazy.stop()
		ctx = lazy
	}
	tp := b.table.get(topic)
	acked := 0
	var failures []PublishFailure
	if tp != nil {
		for _, s := range tp.plain {
			done, err := b.deliver(ctx, msg, o, func(int) *brokerSub { return s }, 1)
			switch {
			case err != nil:
				failures = append(failures, PublishFailure{Node: "local", Err: err})
			case done:
				acked++
			}
		}
		for _, g := range tp.groups {
			done, err := b.deliver(ctx, msg, o, g.picker(), len(g.members))
			switch {
			case err != nil:
				failures = append(failures, PublishFailure{Node: "local", Queue: g.name, Err: err})
			case done:
				acked++
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

// deliver runs one target until it acknowledges, fails for good, or the
// context ends; pick(n) gives the subscriber for attempt n (nil: none is
// left), and a back-off follows each round of members tries. It reports
// whether a subscriber acknowledged.
func (b *MemoryBroker) deliver(ctx context.Context, msg *Message, o *publishOptions, pick func(int) *brokerSub, members int) (bool, error) {
	var last error
	for attempt := 0; ; attempt++ {
		s := pick(attempt)
		if s == nil || s.closed.Load() {
			return false, nil // unsubscribed meanwhile
		}
		if err := ctx.Err(); err != nil {
			return false, brokerContextError(ctx, last)
		}
		err := s.call(ctx, msg)
		if err == nil {
			return true, nil
		}
		last = err
		if !brokerRetryable(err) || (o.retries >= 0 && attempt >= o.retries) {
			return false, err
		}
		if (attempt+1)%members != 0 {
			continue // another member, at once
		}
		if !brokerSleep(ctx, brokerBackoff(attempt/members)) {
			return false, brokerContextError(ctx, last)
		}
	}
}

// Subscribe adds a subscriber.
func (b *MemoryBroker) Subscribe(topic string, h MessageHandler, opts ...SubscribeOption) (Subscription, error) {
	return b.table.add(topic, h, opts, func(s *brokerSub) error {
		b.table.remove(s)
		return nil
	})
}

// Close ends every subscription, cancels the asynchronous publishes still
// pending and waits for them. Publishes after Close fail with ErrClosed.
func (b *MemoryBroker) Close() error {
	b.table.close()
	b.async.close()
	return nil
}

// brokerLazyDeadline is a context whose deadline (start+timeout) becomes a
// real timer only when Done is first asked for: a publish that never waits
// to retry costs no timer.
type brokerLazyDeadline struct {
	parent  context.Context
	timeout time.Duration
	start   time.Time

	mu      sync.Mutex
	real    context.Context
	cancel  context.CancelFunc
	stopped bool // the publish returned: the context has ended
}

func (c *brokerLazyDeadline) Deadline() (time.Time, bool) { return c.start.Add(c.timeout), true }
func (c *brokerLazyDeadline) Value(key any) any           { return c.parent.Value(key) }

func (c *brokerLazyDeadline) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.real == nil {
		c.real, c.cancel = context.WithDeadline(c.parent, c.start.Add(c.timeout))
		if c.stopped {
			c.cancel()
		}
	}
	return c.real.Done()
}

func (c *brokerLazyDeadline) Err() error {
	c.mu.Lock()
	real, stopped := c.real, c.stopped
	c.mu.Unlock()
	switch {
	case real != nil:
		return real.Err()
	case c.parent.Err() != nil:
		return c.parent.Err()
	case !time.Now().Before(c.start.Add(c.timeout)):
		return context.DeadlineExceeded
	case stopped:
		return context.Canceled
	}
	return nil
}

func (c *brokerLazyDeadline) stop() {
	c.mu.Lock()
	c.stopped = true
	cancel := c.cancel
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// brokerContextError reports a target that was still failing, or still in
// flight, when the publish's context ended.
func brokerContextError(ctx context.Context, last error) error {
	if last != nil {
		return fmt.Errorf("%w (gave up when the context ended: %v)", last, ctx.Err())
	}
	return AsError(ctx.Err())
}

// brokerAsync runs a broker's asynchronous publishes: at most
// brokerAsyncLimit at once, each on a goroutine that Close cancels and waits
// for.
type brokerAsync struct {
	once   sync.Once
	sem    chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	wg     sync.WaitGroup
	closed bool
}

const brokerAsyncLimit = 1024

func (a *brokerAsync) init() {
	a.once.Do(func() {
		a.sem = make(chan struct{}, brokerAsyncLimit)
		a.ctx, a.cancel = context.WithCancel(context.Background())
	})
}

func (a *brokerAsync) isClosed() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closed
}

// run starts publish in the background, once a slot is free.
func (a *brokerAsync) run(ctx context.Context, o *publishOptions, publish func(context.Context) error) error {
	a.init()
	select {
	case a.sem <- struct{}{}:
	case <-ctx.Done():
		return AsError(ctx.Err())
	case <-a.ctx.Done():
		return ErrClosed
	}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		<-a.sem
		return ErrClosed
	}
	a.wg.Add(1)
	a.mu.Unlock()
	// The caller's values, the broker's lifetime, and the publish's own
	// deadline.
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(a.ctx, cancel)
	if o.timeout > 0 {
		var c2 context.CancelFunc
		pctx, c2 = context.WithTimeout(pctx, o.timeout)
		prev := cancel
		cancel = func() { c2(); prev() }
	}
	go func() {
		defer a.wg.Done()
		defer func() { <-a.sem }()
		defer stop()
		defer cancel()
		err := publish(pctx)
		if a.ctx.Err() != nil && err != nil {
			err = fmt.Errorf("%w: %w", ErrClosed, err)
		}
		if o.done != nil {
			o.done(err)
		}
	}()
	return nil
}

func (a *brokerAsync) close() {
	a.init()
	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
	a.cancel()
	a.wg.Wait()
}
