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

// Row is one cell of the matrix and its [Summary].
type Row struct {
	Impl    string
	Payload int
	Callers int
	Summary // Rate in calls per second; costs per call
}

// Summary is one implementation's figures in one cell over the rounds: each
// is the median of that figure over the rounds, taken on its own. An
// operation is a call, or a streamed message.
type Summary struct {
	Rounds int // samples the medians are taken over

	Rate         float64 // operations per second
	RateSpread   float64 // (max-min)/median of the rate over the rounds
	P50, P99     time.Duration
	CPU          time.Duration // client and server CPU time per operation
	ClientAllocs float64
	ServerAllocs float64
	Bytes        float64 // client and server bytes allocated per operation
	Errors       int64   // over all rounds
	FirstError   string

	VsGRPC float64 // Rate over grpc's in the same cell; 0 without grpc
}

// Allocs returns the heap allocations per operation on both sides.
func (s Summary) Allocs() float64 { return s.ClientAllocs + s.ServerAllocs }

// summarise fills Rows from Samples.
func (rep *Report) summarise() {
	rep.Rows = rep.Rows[:0]
	for _, r := range reportSummarise(rep.Config.Impls, rep.Config.cells(), rep.Samples, Sample.cell) {
		rep.Rows = append(rep.Rows, Row{Impl: r.impl, Payload: r.cell.payload, Callers: r.cell.callers, Summary: r.sum})
	}
}

// reportRow is an implementation's Summary in a cell of type C.
type reportRow[C any] struct {
	impl string
	cell C
	sum  Summary
}

// reportSummarise groups samples by implementation and cell, and returns a
// row for each group: cells in the order given, implementations in impls'
// order within a cell.
func reportSummarise[C comparable, S interface{ view() runView }](impls []string, cells []C, samples []S, cellOf func(S) C) []reportRow[C] {
	type key struct {
		impl string
		cell C
	}
	groups := map[key][]runView{}
	for _, s := range samples {
		v := s.view()
		k := key{v.impl, cellOf(s)}
		groups[k] = append(groups[k], v)
	}
	var rows []reportRow[C]
	for _, cell := range cells {
		grpcRate := 0.0
		if g := groups[key{"grpc", cell}]; len(g) > 0 {
			grpcRate = reportMedian(g, func(v runView) float64 { return v.rate })
		}
		for _, impl := range impls {
			if g := groups[key{impl, cell}]; len(g) > 0 {
				rows = append(rows, reportRow[C]{impl, cell, reportSummary(g, grpcRate)})
			}
		}
	}
	return rows
}

// reportSummary returns the figures of g, the samples of one implementation
// in one cell; grpcRate is grpc's median rate there, or 0.
func reportSummary(g []runView, grpcRate float64) Summary {
	sum := Summary{
		Rounds:       len(g),
		Rate:         reportMedian(g, func(v runView) float64 { return v.rate }),
		P50:          time.Duration(reportMedian(g, func(v runView) float64 { return float64(v.p50) })),
		P99:          time.Duration(reportMedian(g, func(v runView) float64 { return float64(v.p99) })),
		CPU:          time.Duration(reportMedian(g, func(v runView) float64 { return float64(v.costs.ClientCPU + v.costs.ServerCPU) })),
		ClientAllocs: reportMedian(g, func(v runView) float64 { return v.costs.ClientAllocs }),
		ServerAllocs: reportMedian(g, func(v runView) float64 { return v.costs.ServerAllocs }),
		Bytes:        reportMedian(g, func(v runView) float64 { return v.costs.ClientBytes + v.costs.ServerBytes }),
	}
	lo, hi := g[0].rate, g[0].rate
	for _, v := range g {
		lo, hi = min(lo, v.rate), max(hi, v.rate)
		sum.Errors += v.errors
		if sum.FirstError == "" {
			sum.FirstError = v.firstError
		}
	}
	if sum.Rate > 0 {
		sum.RateSpread = (hi - lo) / sum.Rate
	}
	if grpcRate > 0 {
		sum.VsGRPC = sum.Rate / grpcRate
	}
	return sum
}

// reportMedian returns the median of f over samples.
func reportMedian[S any](samples []S, f func(S) float64) float64 {
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
	t := reportTable{cols: "payload | callers", align: "---:|---:|", per: "call", rate: "req/s", failures: "failed calls"}
	for _, r := range rep.Rows {
		t.add(r.Summary, fmt.Sprintf("%s | %s | %d", r.Impl, reportSize(r.Payload), r.Callers),
			fmt.Sprintf("%s, %s, %d callers", r.Impl, reportSize(r.Payload), r.Callers))
	}
	return t.String()
}

// reportTable is a markdown table of rows: an implementation and its cell,
// then the Summary's figures; and after it a line for each row that had
// errors.
type reportTable struct {
	cols     string // the cell's columns, between impl and the rate: "payload | callers"
	align    string // their alignment: "---:|---:|"
	per      string // what an operation is called: "call"
	rate     string // the rate's column: "req/s"
	failures string // what its errors are: "failed calls"

	rows, errors strings.Builder
}

// add adds a row: cells is the implementation and its cell, one value for
// each column, and name says which that is in a line about errors. A row
// without p50 (no round trip to time) shows none.
func (t *reportTable) add(s Summary, cells, name string) {
	vs := "-"
	if s.VsGRPC > 0 {
		vs = fmt.Sprintf("%.2f×", s.VsGRPC)
	}
	p50, p99 := "-", "-"
	if s.P50 > 0 {
		p50, p99 = reportLatency(s.P50), reportLatency(s.P99)
	}
	fmt.Fprintf(&t.rows, "| %s | %s | ±%.0f%% | %s | %s | %s | %.1f | %.1f+%.1f | %s | %s |\n",
		cells, reportCount(s.Rate), 100*s.RateSpread/2,
		p50, p99, reportLatency(s.CPU), s.Allocs(), s.ClientAllocs, s.ServerAllocs, reportCount(s.Bytes), vs)
	if s.Errors > 0 {
		fmt.Fprintf(&t.errors, "\n%s: %d %s over %d rounds (first: %s)\n", name, s.Errors, t.failures, s.Rounds, s.FirstError)
	}
}

func (t *reportTable) String() string {
	return fmt.Sprintf("| impl | %s | %s | spread | p50 | p99 | CPU/%s | allocs/%s | client+server | B/%s | vs grpc |\n", t.cols, t.rate, t.per, t.per, t.per) +
		"|---|" + t.align + strings.Repeat("---:|", 9) + "\n" +
		t.rows.String() + t.errors.String()
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
