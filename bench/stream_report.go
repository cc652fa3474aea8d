package bench

import "fmt"

// StreamReport is the outcome of [RunStream]: every sample, and a row per
// cell with the medians over the rounds.
type StreamReport struct {
	Config  StreamConfig // as run, defaults filled in
	Samples []StreamSample
	Rows    []StreamRow

	Profiled     *StreamSample // the profiled run, if there was one
	ProfileFiles [2]string     // its server and client profiles
}

// StreamRow is one cell of the streaming matrix and its [Summary].
type StreamRow struct {
	Impl     string
	Workload string
	Payload  int
	Streams  int
	Summary  // Rate in messages per second; costs per message; no P50 or P99 for Pipelined
}

// summarise fills Rows from Samples.
func (rep *StreamReport) summarise() {
	rep.Rows = rep.Rows[:0]
	for _, r := range reportSummarise(rep.Config.Impls, rep.Config.cells(), rep.Samples, StreamSample.cell) {
		rep.Rows = append(rep.Rows, StreamRow{Impl: r.impl, Workload: r.cell.workload, Payload: r.cell.payload, Streams: r.cell.streams, Summary: r.sum})
	}
}

// Markdown returns the rows as a markdown table, followed by a line for each
// cell that had errors. Pipelined rows have no round trip, so no p50 or p99.
func (rep *StreamReport) Markdown() string {
	t := reportTable{cols: "workload | payload | streams", align: "---|---:|---:|", per: "msg", rate: "msg/s", failures: "errors"}
	for _, r := range rep.Rows {
		t.add(r.Summary, fmt.Sprintf("%s | %s | %s | %d", r.Impl, r.Workload, reportSize(r.Payload), r.Streams),
			fmt.Sprintf("%s, %s, %s, streams=%d", r.Impl, r.Workload, reportSize(r.Payload), r.Streams))
	}
	return t.String()
}
