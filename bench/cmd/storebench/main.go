// Command storebench measures micro's FileStore against bbolt on the same
// disk (see package storebench for what is compared with what), for a
// number of rounds, and prints the medians as a Markdown table.
//
//	go run ./cmd/storebench                    # 100,000 keys, 100 B and 1 KiB values, 3 rounds
//	go run ./cmd/storebench -keys 10000 -rounds 1
//
// Run it wrapped in flock /work/bench.lock on a shared machine.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/micro-kit/micro/bench/storebench"
)

func main() {
	var (
		dir      = flag.String("dir", os.TempDir(), "directory for the engines' files (the disk measured)")
		keys     = flag.Int("keys", 100_000, "keys loaded for the reads and the size")
		values   = flag.String("values", "100,1024", "value sizes in bytes, comma-separated")
		fsyncOps = flag.Int("fsync-ops", 2000, "writes and deletes in the fsync-per-op workloads")
		groupOps = flag.Int("group-ops", 20_000, "writes in the group-commit workload")
		writers  = flag.Int("writers", 64, "concurrent writers in the group-commit workload")
		readFor  = flag.Duration("read-for", 2*time.Second, "how long each read workload runs")
		rounds   = flag.Int("rounds", 3, "rounds; the median of each figure is reported")
		engines  = flag.String("engines", "micro,bbolt", "engines, comma-separated")
		out      = flag.String("out", "", "also write the report to this file")
		cpuProf  = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	)
	flag.Parse()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "storebench: -cpuprofile:", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	cfg := storebench.Config{Dir: *dir, Keys: *keys, FsyncOps: *fsyncOps, GroupOps: *groupOps, Writers: *writers,
		ReadFor: *readFor, Engines: strings.Split(*engines, ",")}
	for _, v := range strings.Split(*values, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			fmt.Fprintln(os.Stderr, "storebench: -values:", err)
			os.Exit(2)
		}
		cfg.ValueSizes = append(cfg.ValueSizes, n)
	}
	var all [][]storebench.Result
	for r := range *rounds {
		res, err := storebench.Run(context.Background(), cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "round %d of %d done\n", r+1, *rounds)
		all = append(all, res)
	}
	w := io.Writer(os.Stdout)
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer f.Close()
		w = io.MultiWriter(os.Stdout, f)
	}
	fmt.Fprintf(w, "storebench: %d keys, %d fsync ops, %d group ops from %d writers, reads for %s each, GOMAXPROCS %d, median of %d rounds, %s\n\n",
		cfg.Keys, cfg.FsyncOps, cfg.GroupOps, cfg.Writers, cfg.ReadFor, runtime.GOMAXPROCS(0), *rounds, time.Now().UTC().Format("2006-01-02"))
	storebench.Report(w, storebench.Median(all))
}
