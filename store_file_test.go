package micro

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func testOpenFile(t *testing.T, dir string, opts ...StoreOption) *FileStore {
	t.Helper()
	s, err := NewFileStore(dir, opts...)
	assertNoError(t, err)
	return s
}

func testReadValue(t *testing.T, s Store, key string, opts ...ReadOption) string {
	t.Helper()
	recs, err := s.Read(context.Background(), key, opts...)
	assertNoError(t, err)
	return string(recs[0].Value)
}

// testLogOffsets returns the offset of each record in a log, in order.
func testLogOffsets(t *testing.T, path string) []int {
	t.Helper()
	data, err := os.ReadFile(path)
	assertNoError(t, err)
	var offs []int
	for off := storeFileHeader; off < len(data); {
		_, n, err := storeDecode(data[off:])
		assertNoError(t, err)
		offs = append(offs, off)
		off += n
	}
	return offs
}

func TestFileStoreReopens(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	dir := t.TempDir()
	clock := newTestClock()
	s := testOpenFile(t, dir, storeClock(clock.Now))
	for i := range 100 {
		assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprintf("k%03d", i), Value: []byte(fmt.Sprint(i)),
			Metadata: map[string]string{"i": fmt.Sprint(i)}}))
	}
	assertNoError(t, s.Write(ctx, &Record{Key: "k000", Value: []byte("over")}))
	assertNoError(t, s.Delete(ctx, "k001"))
	assertNoError(t, s.Write(ctx, &Record{Key: "ttl", Value: []byte("t")}, WriteTTL(time.Minute)))
	assertNoError(t, s.Write(ctx, &Record{Key: "k", Value: []byte("db2")}, WriteTo("second", "tab")))
	// One directory on a case-insensitive file system: refused everywhere.
	assertCode(t, s.Write(ctx, &Record{Key: "k"}, WriteTo("Second", "tab")), CodeInvalidArgument)
	assertNoError(t, s.Close())

	s = testOpenFile(t, dir, storeClock(clock.Now))
	assertEqual(t, len(s.Recovered()), 0)
	assertEqual(t, testReadValue(t, s, "k000"), "over")
	assertEqual(t, testReadValue(t, s, "k050"), "50")
	recs, _ := s.Read(ctx, "k050")
	assertEqual(t, recs[0].Metadata["i"], "50")
	if _, err := s.Read(ctx, "k001"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted key: %v", err)
	}
	recs, err := s.Read(ctx, "ttl")
	assertNoError(t, err)
	assertEqual(t, recs[0].Expiry, time.Minute)
	assertEqual(t, testReadValue(t, s, "k", ReadFrom("second", "tab")), "db2")
	assertNoError(t, s.Close())

	// Expired while closed: gone after replay, and dropped by compaction.
	clock.Add(2 * time.Minute)
	s = testOpenFile(t, dir, storeClock(clock.Now))
	if _, err := s.Read(ctx, "ttl"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired key: %v", err)
	}
	path := filepath.Join(dir, StoreDefaultDatabase, storeLogName)
	before := len(testLogOffsets(t, path))
	assertNoError(t, s.Compact(ctx))
	after := len(testLogOffsets(t, path))
	assertEqual(t, before, 103) // 100, an overwrite, a tombstone, the expired one
	assertEqual(t, after, 99)   // k000..k099 less k001
	assertEqual(t, testReadValue(t, s, "k000"), "over")
	keys, err := s.List(ctx)
	assertNoError(t, err)
	assertEqual(t, len(keys), 99)
	assertNoError(t, s.Close())
	s = testOpenFile(t, dir)
	keys, err = s.List(ctx)
	assertNoError(t, err)
	assertEqual(t, len(keys), 99)
	assertNoError(t, s.Close())
}

