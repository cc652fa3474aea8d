package micro

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testClock is a clock a test moves by hand.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func newTestClock() *testClock {
	return &testClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// testStoreKind makes one kind of store for the shared tests.
type testStoreKind struct {
	name string
	open func(t *testing.T, opts ...StoreOption) Store
}

// testStoreKinds are every store, each run through the same tests with the
// same expectations.
func testStoreKinds() []testStoreKind {
	file := func(extra ...StoreOption) func(t *testing.T, opts ...StoreOption) Store {
		return func(t *testing.T, opts ...StoreOption) Store {
			t.Helper()
			s, err := NewFileStore(t.TempDir(), append(extra, opts...)...)
			assertNoError(t, err)
			t.Cleanup(func() { s.Close() })
			return s
		}
	}
	return []testStoreKind{
		{"memory", func(t *testing.T, opts ...StoreOption) Store {
			s := NewMemoryStore(opts...)
			t.Cleanup(func() { s.Close() })
			return s
		}},
		{"file", file()},
		{"file-group-commit", file(SyncGroupCommit())},
		{"file-pread", file(storeOption{store: func(o *storeOptions) { o.noMmap = true }})},
		// Keys' hashes keep 2 bits: most keys hash as others do, and reads
		// must tell them apart by the key in the record.
		{"file-colliding", file(storeOption{store: func(o *storeOptions) { o.hashMask = 0b110 }})},
		{"remote", func(t *testing.T, opts ...StoreOption) Store {
			t.Helper()
			backing := NewMemoryStore(opts...)
			svc := NewService(Name("store"), Address("127.0.0.1:0"), HandleSignal(false), Args())
			assertNoError(t, RegisterStore(svc.Server(), backing))
			assertNoError(t, svc.Start())
			s := NewRemoteStore(svc.Client(), "store")
			s.now = storeNewOptions(opts).now
			t.Cleanup(func() {
				s.Close()
				svc.Close()
				backing.Close()
			})
			return s
		}},
	}
}

func testStoreFill(t *testing.T, s Store, keys ...string) {
	t.Helper()
	for _, k := range keys {
		assertNoError(t, s.Write(context.Background(), &Record{Key: k, Value: []byte("v:" + k)}))
	}
}

func testRecordKeys(recs []*Record) string {
	var keys []string
	for _, r := range recs {
		keys = append(keys, r.Key)
	}
	return strings.Join(keys, " ")
}

func TestStoreSelects(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	for _, kind := range testStoreKinds() {
		t.Run(kind.name, func(t *testing.T) {
			s := kind.open(t)
			// Written out of order: every store must return key order.
			testStoreFill(t, s, "c", "a/3", "b/2x", "a", "a/1", "b/1", "a/2")
			assertNoError(t, s.Write(ctx, &Record{Key: "a/1", Value: []byte("other")}, WriteTo("other", "t")))

			reads := []struct {
				key  string
				opts []ReadOption
				want string // keys, or "!" for ErrNotFound
			}{
				{"a/2", nil, "a/2"},
				{"a", nil, "a"},
				{"nope", nil, "!"},
				{"a/", nil, "!"},
				{"a/", []ReadOption{ReadPrefix()}, "a/1 a/2 a/3"},
				{"a", []ReadOption{ReadPrefix()}, "a a/1 a/2 a/3"},
				{"", []ReadOption{ReadPrefix()}, "a a/1 a/2 a/3 b/1 b/2x c"},
				{"a/", []ReadOption{ReadPrefix(), ReadLimit(2)}, "a/1 a/2"},
				{"a/", []ReadOption{ReadPrefix(), ReadOffset(1)}, "a/2 a/3"},
				{"a/", []ReadOption{ReadPrefix(), ReadOffset(1), ReadLimit(1)}, "a/2"},
				{"a/", []ReadOption{ReadPrefix(), ReadOffset(3)}, ""},
				{"a/", []ReadOption{ReadPrefix(), ReadOffset(-1), ReadLimit(-5)}, "a/1 a/2 a/3"},
				{"1", []ReadOption{ReadSuffix()}, "a/1 b/1"},
				{"x", []ReadOption{ReadSuffix()}, "b/2x"},
				{"1", []ReadOption{ReadSuffix(), ReadOffset(1)}, "b/1"},
				{"a", []ReadOption{ReadPrefix(), ReadSuffix()}, "a"},
				{"zzz", []ReadOption{ReadPrefix()}, ""},
				{"a/1", []ReadOption{ReadFrom("other", "t")}, "a/1"},
				{"a/2", []ReadOption{ReadFrom("other", "t")}, "!"},
				{"a/", []ReadOption{ReadPrefix(), ReadFrom("other", "t")}, "a/1"},
				{"a/1", []ReadOption{ReadFrom("", "t2")}, "!"},
				{"a/1", []ReadOption{ReadFrom("nodb", "")}, "!"},
				{"a/1", []ReadOption{ReadFrom("nodb", ""), ReadPrefix()}, ""},
				{"a/1", []ReadOption{ReadFrom(StoreDefaultDatabase, StoreDefaultTable)}, "a/1"},
			}
			for _, c := range reads {
				recs, err := s.Read(ctx, c.key, c.opts...)
				if c.want == "!" {
					if !errors.Is(err, ErrNotFound) || CodeOf(err) != CodeNotFound {
						t.Fatalf("Read(%q) = %v, %v; want ErrNotFound", c.key, testRecordKeys(recs), err)
					}
					continue
				}
				assertNoError(t, err)
				if recs == nil {
					t.Fatalf("Read(%q) returned a nil slice", c.key)
				}
				if got := testRecordKeys(recs); got != c.want {
					t.Fatalf("Read(%q, %d options) = %q, want %q", c.key, len(c.opts), got, c.want)
				}
				for _, r := range recs {
					want := "v:" + r.Key
					if len(c.opts) > 0 && strings.Contains(fmt.Sprint(c.opts), "other") {
						continue
					}
					if string(r.Value) != want && string(r.Value) != "other" {
						t.Fatalf("value of %s = %q", r.Key, r.Value)
					}
				}
			}
			recs, err := s.Read(ctx, "a/1", ReadFrom("other", "t"))
			assertNoError(t, err)
			assertEqual(t, string(recs[0].Value), "other")

			lists := []struct {
				opts []ListOption
				want string
			}{
				{nil, "a a/1 a/2 a/3 b/1 b/2x c"},
				{[]ListOption{ListPrefix("b/")}, "b/1 b/2x"},
				{[]ListOption{ListSuffix("1")}, "a/1 b/1"},
				{[]ListOption{ListPrefix("a"), ListSuffix("3")}, "a/3"},
				{[]ListOption{ListLimit(3)}, "a a/1 a/2"},
				{[]ListOption{ListOffset(5)}, "b/2x c"},
				{[]ListOption{ListOffset(7)}, ""},
				{[]ListOption{ListPrefix("a"), ListOffset(2), ListLimit(2)}, "a/2 a/3"},
				{[]ListOption{ListSuffix("1"), ListLimit(1)}, "a/1"},
				{[]ListOption{ListFrom("other", "t")}, "a/1"},
				{[]ListOption{ListFrom("nodb", "")}, ""},
				{[]ListOption{ListFrom("", "nothing")}, ""},
			}
			for _, c := range lists {
				keys, err := s.List(ctx, c.opts...)
				assertNoError(t, err)
				if keys == nil {
					t.Fatal("List returned a nil slice")
				}
				if got := strings.Join(keys, " "); got != c.want {
					t.Fatalf("List(%d options) = %q, want %q", len(c.opts), got, c.want)
				}
			}
		})
	}
}

// testPlainStore hides a store's ReadMany, so that ReadMany falls back to
// one Read a key.
type testPlainStore struct{ Store }

func TestStoreReadMany(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	kinds := append(testStoreKinds(), testStoreKind{"plain", func(t *testing.T, opts ...StoreOption) Store {
		s := NewMemoryStore(opts...)
		t.Cleanup(func() { s.Close() })
		return testPlainStore{s}
	}})
	for _, kind := range kinds {
		t.Run(kind.name, func(t *testing.T) {
			clock := newTestClock()
			s := kind.open(t, storeClock(clock.Now))
			testStoreFill(t, s, "a", "b", "c/1")
			assertNoError(t, s.Write(ctx, &Record{Key: "a", Value: []byte("other"), Metadata: map[string]string{"m": "1"}},
				WriteTo("other", "t")))
			assertNoError(t, s.Write(ctx, &Record{Key: "empty", Metadata: map[string]string{"m": "2"}}))
			assertNoError(t, s.Write(ctx, &Record{Key: "ttl", Value: []byte("soon")}, WriteTTL(time.Second)))
			show := func(recs []*Record) string {
				var b strings.Builder
				for _, r := range recs {
					if r == nil {
						b.WriteString("- ")
						continue
					}
					fmt.Fprintf(&b, "%s=%s %v ", r.Key, r.Value, r.Metadata)
				}
				return b.String()
			}
			reads := []struct {
				keys []string
				opts []ReadOption
				want string
			}{
				{[]string{"b", "nope", "a", "b", "c/1", "c/"}, nil, "b=v:b map[] - a=v:a map[] b=v:b map[] c/1=v:c/1 map[] - "},
				{[]string{"a", "b"}, []ReadOption{ReadFrom("other", "t")}, "a=other map[m:1] - "},
				{[]string{"a"}, []ReadOption{ReadFrom("nodb", "")}, "- "},
				{[]string{"a", "\xff"}, nil, "a=v:a map[] - "},
				{[]string{"ttl"}, nil, "ttl=soon map[] "},
				{[]string{"empty", "a"}, nil, "empty= map[m:2] a=v:a map[] "},
				{[]string{}, nil, ""},
			}
			for _, c := range reads {
				recs, err := ReadMany(ctx, s, c.keys, c.opts...)
				assertNoError(t, err)
				if recs == nil || len(recs) != len(c.keys) {
					t.Fatalf("ReadMany(%q): %d records", c.keys, len(recs))
				}
				if got := show(recs); got != c.want {
					t.Fatalf("ReadMany(%q, %d options) = %q, want %q", c.keys, len(c.opts), got, c.want)
				}
			}
			clock.Add(2 * time.Second)
			recs, err := ReadMany(ctx, s, []string{"ttl", "a"})
			assertNoError(t, err)
			assertEqual(t, show(recs), "- a=v:a map[] ")

			// The caller owns what it got.
			recs[1].Value[0] = 'X'
			assertEqual(t, testReadValue(t, s, "a"), "v:a")

			for _, opts := range [][]ReadOption{{ReadPrefix()}, {ReadSuffix()}, {ReadLimit(1)}, {ReadOffset(1)}, {ReadFrom("a b", "")}} {
				if _, err := ReadMany(ctx, s, []string{"a"}, opts...); CodeOf(err) != CodeInvalidArgument {
					t.Fatalf("options %v: %v", opts, err)
				}
			}
			for _, keys := range [][]string{{"a", ""}, {strings.Repeat("k", storeMaxKey+1)}} {
				if _, err := ReadMany(ctx, s, keys); CodeOf(err) != CodeInvalidArgument {
					t.Fatalf("keys %.20q: %v", keys, err)
				}
			}
			ended, cancel := context.WithCancel(ctx)
			cancel()
			if _, err := ReadMany(ended, s, []string{"a"}); !errors.Is(err, context.Canceled) && CodeOf(err) != CodeCanceled {
				t.Fatalf("ended context: %v", err)
			}
			assertNoError(t, s.Close())
			if _, err := ReadMany(ctx, s, []string{"a"}); !errors.Is(err, ErrClosed) {
				t.Fatalf("closed store: %v", err)
			}
			if _, ok := s.(testPlainStore); !ok { // Read-a-key has nothing to call
				if recs, err := ReadMany(ctx, s, nil); !errors.Is(err, ErrClosed) || recs != nil {
					t.Fatalf("closed store, no keys: %v, %v", recs, err)
				}
			}
		})
	}
}

// TestFileStoreReadManyLarge reads more keys than one chunk, with records
// shared in a chunk's block and records over 4 KiB, before and after a
// compaction, from a store whose keys collide.
func TestFileStoreReadManyLarge(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	s, err := NewFileStore(t.TempDir(), SyncInterval(time.Hour), storeOption{store: func(o *storeOptions) { o.hashMask = 0xff }})
	assertNoError(t, err)
	defer s.Close()
	value := func(i int) []byte {
		if i%11 == 5 {
			return nil // with a key long enough, past storeManyShared
		}
		return bytes.Repeat([]byte{byte('a' + i%26)}, 1+i*37%(3*storeManyShared))
	}
	key := func(i int) string {
		if i%11 == 5 {
			return fmt.Sprintf("k%04d", i) + strings.Repeat("-", i*97%(2*storeManyShared))
		}
		return fmt.Sprintf("k%04d", i)
	}
	var keys []string
	for i := range 3*storeManyChunk + 5 {
		keys = append(keys, key(i))
		if i%7 != 3 { // every seventh is missing
			assertNoError(t, s.Write(ctx, &Record{Key: keys[i], Value: value(i)}))
		}
	}
	check := func() {
		t.Helper()
		recs, err := s.ReadMany(ctx, keys)
		assertNoError(t, err)
		for i, r := range recs {
			switch {
			case i%7 == 3 && r != nil:
				t.Fatalf("%s: found %q", keys[i], r.Key)
			case i%7 == 3:
			case r == nil || r.Key != keys[i] || !bytes.Equal(r.Value, value(i)) || cap(r.Value) != len(r.Value):
				t.Fatalf("%s: got %v", keys[i], r)
			}
		}
	}
	check()
	for i := range keys[:50] {
		assertNoError(t, s.Delete(ctx, keys[i]))
		if i%7 != 3 {
			assertNoError(t, s.Write(ctx, &Record{Key: keys[i], Value: value(i)}))
		}
	}
	assertNoError(t, s.Compact(ctx))
	check()
}

func TestStoreWriteDeleteAndOwnership(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	for _, kind := range testStoreKinds() {
		t.Run(kind.name, func(t *testing.T) {
			s := kind.open(t)
			val := []byte("hello")
			md := map[string]string{"type": "greeting", "lang": "en"}
			assertNoError(t, s.Write(ctx, &Record{Key: "k", Value: val, Metadata: md}))
			val[0], md["type"] = 'J', "changed" // the store kept its own copy

			recs, err := s.Read(ctx, "k")
			assertNoError(t, err)
			assertEqual(t, len(recs), 1)
			r := recs[0]
			assertEqual(t, r.Key, "k")
			assertEqual(t, string(r.Value), "hello")
			assertEqual(t, len(r.Metadata), 2)
			assertEqual(t, r.Metadata["type"], "greeting")
			assertEqual(t, r.Metadata["lang"], "en")
			assertEqual(t, r.Expiry, time.Duration(0))
			r.Value[0], r.Metadata["type"] = 'X', "mine" // the caller owns what it got
			recs, err = s.Read(ctx, "k")
			assertNoError(t, err)
			assertEqual(t, string(recs[0].Value), "hello")
			assertEqual(t, recs[0].Metadata["type"], "greeting")

			// Overwrite, empty value, binary key and value.
			assertNoError(t, s.Write(ctx, &Record{Key: "k", Value: nil}))
			recs, err = s.Read(ctx, "k")
			assertNoError(t, err)
			assertEqual(t, len(recs[0].Value), 0)
			assertEqual(t, len(recs[0].Metadata), 0)
			bin := "\x00\x01/é"
			assertNoError(t, s.Write(ctx, &Record{Key: bin, Value: []byte{0, 0xff, 0}}))
			recs, err = s.Read(ctx, bin)
			assertNoError(t, err)
			assertEqual(t, string(recs[0].Value), "\x00\xff\x00")

			// Delete, and delete again.
			assertNoError(t, s.Delete(ctx, "k"))
			_, err = s.Read(ctx, "k")
			if !errors.Is(err, ErrNotFound) {
				t.Fatalf("read after delete: %v", err)
			}
			assertNoError(t, s.Delete(ctx, "k"))
			assertNoError(t, s.Delete(ctx, "never-written", DeleteFrom("nodb", "x")))
			keys, err := s.List(ctx)
			assertNoError(t, err)
			assertEqual(t, strings.Join(keys, ","), bin)

			// An ended context does nothing.
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			assertCode(t, s.Write(cctx, &Record{Key: "canceled"}), CodeCanceled)
			assertCode(t, s.Delete(cctx, bin), CodeCanceled)
			_, err = s.Read(cctx, bin)
			assertCode(t, err, CodeCanceled)
			_, err = s.List(cctx)
			assertCode(t, err, CodeCanceled)
			_, err = s.Read(ctx, "canceled")
			if !errors.Is(err, ErrNotFound) {
				t.Fatalf("a write with an ended context happened: %v", err)
			}

			// Bad input is invalid_argument.
			assertCode(t, s.Write(ctx, &Record{Key: ""}), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: strings.Repeat("k", storeMaxKey+1)}), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: "k"}, WriteTo("../up", "")), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: "k"}, WriteTo(".hidden", "")), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: "k"}, WriteTo("", "a\x00b")), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: "\xff"}), CodeInvalidArgument)
			assertCode(t, s.Write(ctx, &Record{Key: "k", Metadata: map[string]string{"k": "\xff"}}), CodeInvalidArgument)
			assertCode(t, s.Delete(ctx, ""), CodeInvalidArgument)
			_, err = s.List(ctx, ListFrom("a/b", ""))
			assertCode(t, err, CodeInvalidArgument)
			_, err = s.Read(ctx, "k", ReadFrom("a b", ""))
			assertCode(t, err, CodeInvalidArgument)

			// Many keys in many tables, then closed.
			for i := range 2000 {
				assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprintf("n%05d", i), Value: []byte{byte(i)}}, WriteTo("many", fmt.Sprint(i%3))))
			}
			for i := range 3 {
				keys, err := s.List(ctx, ListFrom("many", fmt.Sprint(i)), ListPrefix("n00"))
				assertNoError(t, err)
				want := 0
				for j := i; j < 1000; j += 3 {
					want++
				}
				assertEqual(t, len(keys), want)
				if !slices.IsSorted(keys) {
					t.Fatal("keys not in order")
				}
			}
			assertNoError(t, s.Close())
			assertNoError(t, s.Close())
			if _, err := s.Read(ctx, "n00001"); !errors.Is(err, ErrClosed) && CodeOf(err) != CodeUnavailable {
				t.Fatalf("read after close: %v", err)
			}
			if err := s.Write(ctx, &Record{Key: "x"}); !errors.Is(err, ErrClosed) {
				t.Fatalf("write after close: %v", err)
			}
		})
	}
}

