// Package mdnsbench measures micro's mDNS registry: how long a service
// takes, from its start, to be resolved by a browser in another process;
// what a Lookup costs when the cache already holds the service; and how many
// bytes one announcement puts on the wire.
//
// Everything here multicasts: run it only inside a private network
// namespace (shared/bin/netns-run), never on a real link.
package mdnsbench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/micro-kit/micro"
)

// Config says where the registries speak mDNS and what the nodes look like.
type Config struct {
	Interfaces []string // MDNSInterfaces; empty: every up, multicast interface
	Network    string   // MDNSNetwork: "udp", "udp4" or "udp6"
	Addr       string   // the address nodes register; "" is "[::]:8080", as a Service listening on ":0" registers
}

// DefaultConfig is lo with IPv4, the link netns-run gives multicast.
func DefaultConfig() Config {
	return Config{Interfaces: []string{"lo"}, Network: "udp4", Addr: "[::]:8080"}
}

func (c Config) addr() string {
	if c.Addr == "" {
		return "[::]:8080"
	}
	return c.Addr
}

// Options returns the registry options of the config, then extra.
func (c Config) Options(extra ...micro.MDNSOption) []micro.MDNSOption {
	var o []micro.MDNSOption
	if len(c.Interfaces) > 0 {
		o = append(o, micro.MDNSInterfaces(c.Interfaces...))
	}
	if c.Network != "" {
		o = append(o, micro.MDNSNetwork(c.Network))
	}
	return append(o, extra...)
}

// NodeID returns an ID shaped as a [micro.Service] makes them: the name and
// 16 hex digits (64 random bits there; derived from seed here, so runs
// compare).
func NodeID(name string, seed uint64) string {
	return fmt.Sprintf("%s-%016x", name, seed*0x9e3779b97f4a7c15+0x1234567)
}

// Metadata returns n metadata keys of a plausible size (region, zone, ...).
func Metadata(n int) map[string]string {
	keys := []struct{ k, v string }{
		{"region", "eu-west-1"}, {"zone", "eu-west-1a"}, {"env", "production"},
		{"team", "payments"}, {"commit", "9f2c1e7"},
	}
	if n == 0 {
		return nil
	}
	md := make(map[string]string, n)
	for i := range n {
		if i < len(keys) {
			md[keys[i].k] = keys[i].v
		} else {
			md["key"+strconv.Itoa(i)] = "value" + strconv.Itoa(i)
		}
	}
	return md
}

// HelloWorld returns the record of one node of "name" version 1.0.0 with
// mdKeys node metadata keys and endpoints endpoints (the mDNS registry does
// not send endpoints; go-micro's does).
func HelloWorld(name, id, addr string, mdKeys, endpoints int) *micro.ServiceInfo {
	s := &micro.ServiceInfo{Name: name, Version: "1.0.0",
		Nodes: []*micro.Node{{ID: id, Address: addr, Metadata: Metadata(mdKeys)}}}
	for i := range endpoints {
		s.Endpoints = append(s.Endpoints, &micro.Endpoint{Name: fmt.Sprintf("Greeter.Method%d", i),
			Request: "greeter.Request", Response: "greeter.Response"})
	}
	return s
}

// Summary is the spread of a set of durations.
type Summary struct {
	N                     int
	Median, P90, Min, Max time.Duration
	Failures              int
	FailureExample        string
}

// Summarize returns the median (the mean of the two middle values for an
// even count), the 90th percentile (nearest rank), min and max of ds.
func Summarize(ds []time.Duration) Summary {
	if len(ds) == 0 {
		return Summary{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	rank := (90*n + 99) / 100 // ceil(0.9 n)
	return Summary{N: n, Median: med, P90: s[max(rank, 1)-1], Min: s[0], Max: s[n-1]}
}

// ChildEnv carries the service process's spec (JSON) to a re-executed
// binary: the command and the test both check it first.
const ChildEnv = "MDNSBENCH_CHILD"

// Kinds of service process.
const (
	KindRegistry = "registry" // an MDNSRegistry and one Register call
	KindService  = "service"  // a micro.Service on 127.0.0.1:0 with its own Start
)

// ChildSpec is what the service process registers.
type ChildSpec struct {
	Config
	Kind string
	Name string
	ID   string
}

// Child line prefixes: the service process prints "register NS" just before
// Register (or Service.Start), "registered NS" after it, in wall-clock Unix
// nanoseconds, then waits for its standard input to close, closes (sending
// goodbyes) and exits.
const (
	lineRegister   = "register "
	lineRegistered = "registered "
)

// IsChild reports whether this process was started as a service process.
func IsChild() bool { return os.Getenv(ChildEnv) != "" }

// RunChild runs the service process described by ChildEnv.
func RunChild(stdin io.Reader, stdout io.Writer) error {
	var spec ChildSpec
	if err := json.Unmarshal([]byte(os.Getenv(ChildEnv)), &spec); err != nil {
		return fmt.Errorf("mdnsbench: child spec: %w", err)
	}
	reg, err := micro.NewMDNSRegistry(spec.Options()...)
	if err != nil {
		return err
	}
	defer reg.Close()
	ctx := context.Background()
	switch spec.Kind {
	case KindService:
		svc := micro.NewService(micro.Name(spec.Name), micro.Version("1.0.0"), micro.Address("127.0.0.1:0"),
			micro.WithRegistry(reg), micro.HandleSignal(false), micro.Args())
		fmt.Fprintf(stdout, "%s%d\n", lineRegister, time.Now().UnixNano())
		if err := svc.Start(); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s%d\n", lineRegistered, time.Now().UnixNano())
		defer svc.Close()
	default:
		info := HelloWorld(spec.Name, spec.ID, spec.addr(), 0, 0)
		fmt.Fprintf(stdout, "%s%d\n", lineRegister, time.Now().UnixNano())
		if err := reg.Register(ctx, info, 0); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s%d\n", lineRegistered, time.Now().UnixNano())
	}
	_, _ = io.Copy(io.Discard, stdin) // until the parent closes it
	return nil
}

// child is a running service process.
type child struct {
	cmd        *exec.Cmd
	stdin      io.WriteCloser
	lines      chan string
	started    time.Time // just before exec
	register   time.Time // the child's clock just before Register
	registered time.Time
}

// startChild execs cmd (a base command from the caller: this binary in the
// child role) with spec in its environment.
func startChild(newCmd func() *exec.Cmd, spec ChildSpec) (*child, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cmd := newCmd()
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, ChildEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 8)}
	c.started = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	return c, nil
}

// wait reads the child's two timestamps.
func (c *child) wait(ctx context.Context) error {
	for c.registered.IsZero() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("mdnsbench: service process: %w", ctx.Err())
		case l, ok := <-c.lines:
			if !ok {
				return errors.New("mdnsbench: service process exited before registering")
			}
			for _, p := range []struct {
				prefix string
				t      *time.Time
			}{{lineRegister, &c.register}, {lineRegistered, &c.registered}} {
				if v, ok := strings.CutPrefix(l, p.prefix); ok {
					ns, err := strconv.ParseInt(v, 10, 64)
					if err != nil {
						return fmt.Errorf("mdnsbench: service process said %q", l)
					}
					*p.t = time.Unix(0, ns)
				}
			}
		}
	}
	return nil
}

// stop closes the child's input so that it deregisters and exits.
func (c *child) stop() error {
	c.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		return <-done
	}
}
