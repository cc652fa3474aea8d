package micro

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Balancer picks the node for each attempt of a call. The client filters the
// nodes first (see [Filter]) and, on a retry, leaves out the nodes it has
// already tried.
//
// Implementations must be safe for concurrent use.
type Balancer interface {
	// Pick chooses one of nodes, which is never empty. If done is not nil
	// the client calls it exactly once with the attempt's result (nil on
	// success), so the balancer can track load and health.
	Pick(ctx context.Context, nodes []*Node) (node *Node, done func(error), err error)
}

// Strategy is how a [NodeBalancer] chooses among healthy nodes.
type Strategy int

// The strategies of [NewBalancer].
const (
	// LeastInFlight picks two healthy nodes at random and takes the one
	// with fewer calls in flight (power of two choices); a tie goes to the
	// first, at random. It is the client's default.
	LeastInFlight Strategy = iota
	// RoundRobin takes the healthy nodes in turn.
	RoundRobin
	// Random picks a healthy node uniformly at random.
	Random
)

// NodeBalancer is the built-in [Balancer]: a [Strategy] over the nodes that
// are not ejected. A node whose calls fail with a transport error or
// [CodeUnavailable] several times in a row is ejected for a cool-down, then
// offered again; one more failure ejects it for twice as long (up to 32×),
// one success clears its record. If every node is ejected, all are offered,
// since trying beats failing outright.
//
// A NodeBalancer is safe for concurrent use; share one across clients to
// share what it learns.
type NodeBalancer struct {
	strategy   Strategy
	ejectAfter int
	ejectFor   time.Duration
	next       atomic.Uint64 // round robin position

	mu    sync.Mutex
	nodes map[string]*balancerNode // by address
	now   func() time.Time
}

// balancerNode is what a NodeBalancer knows of one address.
type balancerNode struct {
	inflight  atomic.Int64
	fails     int       // consecutive failures (under NodeBalancer.mu)
	ejections int       // ejections since the last success
	until     time.Time // ejected until
}

// BalancerOption configures a [NodeBalancer].
type BalancerOption func(*NodeBalancer)

// EjectAfter sets how many consecutive failures eject a node (default 3).
func EjectAfter(n int) BalancerOption {
	return func(b *NodeBalancer) {
		if n > 0 {
			b.ejectAfter = n
		}
	}
}

// EjectFor sets how long a first ejection lasts (default 10s); each further
// ejection without a success in between doubles it, up to 32 times.
func EjectFor(d time.Duration) BalancerOption {
	return func(b *NodeBalancer) {
		if d > 0 {
			b.ejectFor = d
		}
	}
}

// NewBalancer returns a balancer with the strategy.
func NewBalancer(s Strategy, opts ...BalancerOption) *NodeBalancer {
	b := &NodeBalancer{
		strategy:   s,
		ejectAfter: 3,
		ejectFor:   10 * time.Second,
		nodes:      make(map[string]*balancerNode),
		now:        time.Now,
	}
	for _, o := range opts {
		o(b)
	}
	return b
}

// Pick chooses a node and returns the func that reports its result.
func (b *NodeBalancer) Pick(ctx context.Context, nodes []*Node) (*Node, func(error), error) {
	if len(nodes) == 0 {
		return nil, nil, ErrNoNodes
	}
	now := b.now()
	healthy := make([]*Node, 0, len(nodes))
	states := make([]*balancerNode, 0, len(nodes))
	b.mu.Lock()
	for _, n := range nodes {
		st := b.stateLocked(n.Address)
		if now.Before(st.until) {
			continue
		}
		healthy = append(healthy, n)
		states = append(states, st)
	}
	if len(healthy) == 0 { // all ejected: offer them all
		for _, n := range nodes {
			healthy = append(healthy, n)
			states = append(states, b.stateLocked(n.Address))
		}
	}
	b.mu.Unlock()

	i := 0
	switch b.strategy {
	case RoundRobin:
		i = int((b.next.Add(1) - 1) % uint64(len(healthy)))
	case Random:
		i = rand.IntN(len(healthy))
	default:
		i = rand.IntN(len(healthy))
		if len(healthy) > 1 {
			j := rand.IntN(len(healthy) - 1)
			if j >= i {
				j++
			}
			if states[j].inflight.Load() < states[i].inflight.Load() {
				i = j
			}
		}
	}
	st := states[i]
	st.inflight.Add(1)
	var once atomic.Bool
	done := func(err error) {
		if !once.CompareAndSwap(false, true) {
			return
		}
		st.inflight.Add(-1)
		b.report(st, err)
	}
	return healthy[i], done, nil
}