func TestFileStoreSecondOpenIsRefused(t *testing.T) {
	checkGoroutines(t)
	dir := t.TempDir()
	s := testOpenFile(t, dir)
	_, err := NewFileStore(dir)
	if !errors.Is(err, ErrStoreLocked) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second open: %v, want ErrStoreLocked naming the directory", err)
	}
	assertNoError(t, s.Close())
	s = testOpenFile(t, dir) // released by Close
	assertNoError(t, s.Close())

	// Not a store log.
	assertNoError(t, os.MkdirAll(filepath.Join(dir, "junk"), 0o755))
	assertNoError(t, os.WriteFile(filepath.Join(dir, "junk", storeLogName), []byte("hello, this is not a log"), 0o600))
	if _, err := NewFileStore(dir); err == nil || !strings.Contains(err.Error(), "not a store log") {
		t.Fatalf("open of a foreign file: %v", err)
	}
	assertNoError(t, os.RemoveAll(filepath.Join(dir, "junk")))
	s = testOpenFile(t, dir) // the failed open released the lock
	assertNoError(t, s.Close())
}

func TestFileStoreTornTailIsCutAndReported(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	for _, cut := range []int{1, 7, 8, 20} {
		t.Run(fmt.Sprint(cut), func(t *testing.T) {
			dir := t.TempDir()
			s := testOpenFile(t, dir)
			for i := range 10 {
				assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprint(i), Value: []byte(strings.Repeat("v", 30))}))
			}
			assertNoError(t, s.Close())
			path := filepath.Join(dir, StoreDefaultDatabase, storeLogName)
			offs := testLogOffsets(t, path)
			st, _ := os.Stat(path)
			// The last record written only in part.
			assertNoError(t, os.Truncate(path, st.Size()-int64(cut)))

			s = testOpenFile(t, dir)
			rec := s.Recovered()
			assertEqual(t, len(rec), 1)
			assertEqual(t, rec[0].Torn, true)
			assertEqual(t, rec[0].Offset, int64(offs[9]))
			assertEqual(t, rec[0].Bytes, st.Size()-int64(cut)-int64(offs[9]))
			keys, err := s.List(ctx)
			assertNoError(t, err)
			assertEqual(t, strings.Join(keys, ""), "012345678")
			assertNoError(t, s.Write(ctx, &Record{Key: "9", Value: []byte("again")}))
			assertNoError(t, s.Close())
			s = testOpenFile(t, dir)
			assertEqual(t, len(s.Recovered()), 0)
			assertEqual(t, testReadValue(t, s, "9"), "again")
			assertNoError(t, s.Close())
		})
	}
	// Zeros after the last record, as a file system can leave after a
	// crash, are a torn tail too.
	dir := t.TempDir()
	s := testOpenFile(t, dir)
	assertNoError(t, s.Write(ctx, &Record{Key: "a", Value: []byte("1")}))
	assertNoError(t, s.Close())
	f, err := os.OpenFile(filepath.Join(dir, StoreDefaultDatabase, storeLogName), os.O_WRONLY|os.O_APPEND, 0)
	assertNoError(t, err)
	f.Write(make([]byte, 4096))
	f.Close()
	s = testOpenFile(t, dir)
	assertEqual(t, s.Recovered()[0].Bytes, int64(4096))
	assertEqual(t, testReadValue(t, s, "a"), "1")
	assertNoError(t, s.Close())
}

