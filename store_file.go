package micro

import (
	"bufio"
	"bytes"
	"container/heap"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// FileStore is a [Store] on disk that survives a crash: an acknowledged
// write is still there after kill -9 (and, with the default sync policy,
// after a power cut).
//
// Each database is a directory under the store's directory holding one
// append-only log, store.log, of checksummed records (a length, a CRC-32C,
// then the table, key, metadata, expiry and value, or a tombstone for a
// delete). An ordered index in memory maps each key to its record's place in
// the log; reads find the key there and copy the record from the file
// through a read-only memory mapping (or pread where there is none), and
// verify its checksum, so they never wait for a writer's fsync. The small
// values of one range read share blocks of 32 KiB (each capped at its
// length).
//
// On open, each log is replayed and every checksum verified. An unfinished
// write at the end (a torn tail) is cut off and reported by
// [FileStore.Recovered] and the logger; a damaged record with intact records
// after it is refused with a [*StoreCorruptError] unless [SkipCorrupt] says
// to drop it. A damaged record is never served.
//
// When more than half of a log, and at least [CompactThreshold] bytes, is
// garbage (overwritten, deleted and expired records), a background
// compaction copies the live records into a new file and renames it over
// the log. Readers go on during the copy; writers wait only while the
// writes made during the copy are appended to the new file.
//
// A lock file in the directory keeps a second FileStore, in this process or
// another, from opening it. Its methods are safe for concurrent use. Close
// waits for background work and releases the directory.
type FileStore struct {
	dir    string
	opts   storeOptions
	unlock func() error

	dbs       atomic.Pointer[map[string]*storeLog] // copied on write
	createMu  sync.Mutex                           // serialises creating a database
	mu        sync.Mutex                           // guards closed, recovered and wg.Add
	closed    bool
	recovered []StoreRecovery
	wg        sync.WaitGroup // compactions and the sync loop
	done      chan struct{}  // closed by Close
}

// StoreRecovery is damage [NewFileStore] repaired when it opened a log.
type StoreRecovery struct {
	Database string
	// Offset is where the damaged bytes began in the log.
	Offset int64
	// Bytes is how many bytes were dropped.
	Bytes int64
	// Torn is true for an unfinished write at the end of the log (cut
	// off), false for a damaged range skipped under SkipCorrupt.
	Torn bool
}

// StoreCorruptError reports a damaged record in a file store's log that has
// intact records after it, so it cannot be an unfinished last write: bit rot,
// a bad disk, or a file edited by hand. [NewFileStore] refuses to open such a
// log unless [SkipCorrupt] is given; a read that finds a record damaged since
// the store opened returns it too (with [CodeDataLoss] over the wire).
type StoreCorruptError struct {
	Path   string // the log
	Offset int64  // where the damaged record begins
	Next   int64  // where the next intact record begins (-1: none known)
	Reason string
}

// Error says where the damage is and what to do about it.
func (e *StoreCorruptError) Error() string {
	if e.Next < 0 {
		return fmt.Sprintf("micro: store: %s: damaged record at offset %d (%s)", e.Path, e.Offset, e.Reason)
	}
	return fmt.Sprintf("micro: store: %s: damaged record at offset %d (%s), with intact records from offset %d: "+
		"not opened; restore the file from a backup, or open it with micro.SkipCorrupt() to drop the %d damaged bytes",
		e.Path, e.Offset, e.Reason, e.Next, e.Next-e.Offset)
}

// ErrStoreLocked is returned by [NewFileStore] for a directory another
// FileStore, in this process or another, has open.
var ErrStoreLocked = errors.New("micro: store directory is open in another FileStore")

// SyncEveryWrite makes each Write and Delete of a [FileStore] return only
// after fdatasync has put it on stable storage, one fsync per write (the
// default).
func SyncEveryWrite() StoreOption {
	return storeOption{store: func(o *storeOptions) { o.sync = storeSyncEveryWrite }}
}

// SyncGroupCommit makes writes that arrive together share one fsync: the
// first writer writes and syncs every record queued behind it while it
// waited, and each Write returns once the fsync that covers it is done. It
// is as durable as SyncEveryWrite, and under concurrent writers much faster.
func SyncGroupCommit() StoreOption {
	return storeOption{store: func(o *storeOptions) { o.sync = storeSyncGroup }}
}

// SyncInterval makes writes return once in the operating system's cache
// (they survive the process being killed) and syncs them every d, so a
// power cut loses at most the last d of writes. Close syncs.
func SyncInterval(d time.Duration) StoreOption {
	return storeOption{store: func(o *storeOptions) {
		o.sync, o.interval = storeSyncInterval, d
		if d <= 0 {
			o.interval = time.Second
		}
	}}
}

// CompactThreshold sets how many bytes of a log must be garbage, besides
// more than half of it, before a compaction starts by itself (default 4 MiB;
// negative: never, leaving it to [FileStore.Compact]).
func CompactThreshold(n int64) StoreOption {
	return storeOption{store: func(o *storeOptions) { o.compactAt = n }}
}

// SkipCorrupt makes [NewFileStore] open a log with damaged records that
// have intact records after them, dropping the damaged bytes (reported by
// [FileStore.Recovered]) and compacting the log, instead of refusing it with
// a [*StoreCorruptError]. A dropped record may have replaced or deleted an
// older one, which then comes back.
func SkipCorrupt() StoreOption {
	return storeOption{store: func(o *storeOptions) { o.skipBad = true }}
}

// The log's layout.
const (
	storeLogName    = "store.log"
	storeLockName   = "LOCK"
	storeHeadLen    = 8 // a record's length and CRC
	storeFileHeader = 16
	storeMaxRecord  = 1 << 28 // bytes in one record, header included

	storeFlagTombstone = 1
)

// storeMagic begins every log: a name and a format version.
var storeMagic = [storeFileHeader]byte{'m', 'i', 'c', 'r', 'o', '-', 's', 't', 'o', 'r', 'e', 0, 1, 0, 0, 0}

var storeCRC = crc32.MakeTable(crc32.Castagnoli)

// NewFileStore opens (creating if needed) the store in dir: it takes the
// directory's lock and replays the log of every database in it. The options
// choose the sync policy (default [SyncEveryWrite]), compaction and
// logging.
func NewFileStore(dir string, opts ...StoreOption) (*FileStore, error) {
	o := storeNewOptions(opts)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("micro: store: %w", err)
	}
	unlock, err := storeLockDir(filepath.Join(dir, storeLockName))
	if err != nil {
		return nil, err
	}
	s := &FileStore{dir: dir, opts: o, unlock: unlock, done: make(chan struct{})}
	dbs := map[string]*storeLog{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		unlock()
		return nil, fmt.Errorf("micro: store: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() || storeCheckNamespace(e.Name(), "t") != nil {
			continue
		}
		path := filepath.Join(dir, e.Name(), storeLogName)
		os.Remove(path + ".compact") // a compaction cut short
		if _, err := os.Stat(path); err != nil {
			continue
		}
		l, err := s.openLog(e.Name())
		if err != nil {
			for _, l := range dbs {
				l.close()
			}
			unlock()
			return nil, err
		}
		dbs[e.Name()] = l
	}
	s.dbs.Store(&dbs)
	if o.sync == storeSyncInterval {
		s.wg.Add(1)
		go s.syncLoop()
	}
	return s, nil
}

