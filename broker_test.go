package micro

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// UserCreated is the event of the broker tests.
type UserCreated struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

// brokerRecorder records the messages a subscriber handled, by message ID.
type brokerRecorder struct {
	name string
	mu   sync.Mutex
	ids  []string
	evs  []UserCreated
}

func (r *brokerRecorder) typed(ctx context.Context, ev *UserCreated) error {
	msg, ok := MessageFromContext(ctx)
	if !ok {
		return errors.New("no message in the context")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids = append(r.ids, msg.Header.Get(HeaderID))
	r.evs = append(r.evs, *ev)
	return nil
}

func (r *brokerRecorder) raw(ctx context.Context, msg *Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids = append(r.ids, msg.Header.Get(HeaderID))
	return nil
}

func (r *brokerRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.ids)
}

func (r *brokerRecorder) seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ids)
}

// newBrokerTestRegistry returns a registry that the test closes.
func newBrokerTestRegistry(t *testing.T) *MemoryRegistry {
	reg := NewMemoryRegistry()
	t.Cleanup(func() { reg.Close() })
	return reg
}

// newSubscriberService starts a service subscribed to topic with fn.
func newSubscriberService(t *testing.T, reg Registry, name, topic string, fn any, sopts []SubscribeOption, opts ...ServiceOption) (*Service, Subscription) {
	t.Helper()
	svc := newTestService(t, name, nil, append([]ServiceOption{WithRegistry(reg)}, opts...)...)
	sub, err := RegisterSubscriber(topic, svc.Server(), fn, sopts...)
	assertNoError(t, err)
	return svc, sub
}

func TestBrokerHTTPFanOut(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	recs := make([]*brokerRecorder, 3)
	for i := range recs {
		recs[i] = &brokerRecorder{name: fmt.Sprint("sub", i)}
		newSubscriberService(t, reg, recs[i].name, "user.created", recs[i].typed, nil)
	}
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	const n = 20
	for i := 0; i < n; i++ {
		var delivered int
		err := pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: i, Name: "ada"}, Delivered(&delivered))
		assertNoError(t, err)
		assertEqual(t, delivered, 3)
	}
	for _, r := range recs {
		assertEqual(t, r.count(), n)
		for i, ev := range r.evs { // one publish at a time: each subscriber sees them in order
			assertEqual(t, ev.ID, i)
			assertEqual(t, ev.Name, "ada")
		}
	}
}

func TestBrokerHTTPQueueGroupExactlyOnce(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	recs := make([]*brokerRecorder, 3)
	for i := range recs {
		recs[i] = &brokerRecorder{name: fmt.Sprint("worker", i)}
		newSubscriberService(t, reg, "worker", "jobs.created", recs[i].raw, []SubscribeOption{Queue("workers")})
	}
	// A plain subscriber on the same topic gets every message besides.
	all := &brokerRecorder{name: "audit"}
	newSubscriberService(t, reg, "audit", "jobs.created", all.raw, nil)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))

	const n, workers = 300, 8
	ids := brokerPublishMany(t, pub.Client(), "jobs.created", n, workers, nil)
	seen := map[string]int{}
	for _, r := range recs {
		for _, id := range r.seen() {
			seen[id]++
		}
		// Spread: the balancer picks among three idle members at random,
		// so a member with under 20 of 300 has odds below 1e-12.
		if r.count() < 20 {
			t.Errorf("%s handled %d of %d messages; want them spread", r.name, r.count(), n)
		}
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Fatalf("message %s handled %d times by the queue group, want 1", id, seen[id])
		}
	}
	assertEqual(t, len(seen), n)
	assertEqual(t, all.count(), n)
}