func (b *NodeBalancer) stateLocked(addr string) *balancerNode {
	st := b.nodes[addr]
	if st == nil {
		st = &balancerNode{}
		b.nodes[addr] = st
	}
	return st
}

// report records an attempt's result.
func (b *NodeBalancer) report(st *balancerNode, err error) {
	if !balancerIsNodeFailure(err) {
		b.mu.Lock()
		st.fails, st.ejections = 0, 0
		b.mu.Unlock()
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if now.Before(st.until) {
		return // calls that were in flight when it was ejected
	}
	st.fails++
	if st.fails < b.ejectAfter && st.ejections == 0 {
		return
	}
	// Ejected for the first time, or failed its probe after a cool-down.
	st.fails = 0
	st.until = now.Add(b.ejectFor << min(st.ejections, 5))
	st.ejections++
}

// balancerIsNodeFailure reports whether err says the node, not the call, is
// at fault: a transport failure (reported as unavailable) or unavailable.
func balancerIsNodeFailure(err error) bool {
	return err != nil && CodeOf(err) == CodeUnavailable
}

// Filter narrows a service's records before balancing: it returns the records
// (and nodes) that may serve the call. It must not modify its input; return
// new records instead.
type Filter func([]*ServiceInfo) []*ServiceInfo

// FilterVersion keeps the records of one version.
func FilterVersion(version string) Filter {
	return func(in []*ServiceInfo) []*ServiceInfo {
		var out []*ServiceInfo
		for _, s := range in {
			if s.Version == version {
				out = append(out, s)
			}
		}
		return out
	}
}

// FilterMetadata keeps the nodes whose metadata (or, failing that, whose
// record's metadata) has key set to value: labels such as zone=eu or
// track=canary.
func FilterMetadata(key, value string) Filter {
	return func(in []*ServiceInfo) []*ServiceInfo {
		var out []*ServiceInfo
		for _, s := range in {
			var nodes []*Node
			for _, n := range s.Nodes {
				v, ok := n.Metadata[key]
				if !ok {
					v, ok = s.Metadata[key]
				}
				if ok && v == value {
					nodes = append(nodes, n)
				}
			}
			if len(nodes) > 0 {
				c := *s
				c.Nodes = nodes
				out = append(out, &c)
			}
		}
		return out
	}
}

// balancerRetryBudget limits retries across a client, as Finagle's retry
// budget does: every call deposits a fifth of a token, a reserve refills at
// ten tokens a second, and each retry spends one. So retries never add more
// than about a fifth to the load on a failing system, while a few early
// failures (a node dying under concurrent calls) are always retried.
type balancerRetryBudget struct {
	mu    sync.Mutex
	milli int64 // thousandths of a token
	last  time.Time
	now   func() time.Time
}

const (
	balancerRetryDeposit = 200     // milli-tokens each call deposits
	balancerRetryPerSec  = 10      // reserve refill, tokens a second
	balancerRetryMax     = 100_000 // the most the budget holds, milli-tokens
)

func newBalancerRetryBudget() *balancerRetryBudget {
	return &balancerRetryBudget{milli: balancerRetryPerSec * 1000, now: time.Now}
}

// deposit records a call.
func (b *balancerRetryBudget) deposit() {
	b.mu.Lock()
	b.milli = min(b.milli+balancerRetryDeposit, balancerRetryMax)
	b.mu.Unlock()
}

// withdraw spends a token for a retry, if there is one.
func (b *balancerRetryBudget) withdraw() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if !b.last.IsZero() {
		b.milli = min(b.milli+now.Sub(b.last).Milliseconds()*balancerRetryPerSec, balancerRetryMax)
	}
	b.last = now
	if b.milli < 1000 {
		return false
	}
	b.milli -= 1000
	return true
}
