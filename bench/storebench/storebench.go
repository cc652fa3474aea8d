// Package storebench measures micro's FileStore against go.etcd.io/bbolt (the
// engine under go-micro's file store) on the same disk in the same run:
// durable writes one at a time, concurrent writes sharing syncs, random
// reads, prefix reads of 1,000 keys, durable deletes, and the size of the
// files on disk.
//
// What is compared with what:
//
//   - write-fsync: one writer, each write durable before the next
//     (FileStore with SyncEveryWrite; bbolt with one Update per key).
//   - write-group: 64 concurrent writers, each write durable when it
//     returns (FileStore with SyncGroupCommit; bbolt with DB.Batch, its own
//     way of sharing a commit among concurrent callers).
//   - read-random: one goroutine reading random keys of the loaded set
//     (FileStore.Read; bbolt Get in a View, the value copied out since bbolt's
//     is valid only inside the transaction and FileStore returns a copy).
//   - read-random-16: the same reads, 16 random keys a call
//     (FileStore.ReadMany; bbolt 16 Gets in one View), counted in keys.
//   - read-prefix-1000: one goroutine reading every record under a prefix
//     that selects 1,000 of the keys, values copied as above.
//   - delete-fsync: one deleter, each delete durable before the next.
//   - size: bytes on disk after loading the keys (FileStore's log; bbolt's
//     file).
//
// The random keys are drawn before the reads and held in the order they
// are read (see readOrder), so that the reads measure the engine. The key
// set is loaded before the reads with each engine's fast path
// (FileStore with SyncGroupCommit from 64 writers; bbolt with 1,000 puts a
// transaction), and is not part of any figure.
package storebench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/micro-kit/micro"
	bolt "go.etcd.io/bbolt"
)

// Config sizes a run.
type Config struct {
	Dir        string        // where the engines' files go (a fresh directory per engine and value size)
	Keys       int           // keys loaded for reads and size (default 100,000)
	ValueSizes []int         // value sizes in bytes (default 100 and 1024)
	FsyncOps   int           // writes and deletes in the fsync-per-op workloads (default 2,000)
	GroupOps   int           // writes in the group workload (default 20,000)
	Writers    int           // concurrent writers in the group workload (default 64)
	ReadFor    time.Duration // how long the read workloads run (default 2s)
	Engines    []string      // default: micro, bbolt
}

func (c *Config) defaults() {
	if c.Keys <= 0 {
		c.Keys = 100_000
	}
	if len(c.ValueSizes) == 0 {
		c.ValueSizes = []int{100, 1024}
	}
	if c.FsyncOps <= 0 {
		c.FsyncOps = 2000
	}
	if c.GroupOps <= 0 {
		c.GroupOps = 20_000
	}
	if c.Writers <= 0 {
		c.Writers = 64
	}
	if c.ReadFor <= 0 {
		c.ReadFor = 2 * time.Second
	}
	if len(c.Engines) == 0 {
		c.Engines = []string{"micro", "bbolt"}
	}
}

// Result is one engine's figures for one value size.
type Result struct {
	Engine    string
	ValueSize int
	// Ops per second of each workload, by name.
	Rate map[string]float64
	// SizeBytes is the bytes on disk after loading.
	SizeBytes int64
}

// Workloads, in report order.
const (
	WriteFsync = "write-fsync"
	WriteGroup = "write-group"
	ReadRandom = "read-random"
	ReadBatch  = "read-random-16"
	ReadPrefix = "read-prefix-1000"
	DeleteSync = "delete-fsync"
)

// Workloads lists the workload names in report order.
var Workloads = []string{WriteFsync, WriteGroup, ReadRandom, ReadBatch, ReadPrefix, DeleteSync}

// batch is how many random keys a read-random-16 call reads.
const batch = 16

// engine is what the workloads need of a store.
type engine interface {
	put(key string, value []byte) error // durable when it returns
	get(key string) ([]byte, error)
	getMany(keys []string, vals [][]byte) error // vals[i] = keys[i]'s value
	prefix(p string) (int, error)               // reads every record under p; returns how many
	del(key string) error                       // durable when it returns
	size() (int64, error)
	close() error
}

// opener opens an engine in dir; group selects its concurrent-writer mode.
type opener func(dir string, group bool) (engine, error)

var engines = map[string]opener{"micro": openMicro, "bbolt": openBolt}