// Recovered returns the damage repaired when the store opened, in the
// order found.
func (s *FileStore) Recovered() []StoreRecovery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.recovered)
}

// Dir returns the store's directory.
func (s *FileStore) Dir() string { return s.dir }

// Read returns the record with the key, or with ReadPrefix / ReadSuffix
// every record that matches.
func (s *FileStore) Read(ctx context.Context, key string, opts ...ReadOption) ([]*Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q, exact, err := storeReadQuery(key, opts)
	if err != nil {
		return nil, err
	}
	l, err := s.log(q.db, false)
	if err != nil {
		return nil, err
	}
	if exact {
		if l == nil {
			return nil, storeNotFound(key)
		}
		return l.get(q.table, key)
	}
	if l == nil {
		return []*Record{}, nil
	}
	scan := q // escapes; q, on the path of one key, need not
	return l.scan(&scan, s.opts.now().UnixNano())
}

// Write appends r to its database's log and returns once the sync policy is
// met.
func (s *FileStore) Write(ctx context.Context, r *Record, opts ...WriteOption) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	o, err := storeWriteOpts(r, opts)
	if err != nil {
		return err
	}
	expires := storeExpires(r, &o, s.opts.now())
	buf := storeAppendRecord(make([]byte, 0, storeHeadLen+32+len(o.table)+len(r.Key)+len(r.Value)),
		0, expires, o.table, r.Key, r.Metadata, r.Value)
	if len(buf) > storeMaxRecord {
		return Errorf(CodeInvalidArgument, "micro: store: a record of %d bytes is over the file store's %d", len(buf), storeMaxRecord)
	}
	l, err := s.log(o.db, true)
	if err != nil {
		return err
	}
	return l.commit(&storeCommit{buf: buf, table: o.table, key: r.Key, expires: expires})
}

// Delete appends a tombstone for the key, if it exists.
func (s *FileStore) Delete(ctx context.Context, key string, opts ...DeleteOption) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	q, err := storeDeleteQuery(key, opts)
	if err != nil {
		return err
	}
	l, err := s.log(q.db, false)
	if err != nil || l == nil {
		return err
	}
	if !l.has(q.table, key) {
		return nil
	}
	buf := storeAppendRecord(nil, storeFlagTombstone, 0, q.table, key, nil, nil)
	return l.commit(&storeCommit{buf: buf, table: q.table, key: key, tomb: true})
}

// List returns the keys the options select, in key order. It reads only
// the index.
func (s *FileStore) List(ctx context.Context, opts ...ListOption) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q, err := storeListQuery(opts)
	if err != nil {
		return nil, err
	}
	l, err := s.log(q.db, false)
	if err != nil {
		return nil, err
	}
	keys := []string{}
	if l == nil {
		return keys, nil
	}
	now := s.opts.now().UnixNano()
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return nil, ErrClosed
	}
	storeScan(l.tables[q.table].ordered(), &q, func(v storeLoc) bool { return storeLive(v.expires, now) },
		func(k string, _ storeLoc) { keys = append(keys, k) })
	return keys, nil
}

// Compact rewrites the log of every database now, dropping overwritten,
// deleted and expired records. Reads go on meanwhile; writes wait only for
// the final swap.
func (s *FileStore) Compact(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.wg.Add(1) // so Close waits for it
	s.mu.Unlock()
	defer s.wg.Done()
	var errs []error
	for _, l := range *s.dbs.Load() {
		errs = append(errs, l.compact(ctx))
	}
	return errors.Join(errs...)
}

// Close syncs (under SyncInterval), waits for background compactions and
// writes in flight, closes every log and releases the directory. It is
// idempotent.
func (s *FileStore) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	s.wg.Wait()
	s.createMu.Lock() // no database is being created
	defer s.createMu.Unlock()
	var errs []error
	for _, l := range *s.dbs.Load() {
		errs = append(errs, l.close())
	}
	errs = append(errs, s.unlock())
	return errors.Join(errs...)
}

// log returns the database's log, creating it if create is set; nil
// (without error) for a database that does not exist.
func (s *FileStore) log(db string, create bool) (*storeLog, error) {
	if l := (*s.dbs.Load())[db]; l != nil {
		return l, nil
	}
	if !create {
		s.mu.Lock()
		closed := s.closed
		s.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		return nil, nil
	}
	s.createMu.Lock()
	defer s.createMu.Unlock()
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	dbs := *s.dbs.Load()
	if l := dbs[db]; l != nil {
		return l, nil
	}
	for other := range dbs {
		if strings.EqualFold(other, db) { // one directory on a case-insensitive file system
			return nil, Errorf(CodeInvalidArgument, "micro: store: database %q differs from %q only in case", db, other)
		}
	}
	l, err := s.openLog(db)
	if err != nil {
		return nil, err
	}
	next := maps.Clone(dbs)
	next[db] = l
	s.dbs.Store(&next)
	return l, nil
}

// syncLoop syncs the logs written since the last tick, under SyncInterval.
func (s *FileStore) syncLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.interval)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		for _, l := range *s.dbs.Load() {
			if err := l.syncDirty(); err != nil {
				s.opts.logger.Error("micro: store: sync failed; the store refuses writes until reopened", "database", l.db, "err", err)
			}
		}
	}
}

// storeLog is one database: its log file and the index of its live records.
type storeLog struct {
	fs   *FileStore
	db   string
	dir  string
	path string

	wmu    sync.Mutex // the commit lock: held to append, sync and swap files
	failed error      // a write or sync failed: refuse writes (guarded by wmu)
	wbuf   []byte     // batch buffer (guarded by wmu)

	mu     sync.RWMutex // guards the fields below; written only with wmu held too
	f      *os.File
	mapped []byte // read-only mapping of f, possibly past size; nil: pread
	noMap  bool   // mapping is off or failed
	size   int64  // end of the last committed record
	live   int64  // bytes of the records the index points at
	tables map[string]*storeTable
	expiry storeExpiryHeap
	closed bool

	qmu     sync.Mutex // guards queue and leading (group commit)
	queue   []*storeCommit
	leading bool

	compacting atomic.Bool
	dirty      atomic.Bool // written since the last sync (SyncInterval)
}

// storeTable is one table's index in a file store: the ordered chunks
// (without a hash table of their own, whose keys the garbage collector
// would scan) for walks, and a hash table of key hashes and record places,
// which holds no pointers, for reads of one key.
type storeTable struct {
	storeIndex[storeLoc]
	hash storeLocHash
}

