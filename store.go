package micro

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Store keeps records by key in databases and tables: a [MemoryStore] inside
// one process, a [FileStore] on disk that survives a crash, or a
// [RemoteStore] that calls a store another node serves with
// [RegisterStore].
//
// Keys are ordered byte-wise. Read and List select by exact key, prefix or
// suffix, then skip Offset and return at most Limit of what matched, in key
// order. A record whose expiry has passed is gone for every method.
//
// Implementations must be safe for concurrent use by any number of
// goroutines. Records passed to Write and returned by Read are copied: the
// caller keeps ownership of what it passed and owns what it got. A method
// called with a context that has ended returns its error and does nothing;
// a write under way when the context ends still completes.
type Store interface {
	// Read returns the record with the key, or an error wrapping
	// ErrNotFound. With ReadPrefix or ReadSuffix, it returns the records
	// whose keys start or end with key (both: start and end), possibly
	// none, and no error.
	Read(ctx context.Context, key string, opts ...ReadOption) ([]*Record, error)
	// Write creates or replaces the record with r.Key. When it returns nil
	// the record is stored as durably as the store promises.
	Write(ctx context.Context, r *Record, opts ...WriteOption) error
	// Delete removes the record with the key; deleting a key that does not
	// exist is not an error.
	Delete(ctx context.Context, key string, opts ...DeleteOption) error
	// List returns the keys that match the options, in key order.
	List(ctx context.Context, opts ...ListOption) ([]string, error)
	// Close releases the store; every method returns ErrClosed after it.
	// It is idempotent.
	Close() error
}

// StoreManyReader is a [Store] that reads many keys in one call, as
// [FileStore], [MemoryStore] and [RemoteStore] do; [ReadMany] uses it.
type StoreManyReader interface {
	// ReadMany returns a slice as long as keys, holding keys[i]'s record
	// at i, or nil where there is none. Only ReadFrom applies.
	ReadMany(ctx context.Context, keys []string, opts ...ReadOption) ([]*Record, error)
}

// ReadMany reads the records with the keys from s, all from one database
// and table: a slice as long as keys, holding keys[i]'s record at i, or nil
// where there is none (a missing key is not an error). It is one call to
// s's ReadMany where s is a [StoreManyReader], and one Read a key
// otherwise. A [FileStore] overlaps the lookups' cache misses and shares
// the copies' allocations; a [RemoteStore] makes one round trip. Only
// ReadFrom applies; ReadPrefix, ReadSuffix, ReadLimit and ReadOffset are
// refused, as is an empty or oversized key.
func ReadMany(ctx context.Context, s Store, keys []string, opts ...ReadOption) ([]*Record, error) {
	if m, ok := s.(StoreManyReader); ok {
		return m.ReadMany(ctx, keys, opts...)
	}
	if _, err := storeManyQuery(keys, opts); err != nil {
		return nil, err
	}
	return storeReadEach(ctx, s, keys, opts)
}

// storeReadEach reads keys one Read at a time, as ReadMany returns them.
func storeReadEach(ctx context.Context, s Store, keys []string, opts []ReadOption) ([]*Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	out := make([]*Record, len(keys))
	for i, k := range keys {
		recs, err := s.Read(ctx, k, opts...)
		switch {
		case err == nil && len(recs) > 0:
			out[i] = recs[0]
		case err != nil && !errors.Is(err, ErrNotFound):
			return nil, err
		}
	}
	return out, nil
}

// Record is one stored value.
type Record struct {
	// Key identifies the record in its table: 1 to 65535 bytes of UTF-8
	// (text, as a proto3 string must be, so that it crosses any wire).
	Key string `json:"key"`
	// Value is the stored bytes.
	Value []byte `json:"value,omitempty"`
	// Metadata is stored and returned with the value, UTF-8 text. It is string to
	// string (as go-micro's first stores were, and as node metadata is here)
	// so that it crosses the wire and the disk unchanged; a map[string]any
	// would turn an int into a float64 on its way through JSON.
	Metadata map[string]string `json:"metadata,omitempty"`
	// Expiry is the time to live. On Write, a positive Expiry makes the
	// record expire that long after the write (WriteTTL and WriteExpiry
	// take precedence); zero means never. On Read, it is the time the
	// record has left, or zero if it never expires. A duration rather than
	// a time, as in go-micro, so that it means the same on both sides of a
	// wire whatever their clocks say.
	Expiry time.Duration `json:"expiry,omitempty"`
}