func TestFileStoreFlippedByteIsDetected(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	dir := t.TempDir()
	s := testOpenFile(t, dir)
	for i := range 100 {
		assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprintf("k%03d", i), Value: []byte(fmt.Sprintf("value %d", i))}))
	}
	assertNoError(t, s.Write(ctx, &Record{Key: "k050", Value: []byte("newer")}))
	assertNoError(t, s.Close())
	path := filepath.Join(dir, StoreDefaultDatabase, storeLogName)
	offs := testLogOffsets(t, path)
	data, err := os.ReadFile(path)
	assertNoError(t, err)
	good := append([]byte(nil), data...)

	// A flipped bit in each part of a record in the middle: the length,
	// the checksum, the key, the value.
	for _, at := range []int{0, 5, 22, offs[41] - offs[40] - 2} {
		data := append([]byte(nil), good...)
		data[offs[40]+at] ^= 0x10
		assertNoError(t, os.WriteFile(path, data, 0o600))
		_, err := NewFileStore(dir)
		var corrupt *StoreCorruptError
		if !errors.As(err, &corrupt) {
			t.Fatalf("byte %d of a record flipped: open gave %v, want a StoreCorruptError", at, err)
		}
		assertEqual(t, corrupt.Offset, int64(offs[40]))
		assertEqual(t, corrupt.Path, path)
		if !strings.Contains(err.Error(), fmt.Sprint(offs[40])) || !strings.Contains(err.Error(), "SkipCorrupt") {
			t.Fatalf("the error does not say where or what to do: %v", err)
		}
		if corrupt.Next <= corrupt.Offset || int(corrupt.Next) > offs[41] {
			t.Fatalf("next intact record at %d, want in (%d, %d]", corrupt.Next, offs[40], offs[41])
		}
	}

	// SkipCorrupt drops it, keeps the rest, and rewrites the log.
	data = append([]byte(nil), good...)
	data[offs[40]+20] ^= 0x01
	assertNoError(t, os.WriteFile(path, data, 0o600))
	s = testOpenFile(t, dir, SkipCorrupt())
	rec := s.Recovered()
	assertEqual(t, len(rec), 1)
	assertEqual(t, rec[0].Torn, false)
	assertEqual(t, rec[0].Offset, int64(offs[40]))
	if _, err := s.Read(ctx, "k040"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the damaged record: %v", err)
	}
	assertEqual(t, testReadValue(t, s, "k039"), "value 39")
	assertEqual(t, testReadValue(t, s, "k050"), "newer")
	keys, _ := s.List(ctx)
	assertEqual(t, len(keys), 99)
	assertNoError(t, s.Close())
	s = testOpenFile(t, dir) // compacted: opens without the option
	assertEqual(t, len(s.Recovered()), 0)
	assertNoError(t, s.Close())
}

// TestFileStoreDamageWhileOpenIsNotServed damages a record under a running
// store: reads of it fail, through the mapping and through pread, and a
// compaction refuses to copy it.
func TestFileStoreDamageWhileOpenIsNotServed(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	for _, kind := range []struct {
		name string
		opts []StoreOption
	}{{"mmap", nil}, {"pread", []StoreOption{storeOption{store: func(o *storeOptions) { o.noMmap = true }}}}} {
		t.Run(kind.name, func(t *testing.T) {
			dir := t.TempDir()
			s := testOpenFile(t, dir, kind.opts...)
			defer s.Close()
			for i := range 10 {
				assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprint(i), Value: []byte("intact value")}))
			}
			path := filepath.Join(dir, StoreDefaultDatabase, storeLogName)
			offs := testLogOffsets(t, path)
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			assertNoError(t, err)
			_, err = f.WriteAt([]byte("X"), int64(offs[5]+storeHeadLen+14))
			assertNoError(t, err)
			_, err = f.WriteAt([]byte("X"), int64(offs[8]-1)) // the last byte of 7's value
			assertNoError(t, err)
			f.Close()
			var corrupt *StoreCorruptError
			if _, err := s.Read(ctx, "5"); !errors.As(err, &corrupt) || corrupt.Offset != int64(offs[5]) {
				t.Fatalf("read of a damaged record: %v", err)
			}
			if _, err := s.Read(ctx, "7"); !errors.As(err, &corrupt) || corrupt.Offset != int64(offs[7]) {
				t.Fatalf("read of a record with a damaged value: %v", err)
			}
			if _, err := s.Read(ctx, "", ReadPrefix()); !errors.As(err, &corrupt) {
				t.Fatalf("prefix read over a damaged record: %v", err)
			}
			for _, keys := range [][]string{{"4", "5"}, {"7", "1"}} {
				if _, err := s.ReadMany(ctx, keys); !errors.As(err, &corrupt) {
					t.Fatalf("ReadMany of %q: %v", keys, err)
				}
			}
			assertEqual(t, testReadValue(t, s, "4"), "intact value")
			if err := s.Compact(ctx); !errors.As(err, &corrupt) {
				t.Fatalf("compaction over a damaged record: %v", err)
			}
			// Through the wire it is data_loss.
			assertCode(t, storeWireError(&StoreCorruptError{Path: path}), CodeDataLoss)
		})
	}
}