// newStoreTable returns an empty table whose key hashes keep the bits of
// mask (0: all of them).
func newStoreTable(mask uint32) *storeTable {
	t := &storeTable{}
	t.plain = true
	t.hash.seed = maphash.MakeSeed()
	t.hash.mask = ^uint32(0)
	if mask != 0 {
		t.hash.mask = mask
	}
	return t
}

// ordered returns the ordered index, nil for a table that does not exist.
func (t *storeTable) ordered() *storeIndex[storeLoc] {
	if t == nil {
		return nil
	}
	return &t.storeIndex
}

func (t *storeTable) set(key string, loc storeLoc) (old storeLoc, had bool) {
	old, had = t.storeIndex.set(key, loc)
	h := t.hash.sum(key)
	if had {
		t.hash.replace(h, old.off, loc.off, loc.size)
	} else {
		t.hash.insert(h, loc.off, loc.size)
	}
	return old, had
}

func (t *storeTable) delete(key string) (old storeLoc, had bool) {
	old, had = t.storeIndex.delete(key)
	if had {
		t.hash.remove(t.hash.sum(key), old.off)
	}
	return old, had
}

// peek returns the place and size of the first record whose key hashes as
// key's does, without comparing keys (which would cost a cache miss) and
// without its expiry: the reader checks the key and the expiry in the
// record, and calls get if it is another's.
func (t *storeTable) peek(key string) (off int64, size uint32, ok bool) {
	return t.hash.peek(t.hash.sum(key))
}

// storeLocHash maps key hashes to record places: open addressing with
// linear probing, at most 3/4 full. Two keys may hash alike; a record's
// offset, unique in a log, tells their slots apart. A slot is 16 bytes (a
// 32-bit hash, the size and the offset; the expiry is in the record), so
// that the table of 100,000 keys, 4 MiB, stays in the cache more often
// than not: a read's first cache miss is here.
type storeLocHash struct {
	slots []storeLocSlot
	n     int
	seed  maphash.Seed
	mask  uint32 // of the hash's bits; tests make keys collide with a small one
}

type storeLocSlot struct {
	h    uint32 // 0: empty
	size uint32
	off  int64
}

func (t *storeLocHash) sum(key string) uint32 {
	return uint32(maphash.String(t.seed, key))&t.mask | 1
}

func (t *storeLocHash) peek(h uint32) (off int64, size uint32, ok bool) {
	if t.n == 0 {
		return 0, 0, false
	}
	mask := len(t.slots) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		switch t.slots[i].h {
		case 0:
			return 0, 0, false
		case h:
			return t.slots[i].off, t.slots[i].size, true
		}
	}
}

// at returns the slot of the record at off whose key hashes to h.
func (t *storeLocHash) at(h uint32, off int64) (int, bool) {
	if t.n == 0 {
		return 0, false
	}
	mask := len(t.slots) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.h == 0 {
			return 0, false
		}
		if s.h == h && s.off == off {
			return i, true
		}
	}
}

func (t *storeLocHash) insert(h uint32, off int64, size uint32) {
	if (t.n+1)*4 > len(t.slots)*3 {
		old := t.slots
		t.slots = make([]storeLocSlot, max(16, 2*len(old)))
		for _, s := range old {
			if s.h != 0 {
				t.put(s)
			}
		}
	}
	t.put(storeLocSlot{h: h, size: size, off: off})
	t.n++
}

func (t *storeLocHash) put(s storeLocSlot) {
	mask := len(t.slots) - 1
	i := int(s.h) & mask
	for t.slots[i].h != 0 {
		i = (i + 1) & mask
	}
	t.slots[i] = s
}

// replace moves the entry of the record at old to the record at off.
func (t *storeLocHash) replace(h uint32, old, off int64, size uint32) {
	if i, ok := t.at(h, old); ok {
		t.slots[i].off, t.slots[i].size = off, size
	}
}

// remove empties the slot of the record at off, shifting back the entries
// after it that probed past it.
func (t *storeLocHash) remove(h uint32, off int64) {
	i, ok := t.at(h, off)
	if !ok {
		return
	}
	mask := len(t.slots) - 1
	for j := (i + 1) & mask; t.slots[j].h != 0; j = (j + 1) & mask {
		home := int(t.slots[j].h) & mask
		if i <= j && (home <= i || home > j) || i > j && home <= i && home > j {
			t.slots[i] = t.slots[j]
			i = j
		}
	}
	t.slots[i] = storeLocSlot{}
	t.n--
}

// storeLoc is where a record lies in the log.
type storeLoc struct {
	off     int64
	size    uint32
	expires int64
}

func (c storeLoc) end() int64 { return c.off + int64(c.size) }

// storeCommit is one record on its way into the log.
type storeCommit struct {
	buf        []byte
	table, key string
	tomb       bool
	expires    int64
	off        int64
	err        error
	state      int           // 0 queued, 1 asked to lead, 2 done (guarded by qmu)
	wake       chan struct{} // group commit: told to lead or done
}

// openLog opens (creating) the database's directory and log and replays it.
func (s *FileStore) openLog(db string) (*storeLog, error) {
	dir := filepath.Join(s.dir, db)
	l := &storeLog{fs: s, db: db, dir: dir, path: filepath.Join(dir, storeLogName), tables: map[string]*storeTable{}}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("micro: store: %w", err)
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("micro: store: %w", err)
	}
	fail := func(err error) (*storeLog, error) {
		storeMunmap(l.mapped)
		f.Close()
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return fail(fmt.Errorf("micro: store: %w", err))
	}
	size := st.Size()
	if size < storeFileHeader { // new, or its creation was cut short
		head := make([]byte, size)
		if _, err := io.ReadFull(f, head); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
		if string(head) != string(storeMagic[:size]) {
			return fail(fmt.Errorf("micro: store: %s is not a store log", l.path))
		}
		if _, err := f.WriteAt(storeMagic[:], 0); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
		if err := storeDatasync(f); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
		if err := storeSyncDir(dir); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
		if size == 0 {
			storeSyncDir(s.dir)
		}
		size = storeFileHeader
	}
	l.f = f
	var data []byte
	if !s.opts.noMmap {
		l.mapped = storeMmap(f, storeMapSize(size))
	}
	l.noMap = l.mapped == nil
	if l.mapped != nil {
		data = l.mapped[:size]
	}
	if data == nil {
		data = make([]byte, size)
		if _, err := f.ReadAt(data, 0); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
	}
	if string(data[:storeFileHeader]) != string(storeMagic[:]) {
		return fail(fmt.Errorf("micro: store: %s is not a store log of this version", l.path))
	}
	end, skipped, err := l.replay(data)
	if err != nil {
		return fail(err)
	}
	if end < size { // a torn tail: cut it off
		if err := f.Truncate(end); err != nil {
			return fail(fmt.Errorf("micro: store: truncating the torn tail of %s: %w", l.path, err))
		}
		if err := storeDatasync(f); err != nil {
			return fail(fmt.Errorf("micro: store: %w", err))
		}
		s.recover(StoreRecovery{Database: db, Offset: end, Bytes: size - end, Torn: true}, l.path)
	}
	l.size = end
	if skipped {
		if err := l.compact(context.Background()); err != nil {
			return fail(err)
		}
	}
	return l, nil
}