// The limits every store enforces, so that a record written to one store can
// be written to any other.
const (
	storeMaxKey   = 1<<16 - 1 // bytes in a key
	storeMaxTable = 255       // bytes in a database or table name

	// StoreDefaultDatabase and StoreDefaultTable name the namespace used
	// when an option leaves the database or table empty.
	StoreDefaultDatabase = "micro"
	StoreDefaultTable    = "micro"
)

// ReadOption configures one [Store.Read].
type ReadOption interface{ applyRead(*storeQuery) }

// WriteOption configures one [Store.Write].
type WriteOption interface{ applyWrite(*storeWriteOptions) }

// DeleteOption configures one [Store.Delete].
type DeleteOption interface{ applyDelete(*storeQuery) }

// ListOption configures one [Store.List].
type ListOption interface{ applyList(*storeQuery) }

// StoreOption configures a [MemoryStore] or a [FileStore] when it is made.
// Options that mean nothing to a store (a sync policy to a memory store) are
// ignored by it.
type StoreOption interface{ applyStore(*storeOptions) }

// ReadPrefix makes Read return every record whose key starts with the key
// given. The ordered index finds them without scanning other keys.
func ReadPrefix() ReadOption {
	return storeOption{query: func(q *storeQuery) { q.isPrefix = true }}
}

// ReadSuffix makes Read return every record whose key ends with the key
// given. A suffix cannot use the ordered index: without ReadPrefix it scans
// every key of the table.
func ReadSuffix() ReadOption {
	return storeOption{query: func(q *storeQuery) { q.isSuffix = true }}
}

// ReadLimit returns at most n records (default 0: all).
func ReadLimit(n int) ReadOption {
	return storeOption{query: func(q *storeQuery) { q.limit = max(n, 0) }}
}

// ReadOffset skips the first n matching records (default 0).
func ReadOffset(n int) ReadOption {
	return storeOption{query: func(q *storeQuery) { q.offset = max(n, 0) }}
}

// ReadFrom reads from a database and table (empty: [StoreDefaultDatabase]
// and [StoreDefaultTable]).
func ReadFrom(database, table string) ReadOption {
	return storeOption{query: func(q *storeQuery) { q.db, q.table = database, table }}
}

// WriteTTL makes the record expire d after the write. It overrides
// Record.Expiry; d <= 0 writes a record that has already expired.
func WriteTTL(d time.Duration) WriteOption {
	return storeOption{write: func(o *storeWriteOptions) { o.mode, o.ttl = storeExpireTTL, d }}
}

// WriteExpiry makes the record expire at t. It overrides Record.Expiry and
// WriteTTL; a zero t means never.
func WriteExpiry(t time.Time) WriteOption {
	return storeOption{write: func(o *storeWriteOptions) {
		o.mode, o.at = storeExpireAt, t
		if t.IsZero() {
			o.mode = storeExpireNever
		}
	}}
}

// WriteTo writes into a database and table (empty: the defaults).
func WriteTo(database, table string) WriteOption {
	return storeOption{write: func(o *storeWriteOptions) { o.db, o.table = database, table }}
}

// DeleteFrom deletes from a database and table (empty: the defaults).
func DeleteFrom(database, table string) DeleteOption {
	return storeOption{query: func(q *storeQuery) { q.db, q.table = database, table }}
}

// ListPrefix lists the keys that start with p.
func ListPrefix(p string) ListOption {
	return storeOption{query: func(q *storeQuery) { q.prefix = p }}
}

// ListSuffix lists the keys that end with s. Like [ReadSuffix], it scans
// every key the prefix (if any) selects.
func ListSuffix(s string) ListOption {
	return storeOption{query: func(q *storeQuery) { q.suffix = s }}
}

// ListLimit returns at most n keys (default 0: all).
func ListLimit(n int) ListOption {
	return storeOption{query: func(q *storeQuery) { q.limit = max(n, 0) }}
}

// ListOffset skips the first n matching keys (default 0).
func ListOffset(n int) ListOption {
	return storeOption{query: func(q *storeQuery) { q.offset = max(n, 0) }}
}

// ListFrom lists a database and table (empty: the defaults).
func ListFrom(database, table string) ListOption {
	return storeOption{query: func(q *storeQuery) { q.db, q.table = database, table }}
}

