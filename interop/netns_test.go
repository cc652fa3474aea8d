package interop_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
)

// The tests run in a private network namespace when they can (root, with
// util-linux unshare and iproute2 ip), as the core's tests do, so that mDNS
// multicast never leaves the machine. Inside, as /work/shared/bin/netns-run
// makes it: lo holds 127.0.0.1 (scope link, so multicast leaves with that
// source) with multicast on and 224.0.0.0/4 routed to it, and veth0/veth1
// are a linked pair with IPv6 link-local addresses only. Loopback TCP, all
// the connect-go tests need, works there as outside. MICRO_NETNS=1 marks
// the inside; MICRO_NO_NETNS=1 keeps a run outside (the mDNS tests then
// skip).
const netnsSetup = `
set -e
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 2>/dev/null || true
ip link set lo up
ip link set lo multicast on
ip addr del 127.0.0.1/8 dev lo
ip addr add 127.0.0.1/8 dev lo scope link
ip route add 224.0.0.0/4 dev lo src 127.0.0.1
ip link add veth0 type veth peer name veth1
ip link set veth0 up
ip link set veth1 up
exec "$@"`

// inNetns reports whether the tests run in their private namespace.
func inNetns() bool { return os.Getenv("MICRO_NETNS") == "1" }

// reexecInNetns runs this test binary again, with the same arguments, in a
// new network namespace, and reports its exit code. ok is false when that
// cannot be done here (not Linux, not root, no unshare or ip, or already
// inside), and the tests then run where they are.
func reexecInNetns() (code int, ok bool) {
	if runtime.GOOS != "linux" || inNetns() || os.Getenv("MICRO_NO_NETNS") == "1" || os.Geteuid() != 0 {
		return 0, false
	}
	unshare, err1 := exec.LookPath("unshare")
	_, err2 := exec.LookPath("ip")
	if err1 != nil || err2 != nil {
		return 0, false
	}
	if exec.Command(unshare, "-n", "true").Run() != nil {
		return 0, false // not permitted here (an unprivileged container)
	}
	cmd := exec.Command(unshare, append([]string{"-n", "sh", "-c", netnsSetup, "netns"}, os.Args...)...)
	cmd.Env = append(os.Environ(), "MICRO_NETNS=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, true
	case errors.As(err, &exit):
		return exit.ExitCode(), true
	}
	fmt.Fprintf(os.Stderr, "interop tests: running outside a network namespace: %v\n", err)
	return 0, false
}