func (s *FileStore) recover(r StoreRecovery, path string) {
	s.mu.Lock()
	s.recovered = append(s.recovered, r)
	s.mu.Unlock()
	what := "cut off a torn write at the end of the log"
	if !r.Torn {
		what = "dropped damaged records"
	}
	s.opts.logger.Warn("micro: store: "+what, "path", path, "offset", r.Offset, "bytes", r.Bytes)
}

// storeMapSize is how much of a log of size bytes to map: room to grow, so
// that the mapping is remade only when the log doubles.
func storeMapSize(size int64) int64 {
	m := int64(1 << 20)
	for m < 2*size {
		m *= 2
	}
	return m
}

// replay builds the index from the log and returns where its intact records
// end. A damaged record with intact records after it is an error, or with
// SkipCorrupt is skipped (skipped reports it, so the log is compacted).
func (l *storeLog) replay(data []byte) (end int64, skipped bool, err error) {
	now := l.fs.opts.now().UnixNano()
	off := storeFileHeader
	for off < len(data) {
		r, n, derr := storeDecode(data[off:])
		if derr == nil {
			l.apply(&r, int64(off), n, now)
			off += n
			continue
		}
		next := storeNextRecord(data, off+1)
		if next < 0 {
			return int64(off), skipped, nil // a torn tail
		}
		if !l.fs.opts.skipBad {
			return 0, false, &StoreCorruptError{Path: l.path, Offset: int64(off), Next: int64(next), Reason: derr.Error()}
		}
		l.fs.recover(StoreRecovery{Database: l.db, Offset: int64(off), Bytes: int64(next - off)}, l.path)
		skipped = true
		off = next
	}
	return int64(off), skipped, nil
}

// storeNextRecord returns the offset of the first intact record at or after
// from, or -1.
func storeNextRecord(data []byte, from int) int {
	for p := from; p+storeHeadLen < len(data); p++ {
		if _, _, err := storeDecode(data[p:]); err == nil {
			return p
		}
	}
	return -1
}

// apply records a decoded record at off in the index; the caller holds mu
// for writing (or owns l).
func (l *storeLog) apply(r *storeRaw, off int64, n int, now int64) {
	idx := l.tables[string(r.table)]
	if idx == nil {
		if r.tomb {
			return
		}
		idx = newStoreTable(l.fs.opts.hashMask)
		l.tables[string(r.table)] = idx
	}
	l.applyKey(idx, string(r.table), string(r.key), r.tomb, storeLoc{off: off, size: uint32(n), expires: r.expires}, now)
}

func (l *storeLog) applyKey(idx *storeTable, table, key string, tomb bool, loc storeLoc, now int64) {
	var old storeLoc
	var had bool
	if tomb || !storeLive(loc.expires, now) {
		old, had = idx.delete(key)
	} else {
		old, had = idx.set(key, loc)
		l.live += int64(loc.size)
		if loc.expires != 0 {
			l.expiry.add(storeNS{l.db, table}, key, loc.expires)
		}
	}
	if had {
		l.live -= int64(old.size)
		if old.expires != 0 {
			l.expiry.live--
		}
	}
}

// purge drops the records that have expired from the index; the caller
// holds mu for writing.
func (l *storeLog) purge(now int64) {
	l.expiry.purge(now, func(ns storeNS, key string, at int64) bool {
		idx := l.tables[ns.table]
		if idx == nil {
			return false
		}
		if v, ok := idx.get(key); ok && v.expires == at {
			idx.delete(key)
			l.live -= int64(v.size)
			return true
		}
		return false
	}, l.expiries)
}

// expiries yields every record with an expiry; the caller holds mu.
func (l *storeLog) expiries(yield func(ns storeNS, key string, at int64)) {
	for table, idx := range l.tables {
		idx.ascend("", func(k string, v storeLoc) bool {
			if v.expires != 0 {
				yield(storeNS{l.db, table}, k, v.expires)
			}
			return true
		})
	}
}

func (l *storeLog) has(table, key string) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	idx := l.tables[table]
	if idx == nil {
		return false
	}
	_, ok := idx.get(key)
	return ok
}

// storeReadBox holds what an exact read returns in one allocation: the
// slice, its one record, and a copy of the record's bytes (A, an array),
// which the value aliases.
type storeReadBox[A any] struct {
	out [1]*Record
	rec Record
	buf A
}

// storeReadAlloc returns the record and slice an exact read returns and a
// buffer of n bytes for the record's copy, in one allocation up to 4 KiB.
// The arrays fill the allocator's size classes (an object over 512 bytes
// that holds pointers carries an 8-byte header): a 1 KiB value's record
// (1,049 bytes) and its Record take 1,152 bytes, as its value alone would.
func storeReadAlloc(n int) (*Record, []*Record, []byte) {
	switch {
	case n <= 64:
		return storeReadNew(n, func(a *[64]byte) []byte { return a[:] })
	case n <= 128:
		return storeReadNew(n, func(a *[128]byte) []byte { return a[:] })
	case n <= 192:
		return storeReadNew(n, func(a *[192]byte) []byte { return a[:] })
	case n <= 256:
		return storeReadNew(n, func(a *[256]byte) []byte { return a[:] })
	case n <= 320:
		return storeReadNew(n, func(a *[320]byte) []byte { return a[:] })
	case n <= 448:
		return storeReadNew(n, func(a *[448]byte) []byte { return a[:] })
	case n <= 568:
		return storeReadNew(n, func(a *[568]byte) []byte { return a[:] })
	case n <= 696:
		return storeReadNew(n, func(a *[696]byte) []byte { return a[:] })
	case n <= 824:
		return storeReadNew(n, func(a *[824]byte) []byte { return a[:] })
	case n <= 952:
		return storeReadNew(n, func(a *[952]byte) []byte { return a[:] })
	case n <= 1080:
		return storeReadNew(n, func(a *[1080]byte) []byte { return a[:] })
	case n <= 1208:
		return storeReadNew(n, func(a *[1208]byte) []byte { return a[:] })
	case n <= 1464:
		return storeReadNew(n, func(a *[1464]byte) []byte { return a[:] })
	case n <= 1976:
		return storeReadNew(n, func(a *[1976]byte) []byte { return a[:] })
	case n <= 2616:
		return storeReadNew(n, func(a *[2616]byte) []byte { return a[:] })
	case n <= 3384:
		return storeReadNew(n, func(a *[3384]byte) []byte { return a[:] })
	case n <= 4024:
		return storeReadNew(n, func(a *[4024]byte) []byte { return a[:] })
	}
	box := new(storeReadBox[struct{}])
	box.out[0] = &box.rec
	return &box.rec, box.out[:], make([]byte, n)
}

