package bench

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Report is the outcome of [Run]: every sample, and a row per cell with the
// medians over the rounds.
type Report struct {
	Config  Config // as run, defaults filled in
	Samples []Sample
	Rows    []Row

	Profiled     *Sample   // the profiled run, if there was one
	ProfileFiles [2]string // its server and client profiles
}

// Row is one cell of the matrix: each figure is the median of that figure
// over the rounds, taken on its own.
type Row struct {
	Impl    string
	Payload int
	Callers int
	Rounds  int // samples the medians are taken over

	Rate         float64 // calls per second
	RateSpread   float64 // (max-min)/median of the rate over the rounds
	P50, P99     time.Duration
	CPU          time.Duration // client and server CPU time per call
	ClientAllocs float64
	ServerAllocs float64
	Bytes        float64 // client and server bytes allocated per call
	Errors       int64   // over all rounds
	FirstError   string

	VsGRPC float64 // Rate over grpc's in the same cell; 0 without grpc
}

// Allocs returns the heap allocations per call on both sides.
func (r Row) Allocs() float64 { return r.ClientAllocs + r.ServerAllocs }

// summarise fills Rows from Samples.
func (rep *Report) summarise() {
	type key struct {
		impl            string
		payload, caller int
	}
	groups := map[key][]Sample{}
	for _, s := range rep.Samples {
		k := key{s.Impl, s.Payload, s.Callers}
		groups[k] = append(groups[k], s)
	}
	rep.Rows = rep.Rows[:0]
	for _, payload := range rep.Config.Payloads {
		for _, callers := range rep.Config.Callers {
			grpcRate := 0.0
			if g := groups[key{"grpc", payload, callers}]; len(g) > 0 {
				grpcRate = reportMedian(g, Sample.Rate)
			}
			for _, impl := range rep.Config.Impls {
				g := groups[key{impl, payload, callers}]
				if len(g) == 0 {
					continue
				}
				row := Row{
					Impl: impl, Payload: payload, Callers: callers, Rounds: len(g),
					Rate:         reportMedian(g, Sample.Rate),
					P50:          time.Duration(reportMedian(g, func(s Sample) float64 { return float64(s.P50) })),
					P99:          time.Duration(reportMedian(g, func(s Sample) float64 { return float64(s.P99) })),
					CPU:          time.Duration(reportMedian(g, func(s Sample) float64 { return float64(s.ClientCPU + s.ServerCPU) })),
					ClientAllocs: reportMedian(g, func(s Sample) float64 { return s.ClientAllocs }),
					ServerAllocs: reportMedian(g, func(s Sample) float64 { return s.ServerAllocs }),
					Bytes:        reportMedian(g, func(s Sample) float64 { return s.ClientBytes + s.ServerBytes }),
				}
				lo, hi := g[0].Rate(), g[0].Rate()
				for _, s := range g {
					lo, hi = min(lo, s.Rate()), max(hi, s.Rate())
					row.Errors += s.Errors
					if row.FirstError == "" {
						row.FirstError = s.FirstError
					}
				}
				if row.Rate > 0 {
					row.RateSpread = (hi - lo) / row.Rate
				}
				if grpcRate > 0 {
					row.VsGRPC = row.Rate / grpcRate
				}
				rep.Rows = append(rep.Rows, row)
			}
		}
	}
}

// reportMedian returns the median of f over samples.
func reportMedian(samples []Sample, f func(Sample) float64) float64 {
	v := make([]float64, len(samples))
	for i, s := range samples {
		v[i] = f(s)
	}
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// Markdown returns the rows as a markdown table, followed by a line for each
// cell that had errors.
func (rep *Report) Markdown() string {
	var b strings.Builder
	b.WriteString("| impl | payload | callers | req/s | spread | p50 | p99 | CPU/call | allocs/call | client+server | B/call | vs grpc |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rep.Rows {
		vs := "-"
		if r.VsGRPC > 0 {
			vs = fmt.Sprintf("%.2f×", r.VsGRPC)
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %s | ±%.0f%% | %s | %s | %s | %.1f | %.1f+%.1f | %s | %s |\n",
			r.Impl, reportSize(r.Payload), r.Callers, reportCount(r.Rate), 100*r.RateSpread/2,
			reportLatency(r.P50), reportLatency(r.P99), reportLatency(r.CPU), r.Allocs(), r.ClientAllocs, r.ServerAllocs,
			reportCount(r.Bytes), vs)
	}
	for _, r := range rep.Rows {
		if r.Errors > 0 {
			fmt.Fprintf(&b, "\n%s, %s, %d callers: %d failed calls over %d rounds (first: %s)\n",
				r.Impl, reportSize(r.Payload), r.Callers, r.Errors, r.Rounds, r.FirstError)
		}
	}
	return b.String()
}

// reportSize formats a payload size: "64 B", "4 KiB".
func reportSize(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// reportLatency formats a latency with three significant figures or so.
func reportLatency(d time.Duration) string {
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%dns", d.Nanoseconds())
	case d < 100*time.Microsecond:
		return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}

// reportCount formats a count with thousands separators: "41,203".
func reportCount(f float64) string {
	s := fmt.Sprintf("%.0f", f)
	if len(s) <= 3 {
		return s
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