// TestFileStoreReadsWhileTheLogGrows reads while a writer grows the log
// past several remappings (1 MiB, 2, 4, 8) and compactions swap the file
// and its mapping: every read returns an acknowledged value whole, of
// every size the read allocator has a class for, and some over 4 KiB.
func TestFileStoreReadsWhileTheLogGrows(t *testing.T) {
	checkGoroutines(t)
	for _, kind := range []struct {
		name string
		opts []StoreOption
	}{
		{"mmap", nil},
		{"pread", []StoreOption{storeOption{store: func(o *storeOptions) { o.noMmap = true }}}},
	} {
		t.Run(kind.name, func(t *testing.T) {
			ctx := context.Background()
			s := testOpenFile(t, t.TempDir(), append([]StoreOption{SyncInterval(time.Hour), CompactThreshold(-1)}, kind.opts...)...)
			defer s.Close()
			const keys, writes = 64, 3000
			size := func(n int) int { return n * 37 % 5200 }
			value := func(k, n int) []byte {
				v := make([]byte, size(n))
				for i := range v {
					v[i] = byte(k + n + i)
				}
				return v
			}
			var acked [keys]atomic.Int64     // the round of the last acknowledged write, from 1
			var begun [keys]atomic.Int64     // the round of the last write begun
			compacted := make(chan struct{}) // compactions stop a third of the way, and the log grows
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			done := make(chan struct{})
			wg.Add(1)
			go func() { // the writer
				defer wg.Done()
				defer close(done)
				for n := 1; n <= writes; n++ {
					k := n % keys
					if n == writes/3 {
						close(compacted)
					}
					begun[k].Store(int64(n))
					if err := s.Write(ctx, &Record{Key: fmt.Sprint(k), Value: value(k, n)}); err != nil {
						errs <- err
						return
					}
					acked[k].Store(int64(n))
				}
			}()
			wg.Add(1)
			go func() { // compactions, now and then
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-compacted:
						return
					default:
					}
					if err := s.Compact(ctx); err != nil {
						errs <- err
						return
					}
					if i%4 == 3 {
						runtime.Gosched()
					}
				}
			}()
			for r := range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(r), 5))
					for {
						select {
						case <-done:
							return
						default:
						}
						k := rng.IntN(keys)
						before := acked[k].Load()
						recs, err := s.Read(ctx, fmt.Sprint(k))
						latest := begun[k].Load()
						if errors.Is(err, ErrNotFound) && before == 0 {
							continue
						}
						if err != nil {
							errs <- err
							return
						}
						v := recs[0].Value
						n := int64(0) // the round whose value this is: its size and bytes say
						for m := before; m <= latest; m++ {
							if m > 0 && int(m)%keys == k && string(v) == string(value(k, int(m))) {
								n = m
								break
							}
						}
						if n == 0 || cap(v) != len(v) {
							errs <- fmt.Errorf("key %d: a value of %d bytes (cap %d) that no write since round %d made", k, len(v), cap(v), before)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if kind.opts == nil {
				l, err := s.log(StoreDefaultDatabase, false)
				assertNoError(t, err)
				l.mu.RLock()
				mapped := len(l.mapped)
				l.mu.RUnlock()
				if mapped < 8<<20 {
					t.Fatalf("the mapping is %d bytes: the log did not grow through the remappings", mapped)
				}
			}
			for k := range keys {
				n := int(acked[k].Load())
				recs, err := s.Read(ctx, fmt.Sprint(k))
				assertNoError(t, err)
				if string(recs[0].Value) != string(value(k, n)) {
					t.Fatalf("key %d: not the value of round %d", k, n)
				}
			}
		})
	}
}

func TestStoreReadAlloc(t *testing.T) {
	for n := range 4200 {
		rec, out, buf := storeReadAlloc(n)
		if len(out) != 1 || out[0] != rec || len(buf) != n || cap(buf) != n {
			t.Fatalf("n %d: %d records, buffer %d/%d", n, len(out), len(buf), cap(buf))
		}
	}
	for _, n := range []int{0, 132, 1056, 4024, 4025} {
		want := 1.0
		if n > 4024 {
			want = 2
		}
		if got := testing.AllocsPerRun(100, func() { storeReadAlloc(n) }); got != want {
			t.Fatalf("n %d: %v allocations, want %v", n, got, want)
		}
	}
}