func storeReadNew[A any](n int, bytes func(*A) []byte) (*Record, []*Record, []byte) {
	box := new(storeReadBox[A])
	box.out[0] = &box.rec
	return &box.rec, box.out[:], bytes(&box.buf)[:n:n]
}

// get reads one record. It looks the key up with peek, which does not
// compare keys; if the entry it finds proves to be another key's (the two
// hash alike), it looks again with the keys compared.
func (l *storeLog) get(table, key string) ([]*Record, error) {
	peeked := true
	for {
		l.mu.RLock()
		if l.closed {
			l.mu.RUnlock()
			return nil, ErrClosed
		}
		var loc storeLoc
		ok := false
		now := storeNowUnread // peek does not know the expiry: record checks it
		if idx := l.tables[table]; idx != nil {
			if peeked {
				loc.off, loc.size, ok = idx.peek(key)
			} else if loc, ok = idx.get(key); ok && loc.expires != 0 {
				now = l.fs.opts.now().UnixNano()
				ok = storeLive(loc.expires, now)
			}
		}
		if !ok {
			l.mu.RUnlock()
			return nil, storeNotFound(key)
		}
		// The record is copied out whole, and the copy is what is checked
		// and served: bytes that change in the file (or its mapping) after
		// the copy cannot reach the caller unverified. The value is served
		// from this copy, so a read allocates it once.
		rec, out, buf := storeReadAlloc(int(loc.size))
		if loc.end() <= int64(len(l.mapped)) {
			copy(buf, l.mapped[loc.off:loc.end()])
			l.mu.RUnlock()
		} else {
			f := l.f
			l.mu.RUnlock()
			if _, err := f.ReadAt(buf, loc.off); err != nil {
				if errors.Is(err, os.ErrClosed) {
					continue // a compaction swapped the file: look again
				}
				return nil, fmt.Errorf("micro: store: reading %s: %w", l.path, err)
			}
		}
		err := l.record(rec, buf, loc, table, key, now, nil, peeked)
		switch {
		case err == errStoreOther:
			peeked = false
			continue
		case err == errStoreExpired:
			return nil, storeNotFound(key)
		case err != nil:
			return nil, err
		}
		return out, nil
	}
}

// storeNowUnread is the now given to record by a reader that has not read
// the clock, nor checked the record's expiry.
const storeNowUnread int64 = math.MinInt64

// storeArena hands out copies of small values from shared blocks, so that
// a read of many records allocates a few blocks rather than a slice each.
// Each copy is capped at its length: appending to one never writes into
// another. Keeping one value keeps its block (32 KiB at most) alive.
type storeArena struct{ buf []byte }

func (a *storeArena) copy(v []byte) []byte {
	switch {
	case len(v) == 0:
		return nil
	case len(v) > 4096:
		v = append([]byte(nil), v...)
		return v[:len(v):len(v)]
	}
	if cap(a.buf)-len(a.buf) < len(v) {
		a.buf = make([]byte, 0, 32<<10)
	}
	n := len(a.buf)
	a.buf = append(a.buf, v...)
	return a.buf[n:len(a.buf):len(a.buf)]
}

// storeRecords hands out Records from shared blocks, and at the end the
// slice of them in the order handed out.
type storeRecords struct {
	blocks [][]Record
	n      int
}

func (b *storeRecords) next() *Record {
	if len(b.blocks) == 0 || len(b.blocks[len(b.blocks)-1]) == storeRecordBlock {
		b.blocks = append(b.blocks, make([]Record, 0, storeRecordBlock))
	}
	last := &b.blocks[len(b.blocks)-1]
	*last = (*last)[:len(*last)+1]
	b.n++
	return &(*last)[len(*last)-1]
}

// all returns the records handed out, in order, in a slice of its own size.
func (b *storeRecords) all() []*Record {
	out := make([]*Record, 0, b.n)
	for _, block := range b.blocks {
		for i := range block {
			out = append(out, &block[i])
		}
	}
	return out
}

// storeRecordBlock is how many Records share an allocation in a range read.
const storeRecordBlock = 64

// scan reads the records q selects: those in the mapping are decoded under
// the index's read lock as they are found, the rest (past the mapping, or
// all without one) are read with pread after it is released. Records and
// small values are carved from shared blocks, to spare the garbage
// collector a thousand small objects.
func (l *storeLog) scan(q *storeQuery, now int64) ([]*Record, error) {
	type hit struct {
		key string
		loc storeLoc
		rec *Record
	}
	for {
		l.mu.RLock()
		if l.closed {
			l.mu.RUnlock()
			return nil, ErrClosed
		}
		var hits []hit
		var arena storeArena
		var alloc storeRecords
		var err error
		mapped := l.mapped
		storeScan(l.tables[q.table].ordered(), q, func(v storeLoc) bool { return storeLive(v.expires, now) }, func(k string, v storeLoc) {
			if err != nil {
				return
			}
			r := alloc.next()
			if v.end() <= int64(len(mapped)) {
				// Copied whole into the arena and checked there, as in get:
				// the value served is the copy checked, and aliases it.
				err = l.record(r, arena.copy(mapped[v.off:v.end()]), v, q.table, k, now, nil, false)
				return
			}
			hits = append(hits, hit{k, v, r})
		})
		f := l.f
		l.mu.RUnlock()
		if err != nil {
			return nil, err
		}
		retry := false
		var buf []byte
		for _, h := range hits {
			buf = slices.Grow(buf[:0], int(h.loc.size))[:h.loc.size]
			if _, err := f.ReadAt(buf, h.loc.off); err != nil {
				if errors.Is(err, os.ErrClosed) {
					retry = true
					break
				}
				return nil, fmt.Errorf("micro: store: reading %s: %w", l.path, err)
			}
			if err := l.record(h.rec, buf, h.loc, q.table, h.key, now, &arena, false); err != nil {
				return nil, err
			}
		}
		if !retry {
			return alloc.all(), nil
		}
	}
}