// storeOption is every store option type; each func set says what it
// configures.
type storeOption struct {
	query func(*storeQuery)
	write func(*storeWriteOptions)
	store func(*storeOptions)
}

func (o storeOption) applyRead(q *storeQuery) {
	if o.query != nil {
		o.query(q)
	}
}

func (o storeOption) applyDelete(q *storeQuery) {
	if o.query != nil {
		o.query(q)
	}
}

func (o storeOption) applyList(q *storeQuery) {
	if o.query != nil {
		o.query(q)
	}
}

func (o storeOption) applyWrite(w *storeWriteOptions) {
	if o.write != nil {
		o.write(w)
	}
}

func (o storeOption) applyStore(s *storeOptions) {
	if o.store != nil {
		o.store(s)
	}
}

// storeOptions are the options of a MemoryStore or FileStore.
type storeOptions struct {
	sync      storeSyncPolicy
	interval  time.Duration
	compactAt int64 // garbage bytes that start a compaction; < 0: never
	skipBad   bool
	logger    *slog.Logger
	now       func() time.Time
	noMmap    bool   // read with pread only (tests)
	hashMask  uint32 // keeps these bits of a key's hash; 0: all (tests make keys collide)
}

type storeSyncPolicy int

const (
	storeSyncEveryWrite storeSyncPolicy = iota
	storeSyncGroup
	storeSyncInterval
)

func storeNewOptions(opts []StoreOption) storeOptions {
	o := storeOptions{logger: rpcDiscard, now: time.Now, compactAt: 4 << 20}
	for _, opt := range opts {
		opt.applyStore(&o)
	}
	if o.logger == nil {
		o.logger = rpcDiscard
	}
	return o
}

// StoreLogger sets the logger a store reports recovery and failed background
// work to (default: discard).
func StoreLogger(l *slog.Logger) StoreOption {
	return storeOption{store: func(o *storeOptions) { o.logger = l }}
}

// storeClock sets a store's clock (tests).
func storeClock(now func() time.Time) StoreOption {
	return storeOption{store: func(o *storeOptions) { o.now = now }}
}

// storeQuery is what a Read, List or Delete selects.
type storeQuery struct {
	db, table          string
	isPrefix, isSuffix bool // Read: the key is a prefix, a suffix
	prefix, suffix     string
	limit, offset      int
}

// storeReadQuery turns Read's key and options into a checked query; exact
// reports whether it reads one key.
func storeReadQuery(key string, opts []ReadOption) (q storeQuery, exact bool, err error) {
	if len(opts) > 0 { // options get a pointer, which escapes: only then
		p := new(storeQuery)
		for _, o := range opts {
			o.applyRead(p)
		}
		q = *p
	}
	if q.isPrefix {
		q.prefix = key
	}
	if q.isSuffix {
		q.suffix = key
	}
	exact = !q.isPrefix && !q.isSuffix
	if exact && (key == "" || len(key) > storeMaxKey) {
		// A key that is not UTF-8 is not refused here: it cannot have been
		// written, so it is not found.
		return q, exact, storeCheckKey(key)
	}
	err = q.check() // before q is returned: check fills in its defaults
	return q, exact, err
}

func storeListQuery(opts []ListOption) (storeQuery, error) {
	var q storeQuery
	for _, o := range opts {
		o.applyList(&q)
	}
	err := q.check() // before q is returned: check fills in its defaults
	return q, err
}

func storeDeleteQuery(key string, opts []DeleteOption) (storeQuery, error) {
	var q storeQuery
	for _, o := range opts {
		o.applyDelete(&q)
	}
	if err := storeCheckKey(key); err != nil {
		return q, err
	}
	err := q.check() // before q is returned: check fills in its defaults
	return q, err
}

// check fills in the default namespace and checks the query: prefixes and
// suffixes are UTF-8, as keys are.
func (q *storeQuery) check() error {
	if q.db == "" && q.table == "" && q.prefix == "" && q.suffix == "" {
		q.db, q.table = StoreDefaultDatabase, StoreDefaultTable
		return nil
	}
	q.db, q.table = storeNamespace(q.db, q.table)
	if !utf8.ValidString(q.prefix) || !utf8.ValidString(q.suffix) {
		return Errorf(CodeInvalidArgument, "micro: store: prefix %q or suffix %q is not UTF-8", q.prefix, q.suffix)
	}
	return storeCheckNamespace(q.db, q.table)
}

