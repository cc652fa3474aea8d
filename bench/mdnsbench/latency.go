package mdnsbench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/micro-kit/micro"
)

// WarmResult is the time from a service process's start until a browser
// that was already running resolves it.
type WarmResult struct {
	Kind string
	// FromExec runs from just before the parent execs the service process
	// to the browser's watch event: process start, registry open, Register,
	// the announcement, and the browser's handling of it.
	FromExec Summary
	// FromRegister runs from the child's clock just before Register (or
	// Service.Start) to the watch event.
	FromRegister Summary
	// LookupFromRegister runs from the same point to the return of a Lookup
	// that was already waiting for the service.
	LookupFromRegister Summary
	// RegisterCall is how long Register (or Service.Start) took in the child.
	RegisterCall Summary
}

// Warm measures n service starts seen by one long-running browser: before
// each start the browser watches the service's name (a new one each time)
// and has a Lookup waiting for it. newCmd returns this binary in the child
// role (see [RunChild]).
func Warm(ctx context.Context, cfg Config, kind string, n int, newCmd func() *exec.Cmd) (WarmResult, error) {
	res := WarmResult{Kind: kind}
	r, err := micro.NewMDNSRegistry(cfg.Options(micro.MDNSLookupWait(10 * time.Second))...)
	if err != nil {
		return res, err
	}
	defer r.Close()
	var fromExec, fromReg, lookup, call []time.Duration
	for i := range n {
		name := fmt.Sprintf("helloworld-w%d-%d", os.Getpid(), i)
		spec := ChildSpec{Config: cfg, Kind: kind, Name: name, ID: NodeID(name, uint64(i))}
		e, reg, l, c, err := warmOnce(ctx, r, spec, newCmd)
		if err != nil {
			return res, fmt.Errorf("start %d: %w", i, err)
		}
		fromExec, fromReg, lookup, call = append(fromExec, e), append(fromReg, reg), append(lookup, l), append(call, c)
	}
	res.FromExec, res.FromRegister = Summarize(fromExec), Summarize(fromReg)
	res.LookupFromRegister, res.RegisterCall = Summarize(lookup), Summarize(call)
	return res, nil
}

func warmOnce(ctx context.Context, r *micro.MDNSRegistry, spec ChildSpec, newCmd func() *exec.Cmd) (fromExec, fromReg, lookup, call time.Duration, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	w, err := r.Watch(ctx, spec.Name)
	if err != nil {
		return
	}
	defer w.Stop()
	type lookupRes struct {
		at  time.Time
		err error
	}
	looked := make(chan lookupRes, 1)
	go func() {
		got, err := r.Lookup(ctx, spec.Name)
		if err == nil && len(got) == 0 {
			err = errors.New("empty lookup")
		}
		looked <- lookupRes{time.Now(), err}
	}()
	c, err := startChild(newCmd, spec)
	if err != nil {
		return
	}
	defer c.stop()
	var seen time.Time
	for seen.IsZero() {
		ev, werr := w.Next()
		if werr != nil {
			err = fmt.Errorf("watch: %w", werr)
			return
		}
		if ev.Type == micro.EventCreate && ev.Service.Name == spec.Name {
			seen = time.Now()
		}
	}
	var lr lookupRes
	select {
	case lr = <-looked:
	case <-ctx.Done():
		err = fmt.Errorf("lookup: %w", ctx.Err())
		return
	}
	if lr.err != nil {
		err = fmt.Errorf("lookup: %w", lr.err)
		return
	}
	if err = c.wait(ctx); err != nil {
		return
	}
	return seen.Sub(c.started), seen.Sub(c.register), lr.at.Sub(c.register), c.registered.Sub(c.register), nil
}

// ColdResult is the time a browser that has just started takes to resolve
// a service registered well before.
type ColdResult struct {
	// NewAndLookup runs from NewMDNSRegistry to the return of its first
	// Lookup (which opens the sockets, asks, and waits for the answer).
	NewAndLookup Summary
}

// Cold starts one service process, lets its announcements pass, then n
// times opens a fresh registry in this process and looks the service up,
// pausing 300 ms between lookups so that no answer to the previous one's
// multicast query (sent 20-120 ms late) lands in the next one.
func Cold(ctx context.Context, cfg Config, n int, newCmd func() *exec.Cmd) (ColdResult, error) {
	var res ColdResult
	name := fmt.Sprintf("helloworld-c%d", os.Getpid())
	spec := ChildSpec{Config: cfg, Kind: KindRegistry, Name: name, ID: NodeID(name, 1)}
	c, err := startChild(newCmd, spec)
	if err != nil {
		return res, err
	}
	defer c.stop()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = c.wait(wctx)
	cancel()
	if err != nil {
		return res, err
	}
	// The second announcement goes out a second after the first.
	if err := sleep(ctx, 1500*time.Millisecond); err != nil {
		return res, err
	}
	var ds []time.Duration
	for i := range n {
		if err := sleep(ctx, 300*time.Millisecond); err != nil {
			return res, err
		}
		d, err := coldOnce(ctx, cfg, spec)
		if err != nil {
			return res, fmt.Errorf("lookup %d: %w", i, err)
		}
		ds = append(ds, d)
	}
	res.NewAndLookup = Summarize(ds)
	return res, nil
}

func coldOnce(ctx context.Context, cfg Config, spec ChildSpec) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	start := time.Now()
	r, err := micro.NewMDNSRegistry(cfg.Options()...)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	got, err := r.Lookup(ctx, spec.Name)
	d := time.Since(start)
	if err != nil {
		return 0, err
	}
	if len(got) == 0 || len(got[0].Nodes) == 0 || got[0].Nodes[0].ID != spec.ID {
		return 0, fmt.Errorf("looked up %v, want node %s", got, spec.ID)
	}
	return d, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// WarmPair returns a browser whose cache holds service name (one node) and
// others more services, heard from a second registry that announced them;
// close stops both.
func WarmPair(ctx context.Context, cfg Config, others int) (browser *micro.MDNSRegistry, name string, close func(), err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	name = fmt.Sprintf("helloworld-l%d", os.Getpid())
	svc, err := micro.NewMDNSRegistry(cfg.Options()...)
	if err != nil {
		return nil, "", nil, err
	}
	br, err := micro.NewMDNSRegistry(cfg.Options()...)
	if err != nil {
		svc.Close()
		return nil, "", nil, err
	}
	close = func() { br.Close(); svc.Close() }
	var names []string
	for i := range others + 1 {
		n := name
		if i > 0 {
			n = fmt.Sprintf("other-%d-%d", os.Getpid(), i)
		}
		names = append(names, n)
		if err := svc.Register(ctx, HelloWorld(n, NodeID(n, uint64(i)), cfg.addr(), 0, 0), 0); err != nil {
			close()
			return nil, "", nil, err
		}
	}
	for _, n := range names { // from the cache, or waiting for the announcement
		if _, err := br.Lookup(ctx, n); err != nil {
			close()
			return nil, "", nil, fmt.Errorf("browser never heard %s: %w", n, err)
		}
	}
	return br, name, close, nil
}

// LookupLoop calls browser.Lookup(name) n times, as a benchmark body; it
// returns the first error.
func LookupLoop(ctx context.Context, browser *micro.MDNSRegistry, name string, n int) error {
	for range n {
		got, err := browser.Lookup(ctx, name)
		if err != nil {
			return err
		}
		if len(got) != 1 || len(got[0].Nodes) != 1 {
			return fmt.Errorf("lookup %s: %d versions", name, len(got))
		}
	}
	return nil
}