// record decodes into r the record the index placed at loc, checking that
// it is intact and is the one asked for. b is a private copy of the record
// (never the mapping itself, whose bytes another writer of the file could
// change between the check and the copy). With an arena the value is
// copied into it and b may be reused; without one r.Value aliases b, which
// then belongs to r. now matters only for a record with an expiry; if it
// is storeNowUnread, record reads the clock for one and returns
// errStoreExpired if it has expired. If the index entry was found by
// peek, an intact record of another key is errStoreOther.
func (l *storeLog) record(r *Record, b []byte, loc storeLoc, table, key string, now int64, arena *storeArena, peeked bool) error {
	raw, n, err := storeDecodeRecord(b, false)
	if err == nil && (n != len(b) || raw.tomb || string(raw.table) != table || string(raw.key) != key) {
		if peeked && n == len(b) && !raw.tomb && string(raw.table) == table {
			return errStoreOther // another key that hashes alike
		}
		err = errors.New("the record there is another one")
	}
	if err != nil {
		return &StoreCorruptError{Path: l.path, Offset: loc.off, Next: -1, Reason: err.Error()}
	}
	if raw.expires != 0 && now == storeNowUnread {
		if now = l.fs.opts.now().UnixNano(); !storeLive(raw.expires, now) {
			return errStoreExpired
		}
	}
	r.Key = key
	switch {
	case arena != nil:
		r.Value = arena.copy(raw.value)
	case len(raw.value) > 0:
		r.Value = raw.value[:len(raw.value):len(raw.value)]
	default:
		r.Value = nil
	}
	r.Expiry = storeRemaining(raw.expires, now)
	if raw.nmeta > 0 {
		r.Metadata = raw.metadata()
	}
	return nil
}

// commit appends c to the log under the sync policy and applies it to the
// index.
func (l *storeLog) commit(c *storeCommit) error {
	switch l.fs.opts.sync {
	case storeSyncEveryWrite, storeSyncInterval:
		l.wmu.Lock()
		l.write([]*storeCommit{c}, l.fs.opts.sync == storeSyncEveryWrite)
		l.wmu.Unlock()
		if c.err == nil && l.fs.opts.sync == storeSyncInterval {
			l.dirty.Store(true)
		}
		l.maybeCompact()
		return c.err
	}
	// Group commit: join the queue; the first in line leads, and the rest
	// wait to be done or to be asked to lead the next batch.
	c.wake = make(chan struct{}, 1)
	l.qmu.Lock()
	l.queue = append(l.queue, c)
	if l.leading {
		l.qmu.Unlock()
		<-c.wake
		l.qmu.Lock()
		state := c.state
		l.qmu.Unlock()
		if state == 2 {
			return c.err
		}
		l.qmu.Lock()
	}
	l.leading = true
	batch := l.queue
	l.queue = nil
	l.qmu.Unlock()

	l.wmu.Lock()
	l.write(batch, true)
	l.wmu.Unlock()

	l.qmu.Lock()
	for _, b := range batch {
		if b != c {
			b.state = 2
			b.wake <- struct{}{}
		}
	}
	if len(l.queue) > 0 { // hand the lead to the first of the next batch
		next := l.queue[0]
		next.state = 1
		next.wake <- struct{}{}
	} else {
		l.leading = false
	}
	l.qmu.Unlock()
	l.maybeCompact()
	return c.err
}

// write appends a batch, syncs it if asked, and applies it to the index;
// each commit's err says how it went. The caller holds wmu.
func (l *storeLog) write(batch []*storeCommit, sync bool) {
	fail := func(err error) {
		for _, c := range batch {
			c.err = err
		}
	}
	l.mu.RLock()
	closed, f, off := l.closed, l.f, l.size
	l.mu.RUnlock()
	switch {
	case closed:
		fail(ErrClosed)
		return
	case l.failed != nil:
		fail(l.failed)
		return
	}
	buf := batch[0].buf
	if len(batch) > 1 {
		buf = l.wbuf[:0]
		for _, c := range batch {
			c.off = off + int64(len(buf))
			buf = append(buf, c.buf...)
		}
		l.wbuf = buf
		if cap(l.wbuf) > 4<<20 {
			l.wbuf = nil // do not keep a huge batch's buffer
		}
	} else {
		batch[0].off = off
	}
	_, err := f.WriteAt(buf, off)
	if err != nil {
		// Take back what part of the batch reached the file, so the next
		// write does not follow garbage.
		if terr := f.Truncate(off); terr != nil {
			l.failed = fmt.Errorf("micro: store: %s: a write failed and could not be undone (%v); reopen the store: %w", l.path, terr, err)
		}
		fail(fmt.Errorf("micro: store: writing %s: %w", l.path, err))
		return
	}
	if sync {
		if err := storeDatasync(f); err != nil {
			// After a failed fsync the kernel may have dropped the dirty
			// pages: what is on disk is unknown until the log is replayed.
			l.failed = fmt.Errorf("micro: store: %s: fsync failed; reopen the store: %w", l.path, err)
			fail(l.failed)
			return
		}
	}
	now := l.fs.opts.now().UnixNano()
	l.mu.Lock()
	l.size = off + int64(len(buf))
	for _, c := range batch {
		idx := l.tables[c.table]
		if idx == nil {
			idx = newStoreTable(l.fs.opts.hashMask)
			l.tables[c.table] = idx
		}
		l.applyKey(idx, c.table, c.key, c.tomb, storeLoc{off: c.off, size: uint32(len(c.buf)), expires: c.expires}, now)
	}
	l.purge(now)
	if l.size > int64(len(l.mapped)) && !l.noMap {
		storeMunmap(l.mapped)
		l.mapped = storeMmap(f, storeMapSize(l.size))
		l.noMap = l.mapped == nil // pread from now on
	}
	l.mu.Unlock()
}

// maybeCompact starts a background compaction if the log is mostly
// garbage.
func (l *storeLog) maybeCompact() {
	at := l.fs.opts.compactAt
	if at < 0 || l.compacting.Load() {
		return
	}
	l.mu.RLock()
	garbage := l.size - storeFileHeader - l.live
	live := l.live
	l.mu.RUnlock()
	if garbage < at || garbage <= live {
		return
	}
	s := l.fs
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := l.compact(context.Background()); err != nil && !errors.Is(err, ErrClosed) {
			s.opts.logger.Error("micro: store: compaction failed; the log is unchanged", "path", l.path, "err", err)
		}
	}()
}