// brokerPublishMany publishes n messages from workers goroutines and returns
// their IDs; each publish must succeed. progress, if not nil, is called
// after each acknowledged publish.
func brokerPublishMany(t *testing.T, c *Client, topic string, n, workers int, progress func(done int)) []string {
	t.Helper()
	var next, done atomic.Int64
	ids := make([]string, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				id := fmt.Sprintf("msg-%04d", i)
				ids[i] = id
				msg := &Message{Header: MD{HeaderID: id, "Content-Type": ContentTypeText}, Body: []byte("job")}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				err := c.Publish(ctx, topic, msg)
				cancel()
				if err != nil {
					errs <- fmt.Errorf("publish %s: %w", id, err)
					continue
				}
				if progress != nil {
					progress(int(done.Add(1)))
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return ids
}

// TestBrokerHTTPQueueMemberDies kills one of three queue members (its
// server closes, cutting its connections, while it stays registered) in the
// middle of 300 publishes. The guarantee is at least once: every publish
// returns nil and every message is handled by some member; a message is
// handled twice only if one of those times was on the killed member, whose
// acknowledgement may have been lost when its connections were cut.
func TestBrokerHTTPQueueMemberDies(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	recs := make([]*brokerRecorder, 3)
	svcs := make([]*Service, 3)
	for i := range recs {
		recs[i] = &brokerRecorder{name: fmt.Sprint("worker", i)}
		svcs[i], _ = newSubscriberService(t, reg, "worker", "jobs.created", recs[i].raw, []SubscribeOption{Queue("workers")})
	}
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	victim := svcs[0]
	var once sync.Once
	const n = 300
	ids := brokerPublishMany(t, pub.Client(), "jobs.created", n, 4, func(done int) {
		if done >= 60 {
			once.Do(func() { victim.Server().Close() })
		}
	})
	victimSaw := map[string]bool{}
	for _, id := range recs[0].seen() {
		victimSaw[id] = true
	}
	seen := map[string]int{}
	for _, r := range recs {
		for _, id := range r.seen() {
			seen[id]++
		}
	}
	for _, id := range ids {
		switch c := seen[id]; {
		case c == 0:
			t.Fatalf("message %s was acknowledged to the publisher but no member handled it", id)
		case c > 1 && !victimSaw[id]:
			t.Fatalf("message %s handled %d times, none of them by the killed member", id, c)
		}
	}
	if recs[1].count()+recs[2].count() < n-recs[0].count() {
		t.Fatalf("survivors handled %d+%d, victim %d, of %d", recs[1].count(), recs[2].count(), recs[0].count(), n)
	}
}

func TestBrokerHTTPSubscriberError(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	var calls atomic.Int64
	sub, _ := newSubscriberService(t, reg, "failing", "user.created", func(ctx context.Context, ev *UserCreated) error {
		calls.Add(1)
		return errors.New("boom: database down")
	}, nil)
	var refusals atomic.Int64
	newSubscriberService(t, reg, "refusing", "user.deleted", func(ctx context.Context, ev *UserCreated) error {
		refusals.Add(1)
		return NewError(CodeInvalidArgument, "no such user")
	}, nil)
	var tries atomic.Int64
	newSubscriberService(t, reg, "flaky", "user.updated", func(ctx context.Context, msg *Message) error {
		if tries.Add(1) < 3 {
			return NewError(CodeUnavailable, "not yet")
		}
		return nil
	}, nil)
	// Subscribers start before the publisher's first publish: a publisher
	// learns of later ones through a registry watch, a moment later.
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))

	t.Run("retried, then reported", func(t *testing.T) {
		err := pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: 1}, Retries(3))
		var pe *PublishError
		if !errors.As(err, &pe) {
			t.Fatalf("error %v (%T), want a *PublishError", err, err)
		}
		assertEqual(t, len(pe.Failures), 1)
		assertEqual(t, pe.Failures[0].Node, sub.Addr())
		assertEqual(t, pe.Topic, "user.created")
		if pe.ID == "" || !strings.Contains(err.Error(), "boom: database down") {
			t.Fatalf("error %q (id %q) does not say which message and why", err, pe.ID)
		}
		assertCode(t, pe.Failures[0].Err, CodeUnknown)
		assertEqual(t, calls.Load(), int64(4)) // the first try and three retries
	})
	t.Run("retried until the context ends", func(t *testing.T) {
		calls.Store(0)
		ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
		defer cancel()
		err := pub.Client().Publish(ctx, "user.created", &UserCreated{ID: 2})
		if !strings.Contains(fmt.Sprint(err), "boom: database down") || !errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "deadline") {
			t.Fatalf("error %v, want the subscriber's error and the deadline", err)
		}
		if calls.Load() < 2 {
			t.Fatalf("%d calls: not retried", calls.Load())
		}
	})
	t.Run("refusal is not retried", func(t *testing.T) {
		err := pub.Client().Publish(context.Background(), "user.deleted", &UserCreated{ID: 1})
		assertCode(t, err, CodeInvalidArgument)
		assertEqual(t, refusals.Load(), int64(1))
	})
	t.Run("transient error is retried to success", func(t *testing.T) {
		var delivered int
		assertNoError(t, pub.Client().Publish(context.Background(), "user.updated", &UserCreated{ID: 3}, Delivered(&delivered)))
		assertEqual(t, delivered, 1)
		assertEqual(t, tries.Load(), int64(3))
	})
}

func TestBrokerHTTPUnsubscribe(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	a, b := &brokerRecorder{name: "a"}, &brokerRecorder{name: "b"}
	svcA, subA := newSubscriberService(t, reg, "a", "user.created", a.raw, nil)
	newSubscriberService(t, reg, "b", "user.created", b.raw, nil)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	ctx := context.Background()

	var delivered int
	assertNoError(t, pub.Client().Publish(ctx, "user.created", &UserCreated{ID: 1}, Delivered(&delivered)))
	assertEqual(t, delivered, 2)
	infos, err := reg.Lookup(ctx, "a")
	assertNoError(t, err)
	assertEqual(t, infos[0].Nodes[0].Metadata[brokerMetaKey], "user.created")
	assertEqual(t, subA.Topic(), "user.created")

	assertNoError(t, subA.Unsubscribe())
	assertNoError(t, subA.Unsubscribe()) // idempotent
	infos, err = reg.Lookup(ctx, "a")
	assertNoError(t, err)
	if md := infos[0].Nodes[0].Metadata; md[brokerMetaKey] != "" {
		t.Fatalf("node still announces %q after Unsubscribe", md[brokerMetaKey])
	}
	if got := svcA.Info().Nodes[0].Metadata[brokerMetaKey]; got != "" {
		t.Fatalf("Info still names %q", got)
	}
	for i := 0; i < 5; i++ {
		assertNoError(t, pub.Client().Publish(ctx, "user.created", &UserCreated{ID: 2}, Delivered(&delivered)))
		assertEqual(t, delivered, 1)
	}
	assertEqual(t, a.count(), 1)
	assertEqual(t, b.count(), 6)
}

