package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
)

// Serve runs the echo server of implementation name on addr ("127.0.0.1:0"
// picks a port) and speaks a line protocol with the process that drives it.
// Its first line on out is the bound address. Then it answers each line read
// from in:
//
//	stats                  stats mallocs=N bytes=N gcs=N cpu=NS (runtime.MemStats Mallocs, TotalAlloc,
//	                       NumGC; user+system CPU time in ns)
//	cpuprofile-start PATH  ok, once a CPU profile of this process is being written to PATH
//	cpuprofile-stop        ok, once the profile is written and closed
//	quit                   stops
//
// and anything else with "error MESSAGE". It stops at the end of in, on quit,
// or when ctx ends, and returns once the server has stopped. If ctx ends
// first, the goroutine reading in stays blocked until in ends, which is when
// the process exits for cmd/rpcbench.
func Serve(ctx context.Context, name, addr string, in io.Reader, out io.Writer) error {
	impl, err := benchImpls.lookup(name)
	if err != nil {
		return err
	}
	return serveControl(ctx, impl.serve, addr, in, out)
}

// ServeStream is [Serve] for the streaming implementation name (one of
// [StreamImpls]): the same control protocol, in front of its echo stream.
func ServeStream(ctx context.Context, name, addr string, in io.Reader, out io.Writer) error {
	impl, err := streamImpls.lookup(name)
	if err != nil {
		return err
	}
	return serveControl(ctx, impl.serve, addr, in, out)
}

// serveControl listens on addr, starts a server there with serve, and
// answers the control protocol until in ends, quit comes or ctx ends.
func serveControl(ctx context.Context, serve func(net.Listener) (io.Closer, error), addr string, in io.Reader, out io.Writer) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv, err := serve(l)
	if err != nil {
		l.Close()
		return err
	}
	if _, err := fmt.Fprintln(out, l.Addr().String()); err != nil {
		srv.Close()
		return err
	}
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	var prof *os.File
	defer func() {
		if prof != nil {
			pprof.StopCPUProfile()
			prof.Close()
		}
	}()
	for {
		var line string
		var ok bool
		select {
		case <-ctx.Done():
		case line, ok = <-lines:
		}
		if !ok || line == "quit" {
			return srv.Close()
		}
		reply := serveCommand(line, &prof)
		if _, err := fmt.Fprintln(out, reply); err != nil {
			return errors.Join(err, srv.Close())
		}
	}
}

// serveCommand runs one control line and returns the reply.
func serveCommand(line string, prof **os.File) string {
	cmd, arg, _ := strings.Cut(strings.TrimSpace(line), " ")
	switch cmd {
	case "stats":
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return fmt.Sprintf("stats mallocs=%d bytes=%d gcs=%d cpu=%d", ms.Mallocs, ms.TotalAlloc, ms.NumGC, cpuTime())
	case "cpuprofile-start":
		if *prof != nil {
			return "error a CPU profile is running already"
		}
		if arg == "" {
			return "error cpuprofile-start needs a path"
		}
		f, err := os.Create(arg)
		if err != nil {
			return "error " + err.Error()
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return "error " + err.Error()
		}
		*prof = f
		return "ok"
	case "cpuprofile-stop":
		if *prof == nil {
			return "error no CPU profile is running"
		}
		pprof.StopCPUProfile()
		err := (*prof).Close()
		*prof = nil
		if err != nil {
			return "error " + err.Error()
		}
		return "ok"
	}
	return fmt.Sprintf("error unknown command %q; want stats, cpuprofile-start PATH, cpuprofile-stop or quit", cmd)
}
