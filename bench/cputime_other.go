//go:build !unix

package bench

import "time"

// cpuTime returns 0 where getrusage is missing: the CPU column reads 0.
func cpuTime() time.Duration { return 0 }