type storeWriteOptions struct {
	db, table string
	mode      int // storeExpire...
	ttl       time.Duration
	at        time.Time
}

// How a write's expiry is given.
const (
	storeExpireRecord = iota // by Record.Expiry
	storeExpireTTL           // by WriteTTL
	storeExpireAt            // by WriteExpiry
	storeExpireNever         // by WriteExpiry(time.Time{})
)

// storeExpires returns the unix-nanosecond expiry of a write (0: never).
func storeExpires(r *Record, o *storeWriteOptions, now time.Time) int64 {
	switch o.mode {
	case storeExpireTTL:
		return max(now.Add(o.ttl).UnixNano(), 1)
	case storeExpireAt:
		return max(o.at.UnixNano(), 1)
	case storeExpireNever:
		return 0
	}
	if r.Expiry > 0 {
		return now.Add(r.Expiry).UnixNano()
	}
	return 0
}

// storeTTL returns the time to live a write asks for at now: 0 for never,
// negative for a record that has already expired.
func storeTTL(r *Record, o *storeWriteOptions, now time.Time) time.Duration {
	e := storeExpires(r, o, now)
	switch {
	case e == 0:
		return 0
	case e <= now.UnixNano():
		return -1
	}
	return time.Duration(e - now.UnixNano())
}

// storeWriteOpts applies Write's options and checks them and the record.
func storeWriteOpts(r *Record, opts []WriteOption) (storeWriteOptions, error) {
	var o storeWriteOptions
	for _, opt := range opts {
		opt.applyWrite(&o)
	}
	o.db, o.table = storeNamespace(o.db, o.table)
	if err := storeCheckNamespace(o.db, o.table); err != nil {
		return o, err
	}
	return o, storeCheckRecord(r)
}

func storeNamespace(db, table string) (string, string) {
	if db == "" {
		db = StoreDefaultDatabase
	}
	if table == "" {
		table = StoreDefaultTable
	}
	return db, table
}

// storeCheckNamespace checks a database name (a directory name in a file
// store: ASCII letters, digits, '.', '_' and '-', not starting with '.';
// a FileStore also refuses two that differ only in case) and
// a table name (UTF-8 but NUL).
func storeCheckNamespace(db, table string) error {
	if len(db) > storeMaxTable || db[0] == '.' {
		return Errorf(CodeInvalidArgument, "micro: store: database name %q: use up to %d ASCII letters, digits, '.', '_' or '-', not starting with '.'", db, storeMaxTable)
	}
	for i := 0; i < len(db); i++ {
		c := db[i]
		if !(c == '.' || c == '_' || c == '-' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return Errorf(CodeInvalidArgument, "micro: store: database name %q: use up to %d ASCII letters, digits, '.', '_' or '-', not starting with '.'", db, storeMaxTable)
		}
	}
	if len(table) > storeMaxTable || strings.IndexByte(table, 0) >= 0 || !utf8.ValidString(table) {
		return Errorf(CodeInvalidArgument, "micro: store: table name %q: up to %d bytes of UTF-8, no NUL", table, storeMaxTable)
	}
	return nil
}

// storeCheckKey checks a key: 1 to 65535 bytes of UTF-8.
func storeCheckKey(key string) error {
	if key == "" || len(key) > storeMaxKey {
		return Errorf(CodeInvalidArgument, "micro: store: a key must have 1 to %d bytes, not %d", storeMaxKey, len(key))
	}
	if !utf8.ValidString(key) {
		return Errorf(CodeInvalidArgument, "micro: store: key %q is not UTF-8", key)
	}
	return nil
}

// storeCheckRecord checks a record's key and metadata.
func storeCheckRecord(r *Record) error {
	if err := storeCheckKey(r.Key); err != nil {
		return err
	}
	for k, v := range r.Metadata {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return Errorf(CodeInvalidArgument, "micro: store: metadata %q=%q is not UTF-8", k, v)
		}
	}
	return nil
}

func storeNotFound(key string) error {
	return &Error{Code: CodeNotFound, Message: fmt.Sprintf("micro: store: key %q not found", key), cause: ErrNotFound}
}