// compact rewrites the log with only its live records. It copies a
// snapshot of the index without holding a lock, then, holding the commit
// lock, appends what was written meanwhile, syncs, renames the new file over
// the log, syncs the directory and swaps the index.
func (l *storeLog) compact(ctx context.Context) error {
	if !l.compacting.CompareAndSwap(false, true) {
		return nil // one is running
	}
	defer l.compacting.Store(false)

	type item struct {
		table, key string
		loc        storeLoc
	}
	l.mu.RLock()
	if l.closed {
		l.mu.RUnlock()
		return ErrClosed
	}
	snapEnd, old := l.size, l.f
	var items []item
	for _, table := range slices.Sorted(maps.Keys(l.tables)) {
		l.tables[table].ascend("", func(k string, v storeLoc) bool {
			items = append(items, item{table, k, v})
			return true
		})
	}
	l.mu.RUnlock()

	tmp := l.path + ".compact"
	nf, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("micro: store: compacting: %w", err)
	}
	swapped := false
	defer func() {
		if !swapped {
			nf.Close()
			os.Remove(tmp)
		}
	}()
	w := bufio.NewWriterSize(nf, 1<<20)
	w.Write(storeMagic[:])
	off := int64(storeFileHeader)
	tables := map[string]*storeTable{}
	var live int64
	var expiry storeExpiryHeap
	now := l.fs.opts.now().UnixNano()
	var buf []byte
	for i, it := range items {
		if i%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		if !storeLive(it.loc.expires, now) {
			continue
		}
		buf = slices.Grow(buf[:0], int(it.loc.size))[:it.loc.size]
		if _, err := old.ReadAt(buf, it.loc.off); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return ErrClosed
			}
			return fmt.Errorf("micro: store: compacting: %w", err)
		}
		if err := l.record(new(Record), buf, it.loc, it.table, it.key, now, nil, false); err != nil {
			return err // never copy a damaged record
		}
		if _, err := w.Write(buf); err != nil {
			return fmt.Errorf("micro: store: compacting: %w", err)
		}
		idx := tables[it.table]
		if idx == nil {
			idx = newStoreTable(l.fs.opts.hashMask)
			tables[it.table] = idx
		}
		loc := storeLoc{off: off, size: it.loc.size, expires: it.loc.expires}
		idx.set(it.key, loc)
		if loc.expires != 0 {
			expiry.items = append(expiry.items, storeExpiry{storeNS{l.db, it.table}, it.key, loc.expires})
			expiry.live++
		}
		off += int64(it.loc.size)
		live += int64(it.loc.size)
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("micro: store: compacting: %w", err)
	}
	if err := storeDatasync(nf); err != nil {
		return fmt.Errorf("micro: store: compacting: %w", err)
	}

	// Writers wait from here: copy what they wrote meanwhile, then swap.
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.mu.RLock()
	closed, end := l.closed, l.size
	l.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	if l.failed != nil {
		return l.failed
	}
	tail := make([]byte, end-snapEnd)
	if _, err := old.ReadAt(tail, snapEnd); err != nil {
		return fmt.Errorf("micro: store: compacting: %w", err)
	}
	if len(tail) > 0 {
		if _, err := nf.WriteAt(tail, off); err != nil {
			return fmt.Errorf("micro: store: compacting: %w", err)
		}
		if err := storeDatasync(nf); err != nil {
			return fmt.Errorf("micro: store: compacting: %w", err)
		}
	}
	if err := os.Rename(tmp, l.path); err != nil {
		return fmt.Errorf("micro: store: compacting: %w", err)
	}
	swapped = true
	if err := storeSyncDir(l.dir); err != nil {
		l.fs.opts.logger.Warn("micro: store: syncing the directory after a compaction", "dir", l.dir, "err", err)
	}
	var mapped []byte
	newEnd := off + int64(len(tail))
	if !l.fs.opts.noMmap {
		mapped = storeMmap(nf, storeMapSize(newEnd))
	}
	noMap := mapped == nil

	l.mu.Lock()
	l.tables, l.live, l.expiry = tables, live, expiry
	heap.Init(&l.expiry)
	for p := 0; p < len(tail); { // replay the tail onto the new index
		r, n, err := storeDecode(tail[p:])
		if err != nil { // cannot be: these records were written and read back
			l.fs.opts.logger.Error("micro: store: damaged record in a compaction's tail", "path", l.path, "err", err)
			break
		}
		l.apply(&r, off+int64(p), n, now)
		p += n
	}
	oldMapped := l.mapped
	l.f, l.mapped, l.noMap, l.size = nf, mapped, noMap, newEnd
	l.mu.Unlock()
	storeMunmap(oldMapped) // no reader holds it: they read under mu
	old.Close()            // a reader using pread on it retries
	return nil
}

// syncDirty syncs the log if it was written since the last sync.
func (l *storeLog) syncDirty() error {
	if !l.dirty.Swap(false) {
		return nil
	}
	l.mu.RLock()
	f, closed := l.f, l.closed
	l.mu.RUnlock()
	if closed {
		return nil
	}
	err := f.Sync()
	if err == nil || errors.Is(err, os.ErrClosed) {
		return nil // or a compaction, which syncs, swapped the file
	}
	l.wmu.Lock()
	l.failed = fmt.Errorf("micro: store: %s: fsync failed; reopen the store: %w", l.path, err)
	l.wmu.Unlock()
	return err
}

// close syncs (if writes are pending) and closes the log.
func (l *storeLog) close() error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	var err error
	if l.dirty.Swap(false) && l.failed == nil {
		err = storeDatasync(l.f)
	}
	storeMunmap(l.mapped)
	l.mapped = nil
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	l.tables = nil
	return err
}

// storeAppendRecord appends one record to dst: a 4-byte length of the body,
// a CRC-32C (Castagnoli) of the length and the body, then the body: flags,
// the expiry (unix nanoseconds, 0 never), the table, the key, the metadata
// (a count, then keys and values in key order), each with a uvarint length,
// and the value, which runs to the end. All integers are little-endian.
func storeAppendRecord(dst []byte, flags byte, expires int64, table, key string, meta map[string]string, value []byte) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0, 0, 0, 0, 0, flags)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(expires))
	dst = binary.AppendUvarint(dst, uint64(len(table)))
	dst = append(dst, table...)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	dst = append(dst, key...)
	dst = binary.AppendUvarint(dst, uint64(len(meta)))
	for _, k := range slices.Sorted(maps.Keys(meta)) {
		dst = binary.AppendUvarint(dst, uint64(len(k)))
		dst = append(dst, k...)
		dst = binary.AppendUvarint(dst, uint64(len(meta[k])))
		dst = append(dst, meta[k]...)
	}
	dst = append(dst, value...)
	rec := dst[start:]
	binary.LittleEndian.PutUint32(rec, uint32(len(rec)-storeHeadLen))
	crc := crc32.Update(crc32.Checksum(rec[:4], storeCRC), storeCRC, rec[storeHeadLen:])
	binary.LittleEndian.PutUint32(rec[4:], crc)
	return dst
}

// storeRaw is a decoded record; its slices alias the bytes decoded.
type storeRaw struct {
	tomb       bool
	expires    int64
	table, key []byte
	nmeta      int
	meta       []byte // the metadata's pairs, encoded
	value      []byte
}

// metadata decodes the metadata, which storeDecode checked.
func (r *storeRaw) metadata() map[string]string {
	m := make(map[string]string, r.nmeta)
	b := r.meta
	for range r.nmeta {
		var k, v []byte
		k, b, _ = storeField(b)
		v, b, _ = storeField(b)
		m[string(k)] = string(v)
	}
	return m
}

var (
	errStoreShort   = errors.New("the record runs past the end of the log")
	errStoreCRC     = errors.New("checksum mismatch")
	errStoreShape   = errors.New("malformed record")
	errStoreOther   = errors.New("the record is another key's")
	errStoreExpired = errors.New("the record has expired")
)

