//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package micro

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// storeLocked holds the lock files taken in this process, on systems where
// the store has no flock(2): the one piece of package-level state in the
// package, since a second open of one directory must be refused even by
// another FileStore value. It does not stop another process.
var storeLocked sync.Map // absolute path → struct{}

func storeLockDir(path string) (func() error, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	if _, taken := storeLocked.LoadOrStore(abs, struct{}{}); taken {
		return nil, fmt.Errorf("%w (%s is held)", ErrStoreLocked, path)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		storeLocked.Delete(abs)
		return nil, err
	}
	return func() error {
		err := f.Close()
		storeLocked.Delete(abs)
		return err
	}, nil
}

func storeMmap(*os.File, int64) []byte { return nil }

func storeMunmap([]byte) {}

func storeSyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	d.Sync() // not supported for directories everywhere
	return d.Close()
}