// storeRemaining converts an expiry in unix nanoseconds to Record.Expiry.
func storeRemaining(expires int64, now int64) time.Duration {
	if expires == 0 {
		return 0
	}
	return time.Duration(max(expires-now, 1))
}

// storeLive reports whether a record with the expiry is alive at now.
func storeLive(expires, now int64) bool { return expires == 0 || expires > now }

// storeScan calls emit for each key of idx that q selects and live accepts,
// in key order, after q's offset and up to its limit. The prefix seeks the
// ordered index; a suffix filters what the prefix (or the whole table)
// yields.
func storeScan[V any](idx *storeIndex[V], q *storeQuery, live func(V) bool, emit func(key string, v V)) {
	if idx == nil {
		return
	}
	skip, n := q.offset, 0
	idx.ascend(q.prefix, func(k string, v V) bool {
		if !strings.HasPrefix(k, q.prefix) {
			return false
		}
		if !strings.HasSuffix(k, q.suffix) || !live(v) {
			return true
		}
		if skip > 0 {
			skip--
			return true
		}
		emit(k, v)
		n++
		return q.limit == 0 || n < q.limit
	})
}

// storeNS names a table within a database.
type storeNS struct{ db, table string }

// MemoryStore is a [Store] inside one process, lost when it ends. Keys are
// kept ordered, so a prefix read or a list walks only the keys it returns.
// Expired records are invisible at once and freed by later writes. The
// zero value is not usable; call [NewMemoryStore]. It starts no goroutines.
type MemoryStore struct {
	mu     sync.RWMutex
	tables map[storeNS]*storeIndex[storeMemRecord]
	expiry storeExpiryHeap
	closed bool
	now    func() time.Time
}

type storeMemRecord struct {
	value   []byte
	meta    map[string]string
	expires int64 // unix nanoseconds; 0: never
}

// NewMemoryStore returns an empty store. Of the options, it heeds only
// StoreLogger (and has nothing to log).
func NewMemoryStore(opts ...StoreOption) *MemoryStore {
	o := storeNewOptions(opts)
	return &MemoryStore{tables: map[storeNS]*storeIndex[storeMemRecord]{}, now: o.now}
}

// Read returns the record with the key, or with ReadPrefix / ReadSuffix
// every record that matches.
func (s *MemoryStore) Read(ctx context.Context, key string, opts ...ReadOption) ([]*Record, error) {
	q, exact, err := storeReadQuery(key, opts)
	if err != nil {
		return nil, err
	}
	var recs []*Record
	err = s.view(ctx, func(now int64) {
		idx := s.tables[storeNS{q.db, q.table}]
		if exact {
			if v, ok := idx.get(key); ok && storeLive(v.expires, now) {
				recs = []*Record{v.record(key, now)}
			}
			return
		}
		recs = []*Record{}
		storeScan(idx, &q, func(v storeMemRecord) bool { return storeLive(v.expires, now) }, func(k string, v storeMemRecord) {
			recs = append(recs, v.record(k, now))
		})
	})
	if err == nil && recs == nil {
		err = storeNotFound(key)
	}
	return recs, err
}

