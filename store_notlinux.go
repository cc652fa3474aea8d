//go:build !linux

package micro

import "os"

// storeDatasync flushes f to stable storage (F_FULLFSYNC on macOS).
func storeDatasync(f *os.File) error { return f.Sync() }