// TestBrokerHTTPStaleSubscriberIsSkipped delivers to a node that the
// publisher still believes subscribes, but no longer does: not a failure.
func TestBrokerHTTPStaleSubscriberIsSkipped(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	sub := newTestService(t, "plain", []any{&Greeter{id: "g"}}, WithRegistry(reg))
	// A record that claims a subscription the node never made, as a stale
	// registry would.
	assertNoError(t, reg.Register(context.Background(), &ServiceInfo{Name: "ghost", Nodes: []*Node{
		{ID: "ghost-1", Address: sub.Addr(), Metadata: map[string]string{brokerMetaKey: "user.created,user.created:workers"}},
	}}, time.Minute))
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	var delivered int
	assertNoError(t, pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: 1}, Delivered(&delivered)))
	assertEqual(t, delivered, 0)
}

type gobEvent struct {
	ID    int
	Items []string
}

func TestBrokerHTTPTypedSubscriberDecodesJSONAndGob(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	var mu sync.Mutex
	var got []gobEvent
	var cts []string
	record := func(ctx context.Context, ev gobEvent) error { // a value, not a pointer: decoded all the same
		msg, _ := MessageFromContext(ctx)
		mu.Lock()
		defer mu.Unlock()
		got = append(got, ev)
		cts = append(cts, msg.Header.Get("Content-Type"))
		return nil
	}
	newSubscriberService(t, reg, "gob-ok", "events", record, nil, WithCodec(GobCodec{}))
	var plainCalls atomic.Int64
	newSubscriberService(t, reg, "json-only", "events.json", func(ctx context.Context, ev *gobEvent) error {
		plainCalls.Add(1)
		return nil
	}, nil)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	ctx := context.Background()

	assertNoError(t, pub.Client().Publish(ctx, "events", &gobEvent{ID: 1, Items: []string{"a"}}))
	assertNoError(t, pub.Client().Publish(ctx, "events", &gobEvent{ID: 2, Items: []string{"b", "c"}}, ContentType(ContentTypeGob)))
	mu.Lock()
	assertEqual(t, len(got), 2)
	assertEqual(t, got[0].ID, 1)
	assertEqual(t, got[1].ID, 2)
	assertEqual(t, strings.Join(got[1].Items, ","), "b,c")
	assertEqual(t, cts[0], ContentTypeJSON)
	assertEqual(t, cts[1], ContentTypeGob)
	mu.Unlock()

	// A server without gob refuses it, for good.
	err := pub.Client().Publish(ctx, "events.json", &gobEvent{ID: 3}, ContentType(ContentTypeGob))
	assertCode(t, err, CodeInvalidArgument)
	assertEqual(t, plainCalls.Load(), int64(0))
	// And a body that is not JSON.
	err = pub.Client().Publish(ctx, "events.json", &Message{Header: MD{"Content-Type": ContentTypeJSON}, Body: []byte("{nope")})
	assertCode(t, err, CodeInvalidArgument)
	assertEqual(t, plainCalls.Load(), int64(0))
}

func TestBrokerPublishWithNoSubscribers(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	delivered := -1
	assertNoError(t, pub.Client().Publish(context.Background(), "nobody.listens", &UserCreated{}, Delivered(&delivered)))
	assertEqual(t, delivered, 0)

	mb := NewMemoryBroker()
	defer mb.Close()
	delivered = -1
	assertNoError(t, mb.Publish(context.Background(), "nobody.listens", &Message{}, Delivered(&delivered)))
	assertEqual(t, delivered, 0)
}

func TestBrokerSubscribeBeforeStartIsAnnounced(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	svc := NewService(Name("early"), Address("127.0.0.1:0"), HandleSignal(false), Args(), WithRegistry(reg))
	t.Cleanup(func() { svc.Close() })
	rec := &brokerRecorder{}
	_, err := RegisterSubscriber("user.created", svc.Server(), rec.raw)
	assertNoError(t, err)
	_, err = RegisterSubscriber("user.created", svc.Server(), rec.raw, Queue("billing"))
	assertNoError(t, err)
	assertNoError(t, svc.Start())
	md := svc.Info().Nodes[0].Metadata
	assertEqual(t, md[brokerMetaKey], "user.created,user.created:billing")
	if !slices.ContainsFunc(svc.Info().Endpoints, func(e *Endpoint) bool { return e.Name == brokerEndpoint }) {
		t.Fatalf("delivery endpoint not registered: %+v", svc.Info().Endpoints)
	}
	var delivered int
	assertNoError(t, svc.Client().Publish(context.Background(), "user.created", &UserCreated{}, Delivered(&delivered)))
	assertEqual(t, delivered, 2) // the plain subscriber, and the group of one
	assertEqual(t, rec.count(), 2)
}