// ReadMany returns the records with the keys (see [ReadMany]).
func (s *MemoryStore) ReadMany(ctx context.Context, keys []string, opts ...ReadOption) ([]*Record, error) {
	q, err := storeManyQuery(keys, opts)
	if err != nil {
		return nil, err
	}
	out := make([]*Record, len(keys))
	err = s.view(ctx, func(now int64) {
		idx := s.tables[storeNS{q.db, q.table}]
		for i, k := range keys {
			if v, ok := idx.get(k); ok && storeLive(v.expires, now) {
				out[i] = v.record(k, now)
			}
		}
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// view runs fn with the time under the read lock, unless ctx has ended or
// the store is closed.
func (s *MemoryStore) view(ctx context.Context, fn func(now int64)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	now := s.now().UnixNano()
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	fn(now)
	return nil
}

func (v *storeMemRecord) record(key string, now int64) *Record {
	r := &Record{Key: key, Value: append([]byte(nil), v.value...), Expiry: storeRemaining(v.expires, now)}
	if len(v.meta) > 0 {
		r.Metadata = maps.Clone(v.meta)
	}
	return r
}

// Write stores a copy of r.
func (s *MemoryStore) Write(ctx context.Context, r *Record, opts ...WriteOption) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	o, err := storeWriteOpts(r, opts)
	if err != nil {
		return err
	}
	now := s.now()
	v := storeMemRecord{value: append([]byte(nil), r.Value...), expires: storeExpires(r, &o, now)}
	if len(r.Metadata) > 0 {
		v.meta = maps.Clone(r.Metadata)
	}
	ns := storeNS{o.db, o.table}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	idx := s.tables[ns]
	if idx == nil {
		idx = &storeIndex[storeMemRecord]{}
		s.tables[ns] = idx
	}
	old, had := idx.set(r.Key, v)
	if had && old.expires != 0 {
		s.expiry.live--
	}
	if v.expires != 0 {
		s.expiry.add(ns, r.Key, v.expires)
	}
	s.purge(now.UnixNano())
	return nil
}

// Delete removes the record with the key.
func (s *MemoryStore) Delete(ctx context.Context, key string, opts ...DeleteOption) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	q, err := storeDeleteQuery(key, opts)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if idx := s.tables[storeNS{q.db, q.table}]; idx != nil {
		if old, ok := idx.delete(key); ok && old.expires != 0 {
			s.expiry.live--
		}
	}
	s.purge(s.now().UnixNano())
	return nil
}

// purge frees the records that have expired by now; the caller holds s.mu.
func (s *MemoryStore) purge(now int64) {
	s.expiry.purge(now, func(ns storeNS, key string, at int64) bool {
		idx := s.tables[ns]
		if idx == nil {
			return false
		}
		if v, ok := idx.get(key); ok && v.expires == at {
			idx.delete(key)
			return true
		}
		return false
	}, func(yield func(ns storeNS, key string, at int64)) {
		for ns, idx := range s.tables {
			idx.ascend("", func(k string, v storeMemRecord) bool {
				if v.expires != 0 {
					yield(ns, k, v.expires)
				}
				return true
			})
		}
	})
}

// List returns the keys the options select, in key order.
func (s *MemoryStore) List(ctx context.Context, opts ...ListOption) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q, err := storeListQuery(opts)
	if err != nil {
		return nil, err
	}
	now := s.now().UnixNano()
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrClosed
	}
	keys := []string{}
	storeScan(s.tables[storeNS{q.db, q.table}], &q, func(v storeMemRecord) bool { return storeLive(v.expires, now) },
		func(k string, _ storeMemRecord) { keys = append(keys, k) })
	return keys, nil
}

// Close drops every record. It is idempotent.
func (s *MemoryStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.tables = nil
	s.expiry = storeExpiryHeap{}
	return nil
}

// storeExpiryHeap orders the expiries of records so that those that have
// passed are freed in O(log n) each. An entry may be stale (the record was
// rewritten or deleted since): the purge callback checks it against the
// record. live counts the records with an expiry, so that a heap grown far
// past it by stale entries is rebuilt.
type storeExpiryHeap struct {
	items []storeExpiry
	live  int
}

type storeExpiry struct {
	ns  storeNS
	key string
	at  int64
}

func (h *storeExpiryHeap) Len() int           { return len(h.items) }
func (h *storeExpiryHeap) Less(i, j int) bool { return h.items[i].at < h.items[j].at }
func (h *storeExpiryHeap) Swap(i, j int)      { h.items[i], h.items[j] = h.items[j], h.items[i] }
func (h *storeExpiryHeap) Push(x any)         { h.items = append(h.items, x.(storeExpiry)) }
func (h *storeExpiryHeap) Pop() any {
	x := h.items[len(h.items)-1]
	h.items[len(h.items)-1] = storeExpiry{}
	h.items = h.items[:len(h.items)-1]
	return x
}

func (h *storeExpiryHeap) add(ns storeNS, key string, at int64) {
	h.live++
	heap.Push(h, storeExpiry{ns, key, at})
}

// purge pops the entries due by now and calls drop for each, which frees
// the record if the entry is current and reports whether it did. If stale
// entries outnumber live ones, the heap is rebuilt from all, which yields
// every record with an expiry.
func (h *storeExpiryHeap) purge(now int64, drop func(ns storeNS, key string, at int64) bool,
	all func(yield func(ns storeNS, key string, at int64))) {
	for len(h.items) > 0 && h.items[0].at <= now {
		e := heap.Pop(h).(storeExpiry)
		if drop(e.ns, e.key, e.at) {
			h.live--
		}
	}
	if len(h.items) > 1024 && len(h.items) > 2*h.live {
		h.items = h.items[:0]
		h.live = 0
		all(func(ns storeNS, key string, at int64) {
			h.items = append(h.items, storeExpiry{ns, key, at})
			h.live++
		})
		heap.Init(h)
	}
}