func TestStoreTTL(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	for _, kind := range testStoreKinds() {
		t.Run(kind.name, func(t *testing.T) {
			clock := newTestClock()
			s := kind.open(t, storeClock(clock.Now))
			assertNoError(t, s.Write(ctx, &Record{Key: "t1", Value: []byte("1")}, WriteTTL(10*time.Second)))
			assertNoError(t, s.Write(ctx, &Record{Key: "t2", Value: []byte("2"), Expiry: 20 * time.Second}))
			assertNoError(t, s.Write(ctx, &Record{Key: "t3", Value: []byte("3")}))
			assertNoError(t, s.Write(ctx, &Record{Key: "t4", Value: []byte("4"), Expiry: time.Second}, WriteExpiry(time.Time{})))
			assertNoError(t, s.Write(ctx, &Record{Key: "t5", Value: []byte("5")}, WriteTTL(0)))
			assertNoError(t, s.Write(ctx, &Record{Key: "t3", Value: []byte("gone")}, WriteTTL(-time.Second)))
			expiry := func(key string) time.Duration {
				t.Helper()
				recs, err := s.Read(ctx, key)
				assertNoError(t, err)
				return recs[0].Expiry
			}
			gone := func(key string) {
				t.Helper()
				if _, err := s.Read(ctx, key); !errors.Is(err, ErrNotFound) {
					t.Fatalf("%s: %v, want ErrNotFound", key, err)
				}
			}
			list := func() string {
				t.Helper()
				keys, err := s.List(ctx)
				assertNoError(t, err)
				recs, err := s.Read(ctx, "t", ReadPrefix())
				assertNoError(t, err)
				assertEqual(t, testRecordKeys(recs), strings.Join(keys, " "))
				return strings.Join(keys, " ")
			}
			assertEqual(t, expiry("t1"), 10*time.Second)
			assertEqual(t, expiry("t2"), 20*time.Second)
			assertEqual(t, expiry("t4"), time.Duration(0))
			gone("t5") // a TTL of 0 has already run out
			gone("t3") // and hides what was there
			assertEqual(t, list(), "t1 t2 t4")

			clock.Add(6 * time.Second)
			assertEqual(t, expiry("t1"), 4*time.Second)
			clock.Add(4 * time.Second)
			gone("t1") // expired at exactly 10s
			assertEqual(t, list(), "t2 t4")
			assertNoError(t, s.Write(ctx, &Record{Key: "t1", Value: []byte("again")}))
			assertEqual(t, list(), "t1 t2 t4")
			assertNoError(t, s.Write(ctx, &Record{Key: "t6"}, WriteExpiry(clock.Now().Add(time.Minute))))
			clock.Add(10 * time.Second)
			gone("t2")
			assertEqual(t, list(), "t1 t4 t6")
			clock.Add(time.Hour)
			assertEqual(t, list(), "t1 t4")
		})
	}
}