func TestBrokerWrappers(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	var mu sync.Mutex
	var order []string
	wrap := func(name string) SubscriberWrapper {
		return func(next MessageHandler) MessageHandler {
			return func(ctx context.Context, msg *Message) error {
				mu.Lock()
				order = append(order, name)
				mu.Unlock()
				return next(ctx, msg)
			}
		}
	}
	svc := newTestService(t, "wrapped", nil, WithRegistry(reg), WrapSubscriber(wrap("server1"), wrap("server2")))
	_, err := RegisterSubscriber("user.created", svc.Server(), func(ctx context.Context, ev *UserCreated) error {
		mu.Lock()
		order = append(order, "handler")
		mu.Unlock()
		return nil
	}, WrapSubscriber(wrap("sub")))
	assertNoError(t, err)
	assertNoError(t, svc.Client().Publish(context.Background(), "user.created", &UserCreated{}))
	assertEqual(t, strings.Join(order, ","), "server1,server2,sub,handler")
}

func TestBrokerLimitsAndBadInput(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	rec := &brokerRecorder{}
	sub, _ := newSubscriberService(t, reg, "sub", "user.created", rec.raw, nil)
	var lowCalls atomic.Int64
	newSubscriberService(t, reg, "low", "small.only", func(ctx context.Context, msg *Message) error {
		lowCalls.Add(1)
		return nil
	}, nil, MaxMessageSize(100))
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	ctx := context.Background()

	t.Run("topic names", func(t *testing.T) {
		for _, topic := range []string{"", ".", "a.", ".a", "a..b", "a b", "a:b", "a,b", "a*", "a/b", "ü", strings.Repeat("a", 129)} {
			assertCode(t, pub.Client().Publish(ctx, topic, &UserCreated{}), CodeInvalidArgument)
			_, err := RegisterSubscriber(topic, sub.Server(), rec.raw)
			assertCode(t, err, CodeInvalidArgument)
		}
		for _, topic := range []string{"a", "user.created", "orders.eu-west_1.v2", strings.Repeat("a", 128)} {
			if !brokerValidName(topic, brokerMaxTopic) {
				t.Errorf("%q refused", topic)
			}
		}
		_, err := RegisterSubscriber("user.created", sub.Server(), rec.raw, Queue("bad queue"))
		assertCode(t, err, CodeInvalidArgument)
	})
	t.Run("bad subscribers", func(t *testing.T) {
		for _, fn := range []any{nil, 42, func(*UserCreated) error { return nil }, func(context.Context, *UserCreated) {}, (func(context.Context, *UserCreated) error)(nil)} {
			if _, err := RegisterSubscriber("user.created", sub.Server(), fn); err == nil {
				t.Errorf("%T accepted", fn)
			}
		}
		_, err := RegisterSubscriber("user.created", NewServer(), rec.raw)
		if !errors.Is(err, ErrNoBroker) {
			t.Fatalf("a server with no broker: %v", err)
		}
		err = NewClient().Publish(ctx, "user.created", &UserCreated{})
		if !errors.Is(err, ErrNoBroker) {
			t.Fatalf("a client with no broker: %v", err)
		}
	})
	t.Run("message size", func(t *testing.T) {
		big := &Message{Body: make([]byte, DefaultMaxMessageSize+1)}
		assertCode(t, pub.Client().Publish(ctx, "user.created", big), CodeResourceExhausted)
		small := NewMemoryBroker(MaxMessageSize(10))
		defer small.Close()
		assertCode(t, small.Publish(ctx, "a", &Message{Body: make([]byte, 11)}), CodeResourceExhausted)
		// A node with a lower bound refuses a larger message for good.
		err := pub.Client().Publish(ctx, "small.only", &Message{Body: make([]byte, 200)})
		assertCode(t, err, CodeResourceExhausted)
		assertEqual(t, lowCalls.Load(), int64(0))
	})
	t.Run("malformed envelope", func(t *testing.T) {
		for _, body := range [][]byte{nil, {0x02}, {0x01, 0xff}, {0x01, 0x05, 0x00}, []byte("\x01\x01\x00\x03\x01a")} {
			rsp, err := http.Post("http://"+sub.Addr()+"/micro.Broker/Deliver", ContentTypeBytes, bytes.NewReader(body))
			assertNoError(t, err)
			rsp.Body.Close()
			assertEqual(t, rsp.StatusCode, http.StatusBadRequest)
		}
		var rsp []byte
		err := pub.Client().Call(ctx, "sub", brokerEndpoint, []byte{0x01, 0x01}, &rsp, ContentType(ContentTypeBytes))
		assertCode(t, err, CodeInvalidArgument)
		// The node still serves.
		assertNoError(t, pub.Client().Publish(ctx, "user.created", &UserCreated{}))
	})
}

