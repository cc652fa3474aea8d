package micro

import (
	"context"
	"math/rand/v2"
	"sync"
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
// are not ejected.
//
// An attempt's result, as reported to the done func of [NodeBalancer.Pick],
// is one of three kinds:
//   - a failure: an error with [CodeUnavailable], which the client reports for
//     every transport failure (connection refused or reset, unreachable
//     address) as well as for a node that says it is unavailable;
//   - neutral: an error with [CodeCanceled] or [CodeDeadlineExceeded], since
//     the caller's context, not the node, may have ended the call; it changes
//     nothing but the count of calls in flight (so a node that swallows calls
//     until their deadline is not ejected for it);
//   - a success: nil or any other error (an application error means the node
//     answered).
//
// A node that fails [EjectAfter] times in a row is ejected for [EjectFor],
// then offered again; one more failure ejects it for twice as long (up to
// 32×). A success clears its failures, its ejections and any ejection still
// running. If every node is ejected, all are offered, since trying beats
// failing outright.
//
// The done func must be called exactly once per pick (the client does); a
// second call would corrupt the count of calls in flight. What a NodeBalancer
// knows of an address is forgotten once the address has not been picked for
// five minutes (counted from the end of its last ejection), has no call in
// flight and is not ejected.
//
// A NodeBalancer is safe for concurrent use; share one across clients to
// share what it learns.
type NodeBalancer struct {
	strategy   Strategy
	ejectAfter int
	ejectFor   time.Duration

	mu        sync.Mutex
	next      uint64                   // round robin position
	nodes     map[string]*balancerNode // by address
	lastPrune time.Time
	now       func() time.Time
}

// balancerNode is what a NodeBalancer knows of one address. Its fields are
// guarded by NodeBalancer.mu.
type balancerNode struct {
	inflight  int
	fails     int       // consecutive failures
	ejections int       // ejections since the last success
	until     time.Time // ejected until
	lastUsed  time.Time // last picked
	done      func(error)
}

// How often and after how long idle a NodeBalancer forgets addresses.
const (
	balancerPruneEvery = time.Minute
	balancerIdle       = 5 * time.Minute
)

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

// Pick chooses a node and returns the func that reports its result, which
// must be called exactly once. It does not allocate for up to eight nodes
// it has seen before.
func (b *NodeBalancer) Pick(ctx context.Context, nodes []*Node) (*Node, func(error), error) {
	if len(nodes) == 0 {
		return nil, nil, ErrNoNodes
	}
	var nb [8]*Node
	var sb [8]*balancerNode
	healthy, states := nb[:0], sb[:0]
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	if now.Sub(b.lastPrune) >= balancerPruneEvery {
		b.pruneLocked(now)
	}
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

	i := 0
	switch b.strategy {
	case RoundRobin:
		i = int(b.next % uint64(len(healthy)))
		b.next++
	case Random:
		i = rand.IntN(len(healthy))
	default:
		i = rand.IntN(len(healthy))
		if len(healthy) > 1 {
			j := rand.IntN(len(healthy) - 1)
			if j >= i {
				j++
			}
			if states[j].inflight < states[i].inflight {
				i = j
			}
		}
	}
	st := states[i]
	st.inflight++
	st.lastUsed = now
	return healthy[i], st.done, nil
}

func (b *NodeBalancer) stateLocked(addr string) *balancerNode {
	st := b.nodes[addr]
	if st == nil {
		st = &balancerNode{}
		st.done = func(err error) { b.report(st, err) } // made once, so Pick does not allocate
		b.nodes[addr] = st
	}
	return st
}

// pruneLocked forgets the addresses not picked for balancerIdle that have no
// call in flight and are not ejected. The idle time of a node counts from the
// end of its last ejection, so a node does not lose its record the moment its
// cool-down ends.
func (b *NodeBalancer) pruneLocked(now time.Time) {
	b.lastPrune = now
	for addr, st := range b.nodes {
		if st.inflight == 0 && now.Sub(st.lastUsed) >= balancerIdle && now.Sub(st.until) >= balancerIdle {
			delete(b.nodes, addr)
		}
	}
}

// report records an attempt's result.
func (b *NodeBalancer) report(st *balancerNode, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st.inflight--
	switch balancerClassify(err) {
	case balancerNeutral:
		return
	case balancerSuccess:
		st.fails, st.ejections, st.until = 0, 0, time.Time{}
		return
	}
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

// What an attempt's result says about its node.
const (
	balancerSuccess = iota // the node answered
	balancerFailure        // the node could not be reached or is unavailable
	balancerNeutral        // the call ended for a reason that says nothing of the node
)

// balancerClassify sorts an attempt's result: CodeUnavailable (which the
// client reports for transport failures) is the node's failure; a canceled or
// expired context is neutral; anything else, nil included, is a success.
func balancerClassify(err error) int {
	if err == nil {
		return balancerSuccess
	}
	switch CodeOf(err) {
	case CodeUnavailable:
		return balancerFailure
	case CodeCanceled, CodeDeadlineExceeded:
		return balancerNeutral
	}
	return balancerSuccess
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