// storeIndex is an ordered map from string keys to V, kept as a list of
// sorted chunks of at most storeChunkMax entries: an insert moves at most
// one chunk's entries, a seek is two binary searches, and a walk in key
// order reads each chunk in turn. A hash map beside it answers lookups of
// one key without the searches' cache misses. The zero value is an empty index. It is
// not safe for concurrent use.
type storeIndex[V any] struct {
	chunks []*storeChunk[V]
	n      int
	slots  []storeSlot[V] // the same entries in a hash table, for lookups of one key
	seed   maphash.Seed
	plain  bool // no hash table: lookups search the chunks
}

// storeSlot is an entry of the hash table: open addressing with linear
// probing; h is 0 for an empty slot.
type storeSlot[V any] struct {
	h   uint64
	key string
	v   V
}

type storeChunk[V any] struct {
	keys []string
	vals []V
}

const storeChunkMax = 512

// len returns the number of keys.
func (x *storeIndex[V]) len() int { return x.n }

// find returns the chunk that holds or would hold key, and the position of
// key in it.
func (x *storeIndex[V]) find(key string) (ci, i int, found bool) {
	lo, hi := 0, len(x.chunks)
	for lo < hi { // the first chunk whose first key is > key
		m := int(uint(lo+hi) >> 1)
		if x.chunks[m].keys[0] <= key {
			lo = m + 1
		} else {
			hi = m
		}
	}
	ci = max(lo-1, 0)
	keys := x.chunks[ci].keys
	lo, hi = 0, len(keys)
	for lo < hi { // the first key >= key
		m := int(uint(lo+hi) >> 1)
		if keys[m] < key {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return ci, lo, lo < len(keys) && keys[lo] == key
}

// get returns the value of key; a nil index holds none.
func (x *storeIndex[V]) get(key string) (v V, ok bool) {
	if x == nil || x.n == 0 {
		return v, false
	}
	if x.plain {
		ci, i, ok := x.find(key)
		if !ok {
			return v, false
		}
		return x.chunks[ci].vals[i], true
	}
	i, ok := x.slot(key, x.hash(key))
	if !ok {
		return v, false
	}
	return x.slots[i].v, true
}

func (x *storeIndex[V]) hash(key string) uint64 {
	return maphash.String(x.seed, key) | 1 // never 0, the empty slot
}

// slot returns the slot of key, or the empty slot where it would go.
func (x *storeIndex[V]) slot(key string, h uint64) (int, bool) {
	mask := len(x.slots) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		s := &x.slots[i]
		if s.h == 0 {
			return i, false
		}
		if s.h == h && s.key == key {
			return i, true
		}
	}
}

// hashSet stores v under key in the hash table, growing it to keep it at
// most 3/4 full.
func (x *storeIndex[V]) hashSet(key string, v V) {
	if x.plain {
		return
	}
	if len(x.slots) == 0 {
		x.seed = maphash.MakeSeed()
		x.slots = make([]storeSlot[V], 16)
	}
	if (x.n+1)*4 > len(x.slots)*3 {
		old := x.slots
		x.slots = make([]storeSlot[V], 2*len(old))
		for _, s := range old {
			if s.h != 0 {
				i, _ := x.slot(s.key, s.h)
				x.slots[i] = s
			}
		}
	}
	h := x.hash(key)
	i, _ := x.slot(key, h)
	x.slots[i] = storeSlot[V]{h, key, v}
}

// hashDelete removes key from the hash table, shifting back the entries
// after it that probed past its slot.
func (x *storeIndex[V]) hashDelete(key string) {
	if x.plain {
		return
	}
	i, ok := x.slot(key, x.hash(key))
	if !ok {
		return
	}
	mask := len(x.slots) - 1
	for j := (i + 1) & mask; x.slots[j].h != 0; j = (j + 1) & mask {
		home := int(x.slots[j].h) & mask
		// The entry at j may move to the hole at i unless its home lies
		// cyclically in (i, j].
		if i <= j && (home <= i || home > j) || i > j && home <= i && home > j {
			x.slots[i] = x.slots[j]
			i = j
		}
	}
	x.slots[i] = storeSlot[V]{}
}

// set stores v under key and returns the value it replaced.
func (x *storeIndex[V]) set(key string, v V) (old V, had bool) {
	if len(x.chunks) == 0 {
		x.hashSet(key, v)
		x.chunks = []*storeChunk[V]{{keys: []string{key}, vals: []V{v}}}
		x.n = 1
		return old, false
	}
	ci, i, found := x.find(key)
	c := x.chunks[ci]
	if found {
		old = c.vals[i]
		c.vals[i] = v
		x.hashSet(key, v)
		return old, true
	}
	x.hashSet(key, v) // before n grows: it sizes the table by n
	c.keys = append(c.keys, "")
	copy(c.keys[i+1:], c.keys[i:])
	c.keys[i] = key
	var zero V
	c.vals = append(c.vals, zero)
	copy(c.vals[i+1:], c.vals[i:])
	c.vals[i] = v
	x.n++
	if len(c.keys) > storeChunkMax {
		half := len(c.keys) / 2
		right := &storeChunk[V]{
			keys: append(make([]string, 0, storeChunkMax+1), c.keys[half:]...),
			vals: append(make([]V, 0, storeChunkMax+1), c.vals[half:]...),
		}
		clear(c.keys[half:])
		clear(c.vals[half:])
		c.keys, c.vals = c.keys[:half], c.vals[:half]
		x.chunks = append(x.chunks, nil)
		copy(x.chunks[ci+2:], x.chunks[ci+1:])
		x.chunks[ci+1] = right
	}
	return old, false
}

// delete removes key and returns its value.
func (x *storeIndex[V]) delete(key string) (old V, had bool) {
	if x.n == 0 {
		return old, false
	}
	ci, i, found := x.find(key)
	if !found {
		return old, false
	}
	x.hashDelete(key)
	c := x.chunks[ci]
	old = c.vals[i]
	c.keys = append(c.keys[:i], c.keys[i+1:]...)
	c.vals = append(c.vals[:i], c.vals[i+1:]...)
	c.keys[:cap(c.keys)][len(c.keys)] = ""
	var zero V
	c.vals[:cap(c.vals)][len(c.vals)] = zero
	x.n--
	switch {
	case len(c.keys) == 0:
		x.chunks = append(x.chunks[:ci], x.chunks[ci+1:]...)
		x.chunks[:cap(x.chunks)][len(x.chunks)] = nil
	case len(c.keys) < storeChunkMax/4 && ci+1 < len(x.chunks) && len(c.keys)+len(x.chunks[ci+1].keys) <= storeChunkMax/2:
		next := x.chunks[ci+1]
		c.keys = append(c.keys, next.keys...)
		c.vals = append(c.vals, next.vals...)
		x.chunks = append(x.chunks[:ci+1], x.chunks[ci+2:]...)
		x.chunks[:cap(x.chunks)][len(x.chunks)] = nil
	}
	return old, true
}

// ascend calls fn for each key >= from in order until fn returns false.
// fn must not change the index.
func (x *storeIndex[V]) ascend(from string, fn func(key string, v V) bool) {
	if x.n == 0 {
		return
	}
	ci, i, _ := x.find(from)
	for ; ci < len(x.chunks); ci, i = ci+1, 0 {
		c := x.chunks[ci]
		for ; i < len(c.keys); i++ {
			if !fn(c.keys[i], c.vals[i]) {
				return
			}
		}
	}
}

// storeManyQuery checks ReadMany's keys and options: exact keys only.
func storeManyQuery(keys []string, opts []ReadOption) (q storeQuery, err error) {
	if len(opts) > 0 { // options get a pointer, which escapes: only then
		p := new(storeQuery)
		for _, o := range opts {
			o.applyRead(p)
		}
		q = *p
	}
	if q.isPrefix || q.isSuffix || q.limit != 0 || q.offset != 0 {
		return q, Errorf(CodeInvalidArgument, "micro: store: ReadMany reads exact keys: ReadPrefix, ReadSuffix, ReadLimit and ReadOffset do not apply")
	}
	for _, k := range keys {
		if k == "" || len(k) > storeMaxKey {
			return q, storeCheckKey(k)
		}
	}
	err = q.check() // before q is returned: check fills in its defaults
	return q, err
}