func TestBrokerEnvelopeRoundTrip(t *testing.T) {
	msg := &Message{Header: MD{"Content-Type": "application/json", HeaderID: "abc", "Empty": ""}, Body: []byte(`{"id":1}`)}
	payload := brokerAppendPayload(nil, "user.created", msg)
	req := []byte{brokerVersion, 2}
	for _, q := range []string{"", "workers"} {
		req = brokerAppendString(req, q)
		req = brokerAppendString(req, string(payload))
	}
	items, err := brokerParseBatch(req)
	assertNoError(t, err)
	assertEqual(t, len(items), 2)
	assertEqual(t, items[1].queue, "workers")
	for _, it := range items {
		assertEqual(t, it.topic, "user.created")
		assertEqual(t, string(it.msg.Body), `{"id":1}`)
		assertEqual(t, len(it.msg.Header), 3)
		assertEqual(t, it.msg.Header.Get(HeaderID), "abc")
	}
	for cut := 0; cut < len(req); cut++ { // every truncation is refused
		if _, err := brokerParseBatch(req[:cut]); err == nil {
			t.Fatalf("truncated at %d accepted", cut)
		}
	}
	rep := []byte{brokerVersion, 3}
	rep = brokerAppendResult(rep, true, nil)
	rep = brokerAppendResult(rep, false, nil)
	rep = brokerAppendResult(rep, true, NewError(CodeNotFound, "gone"))
	res, err := brokerParseReply(rep, 3)
	assertNoError(t, err)
	assertEqual(t, res[0].err == nil && !res[0].gone, true)
	assertEqual(t, res[1].gone, true)
	assertCode(t, res[2].err, CodeNotFound)
	_, err = brokerParseReply(rep, 2)
	assertCode(t, err, CodeInternal)
}

func FuzzBrokerEnvelope(f *testing.F) {
	payload := brokerAppendPayload(nil, "user.created", &Message{Header: MD{"A": "b"}, Body: []byte("body")})
	seed := []byte{brokerVersion, 1}
	seed = brokerAppendString(seed, "q")
	seed = brokerAppendString(seed, string(payload))
	f.Add(seed)
	f.Add([]byte{brokerVersion, 0})
	f.Add([]byte{brokerVersion, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		items, err := brokerParseBatch(data)
		if err != nil {
			assertCode(t, err, CodeInvalidArgument)
			return
		}
		// What decodes encodes back to something that decodes the same.
		re := []byte{brokerVersion}
		re = append(re, byte(len(items))) // the fuzzer's inputs stay small
		if len(items) > 127 {
			return
		}
		for _, it := range items {
			re = brokerAppendString(re, it.queue)
			re = brokerAppendString(re, string(brokerAppendPayload(nil, it.topic, &it.msg)))
		}
		again, err := brokerParseBatch(re)
		if err != nil {
			t.Fatalf("re-encoding refused: %v", err)
		}
		for i := range items {
			if again[i].topic != items[i].topic || again[i].queue != items[i].queue || !bytes.Equal(again[i].msg.Body, items[i].msg.Body) || len(again[i].msg.Header) != len(items[i].msg.Header) {
				t.Fatalf("item %d changed: %+v vs %+v", i, again[i], items[i])
			}
		}
		brokerParseReply(data, len(items)) // the reply decoder takes the same bytes without panicking
	})
}

func TestBrokerMetadataPacking(t *testing.T) {
	var entries []string
	for i := 0; i < 40; i++ {
		entries = append(entries, fmt.Sprintf("orders.region-%02d.created", i), fmt.Sprintf("orders.region-%02d.created:billing", i))
	}
	entries = append(entries, strings.Repeat("t", brokerMaxTopic)+":"+strings.Repeat("q", brokerMaxQueue))
	slices.Sort(entries)
	md := brokerMetadata(entries)
	if len(md) < 2 {
		t.Fatalf("%d keys for %d entries", len(md), len(entries))
	}
	for k, v := range md {
		if len(k)+1+len(v) > 255 {
			t.Fatalf("%s=%s is %d bytes: more than a TXT string holds", k, v, len(k)+1+len(v))
		}
	}
	var back []string
	brokerParseMetadata(md, func(topic, queue string) {
		if queue != "" {
			topic += ":" + queue
		}
		back = append(back, topic)
	})
	slices.Sort(back)
	assertEqual(t, strings.Join(back, ","), strings.Join(entries, ","))
	assertEqual(t, len(brokerMetadata(nil)), 0)
}

