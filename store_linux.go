package micro

import (
	"os"
	"syscall"
)

// storeDatasync flushes f's data and the metadata needed to read it back
// (its size), as fdatasync(2) does, without the timestamps fsync also
// writes. It holds a reference to the descriptor, so a concurrent Close
// cannot hand the number to another file mid-call.
func storeDatasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	cerr := rc.Control(func(fd uintptr) {
		for {
			err = syscall.Fdatasync(int(fd))
			if err != syscall.EINTR {
				return
			}
		}
	})
	if cerr != nil {
		return cerr
	}
	return err
}