// TestFileStoreCompactionUnderLoad runs writers, deleters and readers while
// compactions run back to back, and checks that nothing acknowledged is
// lost and nothing deleted returns.
func TestFileStoreCompactionUnderLoad(t *testing.T) {
	checkGoroutines(t)
	for _, kind := range []struct {
		name string
		opts []StoreOption
	}{
		{"group-commit", []StoreOption{SyncGroupCommit()}},
		{"interval-pread", []StoreOption{SyncInterval(time.Millisecond), storeOption{store: func(o *storeOptions) { o.noMmap = true }}}},
		{"auto", []StoreOption{SyncGroupCommit(), CompactThreshold(1)}},
	} {
		t.Run(kind.name, func(t *testing.T) { testCompactionUnderLoad(t, kind.opts) })
	}
}

func testCompactionUnderLoad(t *testing.T, opts []StoreOption) {
	ctx := context.Background()
	dir := t.TempDir()
	s := testOpenFile(t, dir, opts...)
	const writers, keys, rounds = 4, 25, 12
	value := func(w, k, n int) string { return fmt.Sprintf("w%d k%d n%d %s", w, k, n, strings.Repeat("x", n%40)) }
	var acked [writers][keys]atomic.Int64 // last acknowledged round; negative: deleted
	var begun [writers][keys]atomic.Int64 // last round begun
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 16)
	progress := make(chan struct{}, 1) // a compaction per few writes, not back to back
	var ops atomic.Int64
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 1; n <= rounds; n++ {
				for k := range keys {
					key := fmt.Sprintf("w%d/k%d", w, k)
					begun[w][k].Store(int64(n))
					if (k+n)%7 == 0 {
						if err := s.Delete(ctx, key); err != nil {
							errs <- err
							return
						}
						acked[w][k].Store(-int64(n))
						continue
					}
					if err := s.Write(ctx, &Record{Key: key, Value: []byte(value(w, k, n))}); err != nil {
						errs <- err
						return
					}
					acked[w][k].Store(int64(n))
					if ops.Add(1)%10 == 0 {
						select {
						case progress <- struct{}{}:
						default:
						}
					}
				}
			}
		}()
	}
	var readers sync.WaitGroup
	for r := range 2 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 9))
			for range 2000 {
				select {
				case <-stop:
					return
				default:
				}
				w, k := rng.IntN(writers), rng.IntN(keys)
				before := acked[w][k].Load()
				recs, err := s.Read(ctx, fmt.Sprintf("w%d/k%d", w, k))
				latest := begun[w][k].Load()
				if errors.Is(err, ErrNotFound) {
					if before > 0 && latest == before { // written, and nothing begun since
						errs <- fmt.Errorf("w%d/k%d: not found after round %d was acknowledged", w, k, before)
						return
					}
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				var gw, gk, gn int
				fmt.Sscanf(string(recs[0].Value), "w%d k%d n%d", &gw, &gk, &gn)
				if gw != w || gk != k || string(recs[0].Value) != value(w, k, gn) || before > 0 && int64(gn) < before || int64(gn) > latest {
					errs <- fmt.Errorf("w%d/k%d: read %q after round %d was acknowledged", w, k, recs[0].Value, before)
					return
				}
				if _, err := s.Read(ctx, fmt.Sprintf("w%d/", w), ReadPrefix(), ReadLimit(10)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	compactions := 0
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for running := true; running; {
		select {
		case <-done:
			running = false
		case <-progress:
			if err := s.Compact(ctx); err != nil {
				t.Fatal(err)
			}
			compactions++
		}
	}
	close(stop)
	readers.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	check := func(s *FileStore) {
		t.Helper()
		for w := range writers {
			for k := range keys {
				key := fmt.Sprintf("w%d/k%d", w, k)
				n := acked[w][k].Load()
				recs, err := s.Read(ctx, key)
				if n < 0 {
					if !errors.Is(err, ErrNotFound) {
						t.Fatalf("%s: deleted in round %d, read %v %v", key, -n, recs, err)
					}
					continue
				}
				assertNoError(t, err)
				assertEqual(t, string(recs[0].Value), value(w, k, int(n)))
			}
		}
	}
	check(s)
	assertNoError(t, s.Compact(ctx))
	check(s)
	assertNoError(t, s.Close())
	s = testOpenFile(t, dir)
	check(s)
	assertEqual(t, len(s.Recovered()), 0)
	assertNoError(t, s.Close())
	t.Logf("%d compactions", compactions)
}

// TestFileStoreAutoCompaction overwrites one key until garbage passes the
// threshold: a compaction starts by itself and shrinks the log.
func TestFileStoreAutoCompaction(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	dir := t.TempDir()
	s := testOpenFile(t, dir, CompactThreshold(4096), SyncInterval(time.Hour))
	var written int64
	for i := range 3000 {
		v := []byte(fmt.Sprintf("%d %s", i, strings.Repeat("v", 100)))
		assertNoError(t, s.Write(ctx, &Record{Key: "k", Value: v}))
		written += int64(len(storeAppendRecord(nil, 0, 0, StoreDefaultTable, "k", nil, v)))
	}
	assertNoError(t, s.Close()) // waits for the compaction
	st, err := os.Stat(filepath.Join(dir, StoreDefaultDatabase, storeLogName))
	assertNoError(t, err)
	if st.Size() >= written {
		t.Fatalf("log of %d bytes after writing %d: no compaction ran", st.Size(), written)
	}
	s = testOpenFile(t, dir)
	assertEqual(t, strings.HasPrefix(testReadValue(t, s, "k"), "2999 "), true)
	assertNoError(t, s.Close())
}

// TestFileStoreCrash is the crash test: a child process writes and prints
// each key once its Write returns; the parent kills it with SIGKILL at a
// random moment, reopens the store, and checks that it opens cleanly and
// holds every printed key with its value. The store's directory carries
// over from one iteration to the next, so each child also recovers from the
// kill before it. Children alternate between fsync per write and group
// commit, and compact often, so kills land in compactions too.
func TestFileStoreCrash(t *testing.T) {
	if os.Getenv("MICRO_STORE_CRASH_DIR") != "" {
		t.Skip("in the child")
	}
	checkGoroutines(t)
	iterations := 100
	if testing.Short() {
		iterations = 20
	}
	exe, err := os.Executable()
	assertNoError(t, err)
	dir := t.TempDir()
	last := map[string]int{} // key → last n printed
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	ctx := context.Background()
	for it := range iterations {
		cmd := exec.Command(exe, "-test.run=^TestFileStoreCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "MICRO_STORE_CRASH_DIR="+dir, "MICRO_STORE_CRASH_ITER="+fmt.Sprint(it), "MICRO_NO_NETNS=1")
		out, err := cmd.StdoutPipe()
		assertNoError(t, err)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		assertNoError(t, cmd.Start())
		sc := bufio.NewScanner(out)
		killAfter := rng.IntN(120) // lines
		seen, killed := 0, false
		for sc.Scan() {
			line := sc.Text()
			if line == "open" {
				if killAfter == 0 {
					cmd.Process.Kill()
					killed = true
				}
				continue
			}
			key, n, ok := strings.Cut(line, " ")
			if !ok {
				continue // go test's own output
			}
			v, err := strconv.Atoi(n)
			assertNoError(t, err)
			last[key] = v
			seen++
			if seen == killAfter && !killed {
				cmd.Process.Kill()
				killed = true
			}
		}
		err = cmd.Wait()
		if !killed || err == nil {
			t.Fatalf("iteration %d: the child ended by itself (%v): %s", it, err, stderr.String())
		}
		if strings.Contains(stderr.String(), "FAIL") || strings.Contains(stderr.String(), "panic") {
			t.Fatalf("iteration %d: child: %s", it, stderr.String())
		}

		s, err := NewFileStore(dir)
		if err != nil {
			t.Fatalf("iteration %d: reopening after kill -9: %v", it, err)
		}
		for _, r := range s.Recovered() {
			if !r.Torn {
				t.Fatalf("iteration %d: damage other than a torn tail: %+v", it, r)
			}
		}
		for key, n := range last {
			recs, err := s.Read(ctx, key)
			if err != nil {
				t.Fatalf("iteration %d: key %s, printed at n=%d: %v", it, key, n, err)
			}
			var got int
			fmt.Sscanf(string(recs[0].Value), "%d", &got)
			if got < n || string(recs[0].Value) != testCrashValue(got) {
				t.Fatalf("iteration %d: key %s printed at n=%d holds %q", it, key, n, recs[0].Value)
			}
		}
		assertNoError(t, s.Close())
	}
	t.Logf("%d keys checked after %d kills", len(last), iterations)
}

func testCrashValue(n int) string {
	return fmt.Sprintf("%d %s", n, strings.Repeat("v", n%300))
}

// TestFileStoreCrashChild is the child of TestFileStoreCrash: it writes
// until it is killed.
func TestFileStoreCrashChild(t *testing.T) {
	dir := os.Getenv("MICRO_STORE_CRASH_DIR")
	if dir == "" {
		t.Skip("run by TestFileStoreCrash")
	}
	it, _ := strconv.Atoi(os.Getenv("MICRO_STORE_CRASH_ITER"))
	opts := []StoreOption{CompactThreshold(16 << 10)}
	writers := 1
	if it%2 == 1 {
		opts, writers = append(opts, SyncGroupCommit()), 4
	}
	s, err := NewFileStore(dir, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL open:", err)
		os.Exit(1)
	}
	var mu sync.Mutex
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintln(w, "open")
	w.Flush()
	var wg sync.WaitGroup
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				n := it*1_000_000 + i
				key := fmt.Sprintf("g%d-k%d", g, i%200) // overwritten, so compactions run
				if err := s.Write(context.Background(), &Record{Key: key, Value: []byte(testCrashValue(n))}); err != nil {
					fmt.Fprintln(os.Stderr, "FAIL write:", err)
					os.Exit(1)
				}
				mu.Lock()
				fmt.Fprintf(w, "%s %d\n", key, n)
				w.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// FuzzStoreRecord decodes arbitrary bytes as a record: it never panics, and
// whatever decodes encodes back to the same bytes.
func FuzzStoreRecord(f *testing.F) {
	f.Add(storeAppendRecord(nil, 0, 0, "micro", "key", nil, []byte("value")))
	f.Add(storeAppendRecord(nil, 0, 123456789, "t", "k/é", map[string]string{"a": "1", "b": ""}, nil))
	f.Add(storeAppendRecord(nil, storeFlagTombstone, 0, "micro", "gone", nil, nil))
	f.Add([]byte{})
	f.Add(make([]byte, 40))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, err := storeDecode(b)
		if err != nil {
			return
		}
		if n > len(b) {
			t.Fatalf("size %d past %d bytes", n, len(b))
		}
		var meta map[string]string
		if r.nmeta > 0 {
			meta = r.metadata()
		}
		var flags byte
		if r.tomb {
			flags = storeFlagTombstone
		}
		again := storeAppendRecord(nil, flags, r.expires, string(r.table), string(r.key), meta, r.value)
		if string(again) != string(b[:n]) {
			// Only metadata written out of key order, or a repeated
			// metadata key, can differ.
			if len(meta) == r.nmeta && storeMetaSorted(r) {
				t.Fatalf("re-encoding differs:\n%x\n%x", again, b[:n])
			}
		}
	})
}

// storeMetaSorted reports whether a record's metadata keys are in strictly
// increasing order, as the encoder writes them.
func storeMetaSorted(r storeRaw) bool {
	b, prev := r.meta, ""
	for i := range r.nmeta {
		var k []byte
		k, b, _ = storeField(b)
		_, b, _ = storeField(b)
		if i > 0 && string(k) <= prev {
			return false
		}
		prev = string(k)
	}
	return true
}

// FuzzStoreReplay opens a store whose log is arbitrary bytes after the
// header: it opens or refuses with an error, never panics, and what it
// serves is intact and survives a reopen.
func FuzzStoreReplay(f *testing.F) {
	var log []byte
	log = storeAppendRecord(log, 0, 0, "micro", "a", nil, []byte("1"))
	log = storeAppendRecord(log, 0, 0, "t", "b", map[string]string{"m": "v"}, []byte("2"))
	log = storeAppendRecord(log, storeFlagTombstone, 0, "micro", "a", nil, nil)
	log = storeAppendRecord(log, 0, 1, "micro", "expired", nil, nil)
	f.Add(log, false)
	f.Add(log[:len(log)-3], false)
	bad := append([]byte(nil), log...)
	bad[12] ^= 1
	f.Add(bad, false)
	f.Add(bad, true)
	f.Add([]byte("garbage"), true)
	f.Fuzz(func(t *testing.T, body []byte, skip bool) {
		dir := t.TempDir()
		assertNoError(t, os.MkdirAll(filepath.Join(dir, "db"), 0o755))
		path := filepath.Join(dir, "db", storeLogName)
		assertNoError(t, os.WriteFile(path, append(storeMagic[:], body...), 0o600))
		var opts []StoreOption
		if skip {
			opts = append(opts, SkipCorrupt())
		}
		s, err := NewFileStore(dir, opts...)
		if err != nil {
			var corrupt *StoreCorruptError
			if skip || !errors.As(err, &corrupt) {
				t.Fatalf("open: %v", err)
			}
			return
		}
		ctx := context.Background()
		served := map[string]string{}
		l := (*s.dbs.Load())["db"]
		var tables []string
		l.mu.RLock()
		for table := range l.tables {
			tables = append(tables, table)
		}
		l.mu.RUnlock()
		for _, table := range tables {
			recs, err := s.Read(ctx, "", ReadPrefix(), ReadFrom("db", table))
			if err != nil {
				t.Fatalf("read of table %q: %v", table, err)
			}
			for _, r := range recs {
				served[table+"\x00"+r.Key] = string(r.Value)
			}
		}
		assertNoError(t, s.Write(ctx, &Record{Key: "after", Value: []byte("x")}, WriteTo("db", "")))
		assertNoError(t, s.Close())
		s, err = NewFileStore(dir)
		if err != nil {
			t.Fatalf("reopen: %v", err)
		}
		defer s.Close()
		for k, v := range served {
			table, key, _ := strings.Cut(k, "\x00")
			if got := testReadValue(t, s, key, ReadFrom("db", table)); got != v {
				t.Fatalf("%q after reopen: %q, want %q", k, got, v)
			}
		}
	})
}

// BenchmarkFileStoreRead reads random keys of 100,000 from one goroutine,
// with 100 B and 1 KiB values.
func BenchmarkFileStoreRead(b *testing.B) { benchmarkFileStoreRead(b, 1) }

// BenchmarkFileStoreReadMany reads the same keys 16 a call, with ReadMany;
// an op is one key.
func BenchmarkFileStoreReadMany(b *testing.B) { benchmarkFileStoreRead(b, 16) }

func benchmarkFileStoreRead(b *testing.B, batch int) {
	for _, vs := range []int{100, 1024} {
		b.Run(fmt.Sprintf("%dB", vs), func(b *testing.B) {
			s, keys := benchmarkFileStoreLoad(b, vs)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += batch {
				var err error
				if batch == 1 {
					_, err = s.Read(ctx, keys(i, 1)[0])
				} else {
					_, err = s.ReadMany(ctx, keys(i, batch))
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchmarkFileStoreLoad opens a file store holding 100,000 keys with
// values of vs bytes, and returns it with a million random keys of it in
// the order to read them: the keys end to end in one string, walked front
// to back, so that finding the next costs the loop no cache miss (as a
// key just parsed from a request would not), and the reads measure the
// store. The keys of a batch are cut from the string into a small slice.
func benchmarkFileStoreLoad(b *testing.B, vs int) (*FileStore, func(i, n int) []string) {
	s, err := NewFileStore(b.TempDir(), SyncInterval(time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	ctx := context.Background()
	const n, w, count = 100_000, 7, 1 << 20
	for i := range n {
		if err := s.Write(ctx, &Record{Key: fmt.Sprintf("k%06d", i), Value: make([]byte, vs)}); err != nil {
			b.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var all strings.Builder
	for range count {
		fmt.Fprintf(&all, "k%06d", rng.IntN(n))
	}
	text := all.String()
	keys := make([]string, 0, 64)
	return s, func(i, n int) []string {
		keys = keys[:0]
		for j := range n {
			at := (i + j) % count * w
			keys = append(keys, text[at:at+w])
		}
		return keys
	}
}

// BenchmarkFileStoreReadPrefix reads 1,000 records (100 B values) by prefix.
func BenchmarkFileStoreReadPrefix(b *testing.B) {
	s, err := NewFileStore(b.TempDir(), SyncInterval(time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for i := range 100_000 {
		if err := s.Write(ctx, &Record{Key: fmt.Sprintf("k%06d", i), Value: make([]byte, 100)}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		recs, err := s.Read(ctx, fmt.Sprintf("k%03d", i%100), ReadPrefix())
		if err != nil || len(recs) != 1000 {
			b.Fatal(len(recs), err)
		}
	}
}