func TestMemoryBroker(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	b := NewMemoryBroker()
	defer b.Close()

	t.Run("fan-out and queue group", func(t *testing.T) {
		plain := []*brokerRecorder{{}, {}, {}}
		for _, r := range plain {
			_, err := b.Subscribe("user.created", r.raw)
			assertNoError(t, err)
		}
		group := []*brokerRecorder{{}, {}, {}}
		for _, r := range group {
			_, err := b.Subscribe("user.created", r.raw, Queue("workers"))
			assertNoError(t, err)
		}
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 75; i++ {
					var delivered int
					err := b.Publish(ctx, "user.created", &Message{Header: MD{HeaderID: fmt.Sprint(w, "-", i)}}, Delivered(&delivered))
					if err != nil || delivered != 4 {
						t.Errorf("publish: %v, delivered %d", err, delivered)
					}
				}
			}()
		}
		wg.Wait()
		for _, r := range plain {
			assertEqual(t, r.count(), 300)
		}
		seen := map[string]int{}
		for _, r := range group {
			if r.count() != 100 { // round robin
				t.Errorf("member handled %d of 300", r.count())
			}
			for _, id := range r.seen() {
				seen[id]++
			}
		}
		assertEqual(t, len(seen), 300)
		for id, c := range seen {
			if c != 1 {
				t.Fatalf("%s handled %d times", id, c)
			}
		}
	})
	t.Run("errors, retries and panics", func(t *testing.T) {
		var calls atomic.Int64
		sub, err := b.Subscribe("fails", func(ctx context.Context, msg *Message) error {
			if calls.Add(1) == 1 {
				panic("first call panics")
			}
			return errors.New("boom")
		})
		assertNoError(t, err)
		err = b.Publish(ctx, "fails", &Message{}, Retries(2))
		var pe *PublishError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("error %v", err)
		}
		assertEqual(t, calls.Load(), int64(3))
		assertNoError(t, sub.Unsubscribe())
		var delivered int
		assertNoError(t, b.Publish(ctx, "fails", &Message{}, Delivered(&delivered)))
		assertEqual(t, delivered, 0)
		assertEqual(t, calls.Load(), int64(3))
	})
	t.Run("queue member failing: another takes it", func(t *testing.T) {
		var bad, good atomic.Int64
		_, err := b.Subscribe("jobs", func(ctx context.Context, msg *Message) error { bad.Add(1); return NewError(CodeUnavailable, "busy") }, Queue("w"))
		assertNoError(t, err)
		_, err = b.Subscribe("jobs", func(ctx context.Context, msg *Message) error { good.Add(1); return nil }, Queue("w"))
		assertNoError(t, err)
		for i := 0; i < 10; i++ {
			assertNoError(t, b.Publish(ctx, "jobs", &Message{}))
		}
		assertEqual(t, good.Load(), int64(10))
	})
	t.Run("async", func(t *testing.T) {
		rec := &brokerRecorder{}
		_, err := b.Subscribe("async", rec.raw)
		assertNoError(t, err)
		done := make(chan error, 10)
		for i := 0; i < 10; i++ {
			assertNoError(t, b.Publish(ctx, "async", &Message{}, PublishAsync(func(err error) { done <- err })))
		}
		for i := 0; i < 10; i++ {
			assertNoError(t, <-done)
		}
		assertEqual(t, rec.count(), 10)
	})
}

func TestBrokerAsyncAndClose(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	rec := &brokerRecorder{}
	newSubscriberService(t, reg, "sub", "user.created", rec.raw, nil)
	release := make(chan struct{})
	newSubscriberService(t, reg, "slow", "slow.topic", func(ctx context.Context, msg *Message) error {
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}, nil)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	ctx := context.Background()

	done := make(chan error, 20)
	for i := 0; i < 10; i++ {
		assertNoError(t, pub.Client().Publish(ctx, "user.created", &UserCreated{ID: i}, PublishAsync(func(err error) { done <- err })))
	}
	for i := 0; i < 10; i++ {
		assertNoError(t, <-done)
	}
	assertEqual(t, rec.count(), 10)

	// Closing the broker ends a publish still waiting for a subscriber, and
	// tells its done func.
	assertNoError(t, pub.Client().Publish(ctx, "slow.topic", &Message{}, PublishAsync(func(err error) { done <- err })))
	assertNoError(t, pub.Broker().Close())
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("async publish after Close: %v, want ErrClosed", err)
	}
	close(release)
	if err := pub.Broker().Publish(ctx, "user.created", &Message{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("publish after Close: %v", err)
	}
}

// TestBrokerHTTPDeadPlainSubscriber: a subscriber that crashed but is still
// registered fails each publish (it is reported, not dropped) without
// holding the publisher to its deadline once the balancer has ejected it;
// the live subscriber gets every message.
func TestBrokerHTTPDeadPlainSubscriber(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	live := &brokerRecorder{}
	newSubscriberService(t, reg, "live", "user.created", live.raw, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	assertNoError(t, err)
	dead := ln.Addr().String()
	ln.Close()
	assertNoError(t, reg.Register(context.Background(), &ServiceInfo{Name: "crashed", Nodes: []*Node{
		{ID: "crashed-1", Address: dead, Metadata: map[string]string{brokerMetaKey: "user.created"}},
	}}, time.Minute))
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	for i := 0; i < 3; i++ {
		var delivered int
		err := pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: i}, Delivered(&delivered))
		var pe *PublishError
		if !errors.As(err, &pe) || len(pe.Failures) != 1 || pe.Failures[0].Node != dead {
			t.Fatalf("publish %d: %v, want a failure of %s", i, err, dead)
		}
		assertCode(t, pe.Failures[0].Err, CodeUnavailable)
		assertEqual(t, delivered, 1)
	}
	assertEqual(t, live.count(), 3)
}

// TestBrokerInitKeepsSubscriptions: broker options given to Init after
// subscribing reconfigure the service's broker rather than replace it.
func TestBrokerInitKeepsSubscriptions(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	svc := NewService(Name("late-init"), Address("127.0.0.1:0"), HandleSignal(false), Args(), WithRegistry(reg))
	t.Cleanup(func() { svc.Close() })
	rec := &brokerRecorder{}
	_, err := RegisterSubscriber("user.created", svc.Server(), rec.raw)
	assertNoError(t, err)
	assertNoError(t, svc.Init(MaxMessageSize(512)))
	assertNoError(t, svc.Start())
	assertNoError(t, svc.Client().Publish(context.Background(), "user.created", &UserCreated{ID: 1}))
	assertEqual(t, rec.count(), 1)
	assertCode(t, svc.Client().Publish(context.Background(), "user.created", &Message{Body: make([]byte, 1000)}), CodeResourceExhausted)
}