// storeDecode decodes the record at the start of b and returns it and its
// size. It checks the length, the layout, that the text is UTF-8, and the
// checksum; it never panics on any input.
func storeDecode(b []byte) (r storeRaw, n int, err error) { return storeDecodeRecord(b, true) }

// storeDecodeRecord is storeDecode; without strict it skips the UTF-8
// checks, for reads that compare the key and table with those asked for.
func storeDecodeRecord(b []byte, strict bool) (r storeRaw, n int, err error) {
	if len(b) < storeHeadLen {
		return r, 0, errStoreShort
	}
	size := binary.LittleEndian.Uint32(b)
	if size < 1+8+3 || size > storeMaxRecord-storeHeadLen {
		return r, 0, errStoreShape
	}
	if uint64(len(b)-storeHeadLen) < uint64(size) {
		return r, 0, errStoreShort
	}
	n = storeHeadLen + int(size)
	body := b[storeHeadLen:n]
	flags := body[0]
	if flags&^storeFlagTombstone != 0 {
		return r, 0, errStoreShape
	}
	r.tomb = flags&storeFlagTombstone != 0
	r.expires = int64(binary.LittleEndian.Uint64(body[1:9]))
	rest := body[9:]
	var ok bool
	if r.table, rest, ok = storeField(rest); !ok || len(r.table) > storeMaxTable ||
		strict && (!utf8.Valid(r.table) || bytes.IndexByte(r.table, 0) >= 0) {
		return r, 0, errStoreShape
	}
	if r.key, rest, ok = storeField(rest); !ok || len(r.key) == 0 || len(r.key) > storeMaxKey || strict && !utf8.Valid(r.key) {
		return r, 0, errStoreShape
	}
	nmeta, k := binary.Uvarint(rest)
	if k <= 0 || nmeta > uint64(len(rest)) {
		return r, 0, errStoreShape
	}
	rest = rest[k:]
	meta := rest
	for range 2 * nmeta { // keys and values
		var f []byte
		if f, rest, ok = storeField(rest); !ok || strict && !utf8.Valid(f) {
			return r, 0, errStoreShape
		}
	}
	r.nmeta = int(nmeta)
	r.meta = meta[:len(meta)-len(rest)]
	r.value = rest
	if r.tomb && (len(r.value) > 0 || r.nmeta > 0 || r.expires != 0) {
		return r, 0, errStoreShape
	}
	crc := crc32.Update(crc32.Checksum(b[:4], storeCRC), storeCRC, body)
	if crc != binary.LittleEndian.Uint32(b[4:]) {
		return r, 0, errStoreCRC
	}
	return r, n, nil
}

// storeField splits a uvarint-length-prefixed field off b.
func storeField(b []byte) (field, rest []byte, ok bool) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return nil, b, false
	}
	return b[k : k+int(n)], b[k+int(n):], true
}

// ReadMany reads the records with the keys, all from one database and
// table: a slice as long as keys, with keys[i]'s record at i, or nil where
// there is none (see [ReadMany]). It is one Read a key, faster: it takes the
// keys 64 at a time, looks each of them up before it fetches any record,
// so that their cache misses overlap rather than follow one another, and
// copies the chunk's records up to 4 KiB into one allocation (keeping one
// of those values keeps the chunk's, at most 256 KiB). Only ReadFrom
// applies; ReadPrefix, ReadSuffix, ReadLimit and ReadOffset are refused.
func (s *FileStore) ReadMany(ctx context.Context, keys []string, opts ...ReadOption) ([]*Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q, err := storeManyQuery(keys, opts)
	if err != nil {
		return nil, err
	}
	l, err := s.log(q.db, false)
	switch {
	case err != nil:
		return nil, err
	case l == nil:
		return make([]*Record, len(keys)), nil
	}
	return l.getMany(ctx, q.table, keys)
}

const (
	// storeManyChunk is how many keys getMany looks up under one hold of
	// the read lock, so that a long batch does not hold writers off for
	// long.
	storeManyChunk = 64
	// storeManyShared is the largest record whose copy shares one
	// allocation with the rest of its chunk's: keeping one value of a
	// batch keeps at most 64 × 4 KiB of it.
	storeManyShared = 4096
)

// getMany reads the records of keys (see ReadMany). For each chunk of keys
// it looks every key up, then copies every record, then checks the copies
// outside the lock: the lookups' cache misses overlap one another, as do
// the copies'. A chunk's records up to storeManyShared share one block and
// one array of Records; a larger one gets its own. A record past the
// mapping, or another key's that hashes alike, is read again with get.
func (l *storeLog) getMany(ctx context.Context, table string, keys []string) ([]*Record, error) {
	out := make([]*Record, len(keys))
	var again []int
	for from := 0; from == 0 || from < len(keys); from += storeManyChunk {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		chunk := keys[from:min(from+storeManyChunk, len(keys))]
		var locs [storeManyChunk]storeLoc // size 0: nothing to check
		var copies [storeManyChunk][]byte
		l.mu.RLock()
		if l.closed {
			l.mu.RUnlock()
			return nil, ErrClosed
		}
		idx := l.tables[table]
		small := 0 // bytes of the records up to storeManyShared
		for i, key := range chunk {
			if idx == nil {
				break
			}
			off, size, ok := idx.peek(key)
			switch {
			case !ok:
			case off+int64(size) > int64(len(l.mapped)):
				again = append(again, from+i)
			default:
				locs[i] = storeLoc{off: off, size: size}
				if size <= storeManyShared {
					small += int(size)
				}
			}
		}
		block := make([]byte, small)
		for i, loc := range locs[:len(chunk)] {
			switch b := l.mapped[loc.off:loc.end()]; {
			case loc.size == 0:
			case loc.size <= storeManyShared:
				n := copy(block, b)
				copies[i], block = block[:n:n], block[n:]
			default:
				copies[i] = append([]byte(nil), b...)
			}
		}
		l.mu.RUnlock()
		var recs []Record // the small records'
		for i, loc := range locs[:len(chunk)] {
			if loc.size == 0 {
				continue
			}
			var r *Record
			if loc.size > storeManyShared {
				r = new(Record)
			} else {
				if recs == nil {
					recs = make([]Record, len(chunk))
				}
				r = &recs[i]
			}
			switch err := l.record(r, copies[i], loc, table, chunk[i], storeNowUnread, nil, true); err {
			case nil:
				out[from+i] = r
			case errStoreOther:
				again = append(again, from+i)
			case errStoreExpired:
			default:
				return nil, err
			}
		}
	}
	for _, i := range again {
		r, err := l.get(table, keys[i])
		switch {
		case err == nil:
			out[i] = r[0]
		case !errors.Is(err, ErrNotFound):
			return nil, err
		}
	}
	return out, nil
}
