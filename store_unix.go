//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package micro

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// storeLockDir takes an exclusive flock(2) on path, without waiting. flock
// locks belong to an open file description, so a second FileStore in the
// same process is refused as surely as one in another process, and the
// kernel drops the lock when the process dies (no stale lock after kill -9).
func storeLockDir(path string) (func() error, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w (%s is held)", ErrStoreLocked, path)
		}
		return nil, fmt.Errorf("micro: store: locking %s: %w", path, err)
	}
	return f.Close, nil // closing the file releases the lock
}

// storeMmap maps size bytes of f read-only (past its end is allowed; the
// store never touches those pages), or returns nil if it cannot.
func storeMmap(f *os.File, size int64) []byte {
	if size <= 0 || int64(int(size)) != size {
		return nil
	}
	b, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil
	}
	return b
}

func storeMunmap(b []byte) {
	if b != nil {
		syscall.Munmap(b)
	}
}

// storeSyncDir makes a rename or a new file in dir durable.
func storeSyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