func TestMemoryBrokerZeroValue(t *testing.T) {
	checkGoroutines(t)
	var b MemoryBroker
	rec := &brokerRecorder{}
	_, err := b.Subscribe("a.b", rec.raw)
	assertNoError(t, err)
	done := make(chan error, 1)
	assertNoError(t, b.Publish(context.Background(), "a.b", &Message{Body: []byte("x")}))
	assertNoError(t, b.Publish(context.Background(), "a.b", &Message{}, PublishAsync(func(err error) { done <- err })))
	assertNoError(t, <-done)
	assertEqual(t, rec.count(), 2)
	assertCode(t, b.Publish(context.Background(), "a.b", &Message{Body: make([]byte, DefaultMaxMessageSize+1)}), CodeResourceExhausted)
	assertNoError(t, b.Close())
}

// TestBrokerFirstPublishOnColdMDNS publishes from a fresh process's view of
// the link (an mDNS registry that has heard nothing yet, its lookup wait a
// minute): the publish must find the subscriber once the link has answered,
// not wait out the lookup wait (the deadline is only the guard).
func TestBrokerFirstPublishOnColdMDNS(t *testing.T) {
	checkGoroutines(t)
	subReg, pubReg := newTestMDNS(t), newTestMDNS(t, MDNSLookupWait(time.Minute))
	rec := &brokerRecorder{name: "cold-sub"}
	newSubscriberService(t, subReg, "cold-sub", "cold.topic", rec.typed, nil)
	pub := newTestService(t, "cold-pub", nil, WithRegistry(pubReg))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var delivered int
	err := pub.Client().Publish(ctx, "cold.topic", &UserCreated{ID: 1, Name: "ada"}, Delivered(&delivered))
	assertNoError(t, err)
	assertEqual(t, delivered, 1)
	assertEqual(t, rec.count(), 1)
}

// TestBrokerIndexKeptFromTheFirstPublish checks that the publisher's topic
// index, built by the first publish, serves the next ones: the registry is
// listed once, not again on the second publish, until it changes.
func TestBrokerIndexKeptFromTheFirstPublish(t *testing.T) {
	checkGoroutines(t)
	reg := newCountingRegistry(newBrokerTestRegistry(t))
	rec := &brokerRecorder{name: "sub"}
	newSubscriberService(t, reg, rec.name, "user.created", rec.raw, nil)
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	lists := func() int {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		return reg.lists
	}
	before := lists()
	for i := range 3 {
		assertNoError(t, pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: i}))
	}
	assertEqual(t, lists()-before, 1)
	assertEqual(t, rec.count(), 3)

	// A new subscriber changes the registry: the next publish lists again
	// and reaches it.
	rec2 := &brokerRecorder{name: "sub2"}
	newSubscriberService(t, reg, rec2.name, "user.created", rec2.raw, nil)
	var delivered int
	for {
		assertNoError(t, pub.Client().Publish(context.Background(), "user.created", &UserCreated{ID: 9}, Delivered(&delivered)))
		if delivered == 2 {
			break
		}
	}
	assertEqual(t, rec2.count(), 1)
}

// TestBrokerPublishWhileTheWatchHangs: a registry whose Watch does not
// return does not hold publishing up. The first listing waits for the
// watch a bounded time, then lists anyway; later ones do not wait. With no
// watch running, no index is kept, and each publish lists.
func TestBrokerPublishWhileTheWatchHangs(t *testing.T) {
	checkGoroutines(t)
	reg := newCountingRegistry(newBrokerTestRegistry(t))
	rec := &brokerRecorder{name: "sub"}
	newSubscriberService(t, reg, rec.name, "user.created", rec.raw, nil)
	reg.watchHold = make(chan struct{}) // Watch returns only when the publisher closes
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := pub.Client().Publish(ctx, "user.created", &UserCreated{ID: i})
		cancel()
		assertNoError(t, err)
	}
	assertEqual(t, rec.count(), 2)
	reg.mu.Lock()
	lists := reg.lists
	reg.mu.Unlock()
	assertEqual(t, lists, 2)
}

// TestBrokerHandlerPublishesToItsOwnNode: a handler that publishes, and
// waits for, a message to a topic its own node subscribes to gets it
// delivered while its own delivery is still in flight to that node: the
// nested delivery queues behind the request waiting for it until another
// request is started beside it (see TestBrokerNestedPublishesToItsOwnNode).
func TestBrokerHandlerPublishesToItsOwnNode(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	svc := newTestService(t, "loop", nil, WithRegistry(reg))
	rec := &brokerRecorder{name: "b"}
	_, err := RegisterSubscriber("loop.b", svc.Server(), rec.raw)
	assertNoError(t, err)
	_, err = RegisterSubscriber("loop.a", svc.Server(), func(ctx context.Context, msg *Message) error {
		var delivered int
		err := svc.Client().Publish(ctx, "loop.b", &Message{Body: []byte("nested")}, Delivered(&delivered))
		if err == nil && delivered != 1 {
			err = fmt.Errorf("nested publish delivered to %d", delivered)
		}
		return err
	})
	assertNoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var delivered int
	assertNoError(t, svc.Client().Publish(ctx, "loop.a", &Message{Body: []byte("outer")}, Delivered(&delivered)))
	assertEqual(t, delivered, 1)
	assertEqual(t, rec.count(), 1)
}