// Run measures every engine for every value size once.
func Run(ctx context.Context, cfg Config) ([]Result, error) {
	cfg.defaults()
	var out []Result
	for _, vs := range cfg.ValueSizes {
		for _, name := range cfg.Engines {
			open, ok := engines[name]
			if !ok {
				return nil, fmt.Errorf("storebench: unknown engine %q", name)
			}
			r, err := runEngine(ctx, cfg, name, open, vs)
			if err != nil {
				return nil, fmt.Errorf("storebench: %s, %d B: %w", name, vs, err)
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// Key returns the i'th key: "k" and six digits, so that "k012" selects the
// 1,000 keys k012000 to k012999.
func Key(i int) string { return fmt.Sprintf("k%06d", i) }

// readOrder is the keys of a run of random reads, made beforehand and held
// in the order they are read: the keys end to end in one string, walked
// front to back with their ends and numbers. Finding the next key then
// costs the reader no cache miss (the hardware prefetches a sequential
// walk), as a key a service has just parsed from a request is in its
// cache; looking keys up at random in a table of 100,000 would add a miss
// or two per read that is the harness's, not the engine's. It holds one
// pointer, so that it adds nothing to the collector's work. The run starts
// over after its last key.
type readOrder struct {
	keys string
	ends []int32 // keys[ends[j-1]:ends[j]] is the j'th key
	nums []int32
	pos  int
}

func newReadOrder(n, count int, rng *rand.Rand) *readOrder {
	o := &readOrder{ends: make([]int32, count), nums: make([]int32, count)}
	var b strings.Builder
	for j := range count {
		i := rng.IntN(n)
		o.nums[j] = int32(i)
		b.WriteString(Key(i))
		o.ends[j] = int32(b.Len())
	}
	o.keys = b.String()
	return o
}

// next returns the next key and its number.
func (o *readOrder) next() (int, string) {
	if o.pos == len(o.ends) {
		o.pos = 0
	}
	j := o.pos
	o.pos++
	from := int32(0)
	if j > 0 {
		from = o.ends[j-1]
	}
	return int(o.nums[j]), o.keys[from:o.ends[j]]
}

func value(size, i int) []byte {
	v := make([]byte, size)
	for j := range v {
		v[j] = byte('a' + (i+j)%26)
	}
	return v
}

func runEngine(ctx context.Context, cfg Config, name string, open opener, vs int) (Result, error) {
	res := Result{Engine: name, ValueSize: vs, Rate: map[string]float64{}}
	base, err := os.MkdirTemp(cfg.Dir, name+"-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(base)

	// Durable writes, one at a time.
	e, err := open(filepath.Join(base, "fsync"), false)
	if err != nil {
		return res, err
	}
	start := time.Now()
	for i := range cfg.FsyncOps {
		if err := e.put(Key(i), value(vs, i)); err != nil {
			e.close()
			return res, err
		}
	}
	res.Rate[WriteFsync] = float64(cfg.FsyncOps) / time.Since(start).Seconds()
	// Durable deletes, one at a time, of what was just written.
	start = time.Now()
	for i := range cfg.FsyncOps {
		if err := e.del(Key(i)); err != nil {
			e.close()
			return res, err
		}
	}
	res.Rate[DeleteSync] = float64(cfg.FsyncOps) / time.Since(start).Seconds()
	if err := e.close(); err != nil {
		return res, err
	}

	// Concurrent durable writes.
	e, err = open(filepath.Join(base, "group"), true)
	if err != nil {
		return res, err
	}
	d, err := concurrently(cfg.Writers, cfg.GroupOps, func(i int) error { return e.put(Key(i), value(vs, i)) })
	if err != nil {
		e.close()
		return res, err
	}
	res.Rate[WriteGroup] = float64(cfg.GroupOps) / d.Seconds()
	if err := e.close(); err != nil {
		return res, err
	}

	// Load the key set, then read it.
	e, err = open(filepath.Join(base, "load"), true)
	if err != nil {
		return res, err
	}
	defer e.close()
	if l, ok := e.(interface{ load(n, vs int) error }); ok {
		err = l.load(cfg.Keys, vs)
	} else {
		_, err = concurrently(cfg.Writers, cfg.Keys, func(i int) error { return e.put(Key(i), value(vs, i)) })
	}
	if err != nil {
		return res, err
	}
	if res.SizeBytes, err = e.size(); err != nil {
		return res, err
	}
	rng := rand.New(rand.NewPCG(1, 2))
	order := newReadOrder(cfg.Keys, 1<<20, rng) // made before, so that reads measure the engine
	n, start := 0, time.Now()
	for time.Since(start) < cfg.ReadFor {
		for range 1000 {
			i, key := order.next()
			v, err := e.get(key)
			if err != nil {
				return res, err
			}
			if len(v) != vs || v[0] != byte('a'+i%26) {
				return res, fmt.Errorf("key %d: wrong value", i)
			}
		}
		n += 1000
	}
	res.Rate[ReadRandom] = float64(n) / time.Since(start).Seconds()
	var keys [batch]string
	var nums [batch]int
	var vals [batch][]byte
	n, start = 0, time.Now()
	for time.Since(start) < cfg.ReadFor {
		for range 1000 / batch {
			for j := range keys {
				nums[j], keys[j] = order.next()
			}
			if err := e.getMany(keys[:], vals[:]); err != nil {
				return res, err
			}
			for j, v := range vals {
				if len(v) != vs || v[0] != byte('a'+nums[j]%26) {
					return res, fmt.Errorf("key %d: wrong value", nums[j])
				}
			}
		}
		n += 1000 / batch * batch
	}
	res.Rate[ReadBatch] = float64(n) / time.Since(start).Seconds()
	groups := cfg.Keys / 1000
	if groups > 0 {
		n, start = 0, time.Now()
		for time.Since(start) < cfg.ReadFor {
			p := Key(rng.IntN(groups) * 1000)[:4]
			got, err := e.prefix(p)
			if err != nil {
				return res, err
			}
			if got != 1000 {
				return res, fmt.Errorf("prefix %s: %d records, want 1000", p, got)
			}
			n++
		}
		res.Rate[ReadPrefix] = float64(n) / time.Since(start).Seconds()
	}
	return res, ctx.Err()
}

// concurrently runs fn(0..ops-1) from writers goroutines and returns how
// long it took.
func concurrently(writers, ops int, fn func(i int) error) (time.Duration, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	start := time.Now()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= ops {
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start), first
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// The micro FileStore.

type microEngine struct {
	s   *micro.FileStore
	dir string
}

func openMicro(dir string, group bool) (engine, error) {
	opt := micro.SyncEveryWrite()
	if group {
		opt = micro.SyncGroupCommit()
	}
	s, err := micro.NewFileStore(dir, opt)
	if err != nil {
		return nil, err
	}
	return &microEngine{s: s, dir: dir}, nil
}

func (m *microEngine) put(key string, v []byte) error {
	return m.s.Write(context.Background(), &micro.Record{Key: key, Value: v})
}

func (m *microEngine) get(key string) ([]byte, error) {
	recs, err := m.s.Read(context.Background(), key)
	if err != nil {
		return nil, err
	}
	return recs[0].Value, nil
}

func (m *microEngine) getMany(keys []string, vals [][]byte) error {
	recs, err := m.s.ReadMany(context.Background(), keys)
	if err != nil {
		return err
	}
	for i, r := range recs {
		if r == nil {
			return fmt.Errorf("%s: not found", keys[i])
		}
		vals[i] = r.Value
	}
	return nil
}

func (m *microEngine) prefix(p string) (int, error) {
	recs, err := m.s.Read(context.Background(), p, micro.ReadPrefix())
	return len(recs), err
}

func (m *microEngine) del(key string) error { return m.s.Delete(context.Background(), key) }

func (m *microEngine) size() (int64, error) { return dirSize(m.dir) }

func (m *microEngine) close() error { return m.s.Close() }

// bbolt.

var boltBucket = []byte("micro")

type boltEngine struct {
	db   *bolt.DB
	dir  string
	sync bool // put and del: Batch (concurrent callers share a commit) or Update
}

func openBolt(dir string, group bool) (engine, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	db, err := bolt.Open(filepath.Join(dir, "bolt.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, err
	}
	if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucketIfNotExists(boltBucket); return err }); err != nil {
		db.Close()
		return nil, err
	}
	return &boltEngine{db: db, dir: dir, sync: !group}, nil
}

func (b *boltEngine) update(fn func(*bolt.Tx) error) error {
	if b.sync {
		return b.db.Update(fn)
	}
	return b.db.Batch(fn)
}

func (b *boltEngine) put(key string, v []byte) error {
	return b.update(func(tx *bolt.Tx) error { return tx.Bucket(boltBucket).Put([]byte(key), v) })
}

// load puts n keys, 1,000 a transaction.
func (b *boltEngine) load(n, vs int) error {
	for lo := 0; lo < n; lo += 1000 {
		err := b.db.Update(func(tx *bolt.Tx) error {
			bk := tx.Bucket(boltBucket)
			for i := lo; i < min(lo+1000, n); i++ {
				if err := bk.Put([]byte(Key(i)), value(vs, i)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func (b *boltEngine) get(key string) ([]byte, error) {
	var out []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(boltBucket).Get([]byte(key))
		if v == nil {
			return errors.New("not found")
		}
		out = slices.Clone(v)
		return nil
	})
	return out, err
}

func (b *boltEngine) getMany(keys []string, vals [][]byte) error {
	return b.db.View(func(tx *bolt.Tx) error {
		bk := tx.Bucket(boltBucket)
		for i, key := range keys {
			v := bk.Get([]byte(key))
			if v == nil {
				return fmt.Errorf("%s: not found", key)
			}
			vals[i] = slices.Clone(v)
		}
		return nil
	})
}

func (b *boltEngine) prefix(p string) (int, error) {
	n := 0
	err := b.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(boltBucket).Cursor()
		var vals [][]byte
		for k, v := c.Seek([]byte(p)); k != nil && strings.HasPrefix(string(k), p); k, v = c.Next() {
			vals = append(vals, slices.Clone(v))
		}
		n = len(vals)
		return nil
	})
	return n, err
}

func (b *boltEngine) del(key string) error {
	return b.update(func(tx *bolt.Tx) error { return tx.Bucket(boltBucket).Delete([]byte(key)) })
}

func (b *boltEngine) size() (int64, error) { return dirSize(b.dir) }

func (b *boltEngine) close() error { return b.db.Close() }

// dirSize adds up the sizes of the files under dir.
func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		n += info.Size()
		return nil
	})
	return n, err
}

// Median returns, for each engine and value size, the median of each figure
// over the rounds.
func Median(rounds [][]Result) []Result {
	if len(rounds) == 0 {
		return nil
	}
	var out []Result
	for i, r := range rounds[0] {
		m := Result{Engine: r.Engine, ValueSize: r.ValueSize, Rate: map[string]float64{}}
		for _, w := range Workloads {
			var xs []float64
			for _, round := range rounds {
				xs = append(xs, round[i].Rate[w])
			}
			slices.Sort(xs)
			m.Rate[w] = xs[len(xs)/2]
		}
		var sizes []int64
		for _, round := range rounds {
			sizes = append(sizes, round[i].SizeBytes)
		}
		slices.Sort(sizes)
		m.SizeBytes = sizes[len(sizes)/2]
		out = append(out, m)
	}
	return out
}

// Report writes a Markdown table of results, with micro's ratio to bbolt
// where both ran.
func Report(w io.Writer, results []Result) {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "| value\t| workload\t| micro\t| bbolt\t| micro/bbolt\t|")
	fmt.Fprintln(tw, "| ---\t| ---\t| ---\t| ---\t| ---\t|")
	byKey := map[string]Result{}
	var sizes []int
	for _, r := range results {
		byKey[fmt.Sprint(r.Engine, r.ValueSize)] = r
		if !slices.Contains(sizes, r.ValueSize) {
			sizes = append(sizes, r.ValueSize)
		}
	}
	for _, vs := range sizes {
		m, b := byKey[fmt.Sprint("micro", vs)], byKey[fmt.Sprint("bbolt", vs)]
		for _, wl := range Workloads {
			fmt.Fprintf(tw, "| %d B\t| %s ops/s\t| %s\t| %s\t| %s\t|\n", vs, wl, num(m.Rate[wl]), num(b.Rate[wl]), ratio(m.Rate[wl], b.Rate[wl]))
		}
		fmt.Fprintf(tw, "| %d B\t| size on disk\t| %s\t| %s\t| %s\t|\n", vs, mib(m.SizeBytes), mib(b.SizeBytes), ratio(float64(m.SizeBytes), float64(b.SizeBytes)))
	}
	tw.Flush()
}

func num(x float64) string {
	switch {
	case x == 0:
		return "-"
	case x >= 1e6:
		return fmt.Sprintf("%.2fM", x/1e6)
	case x >= 1e3:
		return fmt.Sprintf("%.1fk", x/1e3)
	}
	return fmt.Sprintf("%.0f", x)
}

func mib(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}