// TestStoreExpiryPurge checks that expired records are freed, not only
// hidden, and that rewriting a key with a TTL over and over does not grow
// the expiry heap without bound.
func TestStoreExpiryPurge(t *testing.T) {
	ctx := context.Background()
	clock := newTestClock()
	s := NewMemoryStore(storeClock(clock.Now))
	defer s.Close()
	for i := range 100 {
		assertNoError(t, s.Write(ctx, &Record{Key: fmt.Sprint(i)}, WriteTTL(time.Second)))
	}
	clock.Add(2 * time.Second)
	assertNoError(t, s.Write(ctx, &Record{Key: "x"}))
	assertEqual(t, s.tables[storeNS{StoreDefaultDatabase, StoreDefaultTable}].len(), 1)
	for range 10000 {
		assertNoError(t, s.Write(ctx, &Record{Key: "y"}, WriteTTL(time.Hour)))
	}
	if n := len(s.expiry.items); n > 2100 {
		t.Fatalf("the expiry heap holds %d entries for one key", n)
	}
}

func TestStoreIndex(t *testing.T) {
	var x storeIndex[int]
	ref := map[string]int{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 50000 {
		k := fmt.Sprintf("%05d", rng.IntN(8000))
		switch rng.IntN(3) {
		case 0, 1:
			old, had := x.set(k, i)
			o, h := ref[k]
			if had != h || old != o {
				t.Fatalf("set %s: got %d %v, want %d %v", k, old, had, o, h)
			}
			ref[k] = i
		case 2:
			old, had := x.delete(k)
			o, h := ref[k]
			if had != h || old != o {
				t.Fatalf("delete %s: got %d %v, want %d %v", k, old, had, o, h)
			}
			delete(ref, k)
		}
		if i%5000 == 0 || i == 49999 {
			assertEqual(t, x.len(), len(ref))
			var keys []string
			x.ascend("", func(k string, v int) bool {
				if ref[k] != v {
					t.Fatalf("%s = %d, want %d", k, v, ref[k])
				}
				keys = append(keys, k)
				return true
			})
			if len(keys) != len(ref) || !slices.IsSorted(keys) {
				t.Fatalf("walk gave %d keys (sorted %v), want %d", len(keys), slices.IsSorted(keys), len(ref))
			}
			from := fmt.Sprintf("%05d", rng.IntN(8000))
			var first string
			x.ascend(from, func(k string, v int) bool { first = k; return false })
			i, _ := slices.BinarySearch(keys, from)
			if i < len(keys) && first != keys[i] || i == len(keys) && first != "" {
				t.Fatalf("ascend from %s started at %q", from, first)
			}
			for _, c := range x.chunks {
				if len(c.keys) == 0 || len(c.keys) > storeChunkMax {
					t.Fatalf("chunk of %d keys", len(c.keys))
				}
			}
		}
	}
	for k := range ref {
		x.delete(k)
	}
	assertEqual(t, x.len(), 0)
	assertEqual(t, len(x.chunks), 0)
}

func TestServiceStore(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	base := []ServiceOption{Name("svc"), HandleSignal(false)}

	svc := NewService(append(base, Args())...)
	assertNoError(t, svc.Init())
	if _, ok := svc.Store().(*MemoryStore); !ok {
		t.Fatalf("default store %T", svc.Store())
	}
	assertNoError(t, svc.Store().Write(ctx, &Record{Key: "k"}))
	assertNoError(t, svc.Init()) // a second Init keeps the store and what it holds
	_, err := svc.Store().Read(ctx, "k")
	assertNoError(t, err)
	own := svc.Store()
	assertNoError(t, svc.Close())
	if err := own.Write(ctx, &Record{Key: "k"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("the service's own store after Close: %v", err)
	}

	mine := NewMemoryStore()
	defer mine.Close()
	svc = NewService(append(base, Args(), WithStore(mine))...)
	assertNoError(t, svc.Init())
	assertEqual(t, svc.Store(), Store(mine))
	assertNoError(t, svc.Close())
	assertNoError(t, mine.Write(ctx, &Record{Key: "still open"}))

	dir := t.TempDir()
	svc = NewService(append(base, Args("-store", "file:"+dir), WithStore(mine))...)
	assertNoError(t, svc.Init())
	fs, ok := svc.Store().(*FileStore)
	if !ok || fs.Dir() != dir {
		t.Fatalf("-store file:%s gave %T", dir, svc.Store())
	}
	assertNoError(t, svc.Store().Write(ctx, &Record{Key: "durable", Value: []byte("yes")}))
	assertNoError(t, svc.Close())
	reopened := testOpenFile(t, dir) // the service released it
	assertEqual(t, testReadValue(t, reopened, "durable"), "yes")
	assertNoError(t, reopened.Close())

	t.Setenv("MICRO_STORE", "file:"+dir)
	svc = NewService(append(base, Args())...)
	assertNoError(t, svc.Init())
	assertEqual(t, testReadValue(t, svc.Store(), "durable"), "yes")
	assertNoError(t, svc.Close())

	svc = NewService(append(base, Args("-store", "redis:6379"))...)
	if err := svc.Init(); err == nil || !strings.Contains(err.Error(), "file:DIR") {
		t.Fatalf("unknown store: %v", err)
	}
	assertNoError(t, svc.Close())
}

func TestStoreTableHash(t *testing.T) {
	// Random operations: the hash table agrees with the ordered index,
	// with full hashes and with hashes cut to 8 bits (collisions galore).
	for _, mask := range []uint32{0, 0xff} {
		tab := newStoreTable(mask)
		ref := map[string]storeLoc{}
		rng := rand.New(rand.NewPCG(3, 4))
		for i := range 30000 {
			k := fmt.Sprint(rng.IntN(3000))
			if rng.IntN(3) < 2 {
				loc := storeLoc{off: int64(i + 1), size: uint32(i)}
				tab.set(k, loc)
				ref[k] = loc
			} else {
				tab.delete(k)
				delete(ref, k)
			}
		}
		assertEqual(t, tab.hash.n, len(ref))
		assertEqual(t, tab.len(), len(ref))
		// peek compares hashes, not keys: for a key whose 32-bit hash another
		// shares (about one run in a few hundred, the seed being random), it may
		// give the other's place, which the reader then tells apart by the key
		// in the record.
		byHash := map[uint32][]storeLoc{}
		for k, loc := range ref {
			byHash[tab.hash.sum(k)] = append(byHash[tab.hash.sum(k)], loc)
		}
		for k, want := range ref {
			off, size, ok := tab.peek(k)
			assertEqual(t, ok, true)
			if got := (storeLoc{off: off, size: size}); got != want && !slices.Contains(byHash[tab.hash.sum(k)], got) {
				t.Fatalf("peek(%q) = %+v, want %+v or the place of a key with its hash", k, got, want)
			}
			got, ok := tab.get(k)
			assertEqual(t, ok, true)
			assertEqual(t, got, want)
		}
	}

	// Hashes that collide, and slots that probe past each other.
	var h storeLocHash
	h.insert(5, 1, 0)
	h.insert(5, 2, 0) // another key, the same hash
	h.insert(21, 3, 0)
	h.insert(6, 4, 0)
	h.replace(5, 2, 7, 9)
	i, ok := h.at(5, 7)
	assertEqual(t, ok, true)
	assertEqual(t, h.slots[i].size, uint32(9))
	h.remove(5, 1)
	for _, c := range []struct {
		h   uint32
		off int64
		ok  bool
	}{{5, 1, false}, {5, 2, false}, {5, 7, true}, {21, 3, true}, {6, 4, true}} {
		_, ok := h.at(c.h, c.off)
		if ok != c.ok {
			t.Fatalf("slot of %d at %d: %v", c.h, c.off, ok)
		}
	}
	off, _, ok := h.peek(5)
	assertEqual(t, ok && off == 7, true)
	h.remove(5, 7)
	h.remove(21, 3)
	_, _, ok = h.peek(5)
	assertEqual(t, ok, false)
	off, _, ok = h.peek(6)
	assertEqual(t, ok && off == 4, true)
	assertEqual(t, h.n, 1)
}