// TestBrokerNestedPublishesToItsOwnNode runs chains of handlers on one node,
// each publishing to the next topic and waiting for its delivery: every
// level holds a request to the node while the next one's delivery queues
// behind it, so each needs another request in flight (started once the
// queue has stalled).
func TestBrokerNestedPublishesToItsOwnNode(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	svc := newTestService(t, "chain", nil, WithRegistry(reg))
	const depth, chains = 5, 3
	rec := &brokerRecorder{name: "last"}
	_, err := RegisterSubscriber(fmt.Sprintf("chain.%d", depth), svc.Server(), rec.raw)
	assertNoError(t, err)
	for level := range depth {
		next := fmt.Sprintf("chain.%d", level+1)
		_, err := RegisterSubscriber(fmt.Sprintf("chain.%d", level), svc.Server(), func(ctx context.Context, msg *Message) error {
			var delivered int
			err := svc.Client().Publish(ctx, next, msg, Delivered(&delivered))
			if err == nil && delivered != 1 {
				err = fmt.Errorf("publish to %s delivered to %d", next, delivered)
			}
			return err
		})
		assertNoError(t, err)
	}
	// 10 s, not the usual 30: what fails here fails by waiting it out.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errs := make(chan error, chains)
	for i := range chains {
		go func() { errs <- svc.Client().Publish(ctx, "chain.0", &Message{Body: []byte{byte(i)}}) }()
	}
	for range chains {
		assertNoError(t, <-errs)
	}
	assertEqual(t, rec.count(), chains)
}

// TestBrokerQueuedDeliveriesLeaveInOneBatch: deliveries that queue for a
// node while its request in flight is held leave together, in one request,
// when the stall starts another sender. The stall timer is set out of the
// way and fired by hand, so what queues is known.
func TestBrokerQueuedDeliveriesLeaveInOneBatch(t *testing.T) {
	checkGoroutines(t)
	reg := newBrokerTestRegistry(t)
	var requests atomic.Int32
	countDeliver := func(next HandlerFunc) HandlerFunc {
		return func(ctx context.Context, req *Request) (any, error) {
			if req.Endpoint == brokerEndpoint {
				requests.Add(1)
			}
			return next(ctx, req)
		}
	}
	held, release := make(chan struct{}), make(chan struct{})
	var got atomic.Int32
	newSubscriberService(t, reg, "batched", "batch.topic", func(ctx context.Context, msg *Message) error {
		if string(msg.Body) == "hold" {
			close(held)
			<-release
			return nil
		}
		got.Add(1)
		return nil
	}, nil, WrapHandler(countDeliver))
	pub := newTestService(t, "publisher", nil, WithRegistry(reg))
	b := pub.Broker().(*brokerHTTP)
	b.mu.Lock()
	b.stall = time.Hour
	b.mu.Unlock()
	ctx := testCtx(t)

	first := make(chan error, 1)
	go func() { first <- pub.Client().Publish(ctx, "batch.topic", &Message{Body: []byte("hold")}) }()
	<-held
	const n = 10
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- pub.Client().Publish(ctx, "batch.topic", &Message{Body: []byte{byte(i)}}) }()
	}
	var q *brokerNodeQueue
	for { // until all n wait behind the held request
		b.mu.Lock()
		for _, nq := range b.nodes {
			if len(nq.items) == n {
				q = nq
			}
		}
		b.mu.Unlock()
		if q != nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the deliveries did not queue")
		}
		runtime.Gosched()
	}
	b.unstall(q)
	for range n {
		assertNoError(t, <-errs)
	}
	assertEqual(t, got.Load(), int32(n))
	assertEqual(t, requests.Load(), int32(2)) // the held one, and one for all n

	// Deliveries whose publish gave up while they waited are let go at the
	// next stall, not kept (payloads and all) until a sender is free: here
	// the held request still holds the only one that is not between calls.
	gaveUp, cancel := context.WithCancel(ctx)
	for i := range n {
		go func() { errs <- pub.Client().Publish(gaveUp, "batch.topic", &Message{Body: []byte{byte(i)}}) }()
	}
	for {
		b.mu.Lock()
		queued := len(q.items)
		b.mu.Unlock()
		if queued == n {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the deliveries did not queue")
		}
		runtime.Gosched()
	}
	cancel()
	for range n {
		assertCode(t, <-errs, CodeCanceled)
	}
	b.mu.Lock()
	q.senders = brokerSendersMax // as if every sender were held: none starts
	b.mu.Unlock()
	b.unstall(q)
	b.mu.Lock()
	queued := len(q.items)
	q.senders = 1
	b.mu.Unlock()
	assertEqual(t, queued, 0)
	close(release)
	assertNoError(t, <-first)
}
