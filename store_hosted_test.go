package micro

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
)

func TestRemoteStoreErrorsAndRawCalls(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	backing := NewMemoryStore()
	defer backing.Close()
	svc := NewService(Name("store"), Address("127.0.0.1:0"), HandleSignal(false), Args())
	assertNoError(t, RegisterStore(svc.Server(), backing))
	if err := RegisterStore(svc.Server(), nil); err == nil {
		t.Fatal("a nil store registered")
	}
	assertNoError(t, svc.Start())
	defer svc.Close()

	// A missing service is not a missing key.
	_, err := NewRemoteStore(svc.Client(), "nothing", Retries(0)).Read(ctx, "k")
	if err == nil || errors.Is(err, ErrNotFound) || CodeOf(err) != CodeUnavailable {
		t.Fatalf("read from a missing service: %v (code %v)", err, CodeOf(err))
	}
	// A missing key is, with its code.
	rs := NewRemoteStore(svc.Client(), "", WithAddress(svc.Addr()))
	_, err = rs.Read(ctx, "k")
	if !errors.Is(err, ErrNotFound) || CodeOf(err) != CodeNotFound {
		t.Fatalf("missing key: %v", err)
	}

	// curl's view: JSON in, JSON out, base64 values.
	assertNoError(t, rs.Write(ctx, &Record{Key: "greeting", Value: []byte("hi"), Metadata: map[string]string{"a": "b"}}))
	post := func(path, body string) (int, string) {
		t.Helper()
		rsp, err := http.Post("http://"+svc.Addr()+path, "application/json", strings.NewReader(body))
		assertNoError(t, err)
		defer rsp.Body.Close()
		b, _ := io.ReadAll(rsp.Body)
		return rsp.StatusCode, string(b)
	}
	code, body := post("/Store/Read", `{"key":"gr","prefix":true}`)
	assertEqual(t, code, 200)
	var read struct {
		Records []*Record `json:"records"`
	}
	assertNoError(t, json.Unmarshal([]byte(body), &read))
	assertEqual(t, len(read.Records), 1)
	assertEqual(t, string(read.Records[0].Value), "hi")
	assertEqual(t, read.Records[0].Metadata["a"], "b")
	code, body = post("/Store/ReadMany", `{"keys":["nope","greeting"]}`)
	assertEqual(t, code, 200)
	if !strings.HasPrefix(body, `{"records":[null,{"key":"greeting","value":"aGk="`) {
		t.Fatalf("ReadMany: %s", body)
	}
	code, body = post("/Store/ReadMany", `{"keys":[]}`)
	assertEqual(t, code, 200)
	assertEqual(t, body, `{"records":[]}`)
	code, _ = post("/Store/ReadMany", `{"keys":[""]}`)
	assertEqual(t, code, 400)
	code, _ = post("/Store/Write", `{"record":{"key":"x","value":"aGk="},"table":"t"}`)
	assertEqual(t, code, 200)
	_, body = post("/Store/List", `{"table":"t"}`)
	assertEqual(t, body, `{"keys":["x"]}`)
	code, body = post("/Store/Read", `{"key":"nope"}`)
	assertEqual(t, code, 404)
	if !strings.Contains(body, `"not_found"`) {
		t.Fatalf("body %s", body)
	}
	code, _ = post("/Store/Write", `{}`)
	assertEqual(t, code, 400)
	code, _ = post("/Store/Write", `{"record":{"key":""}}`)
	assertEqual(t, code, 400)

	// A closed store behind the service is unavailable.
	backing.Close()
	_, err = rs.Read(ctx, "x")
	assertCode(t, err, CodeUnavailable)
}

// TestRemoteStoreReadManyLimits: a server reads a key asked for twice once,
// refuses more than 1,000 keys and a reply over its limit; a client splits
// a long list (by count, and by bytes to keep under the server's request
// limit), asks again in halves for a reply too large, and falls back to one
// Read a key on a server without Store.ReadMany. The server's limits are
// scaled down (1 MiB requests, 64 KiB replies) to keep the test small.
func TestRemoteStoreReadManyLimits(t *testing.T) {
	checkGoroutines(t)
	ctx := context.Background()
	backing := NewMemoryStore()
	defer backing.Close()
	const maxReply = 64 << 10
	big := make([]byte, 16<<10)
	assertNoError(t, backing.Write(ctx, &Record{Key: "big", Value: big}))
	assertNoError(t, backing.Write(ctx, &Record{Key: "small", Value: []byte("s")}))
	svc := NewService(Name("store"), Address("127.0.0.1:0"), HandleSignal(false), Args(), MaxBodySize(1<<20))
	assertNoError(t, RegisterHandler(svc.Server(), &storeHandler{store: backing, maxReply: maxReply}, HandlerName("Store")))
	assertNoError(t, svc.Start())
	defer svc.Close()
	rs := NewRemoteStore(svc.Client(), "", WithAddress(svc.Addr()))

	keys := []string{"big", "small", "big", "nope"}
	recs, err := rs.ReadMany(ctx, keys)
	assertNoError(t, err)
	assertEqual(t, len(recs[0].Value), len(big))
	assertEqual(t, len(recs[2].Value), len(big))
	assertEqual(t, string(recs[1].Value), "s")
	assertEqual(t, recs[3] == nil, true)

	// 640 KiB of one key asked for 40 times: the server refuses it whole,
	// and the client asks again in halves.
	recs, err = rs.ReadMany(ctx, slices.Repeat([]string{"big"}, 40))
	assertNoError(t, err)
	for _, r := range recs {
		assertEqual(t, len(r.Value), len(big))
	}
	// One record over the limit cannot be halved.
	assertNoError(t, backing.Write(ctx, &Record{Key: "huge", Value: make([]byte, maxReply+1)}))
	_, err = rs.ReadMany(ctx, []string{"huge"})
	assertCode(t, err, CodeResourceExhausted)

	// Long keys: 20 of 60 KB do not fit one 1 MiB request.
	var long []string
	for i := range 20 {
		k := fmt.Sprintf("%02d", i) + strings.Repeat("k", 60_000)
		long = append(long, k)
		assertNoError(t, backing.Write(ctx, &Record{Key: k, Value: []byte{byte(i)}}))
	}
	recs, err = rs.ReadMany(ctx, long)
	assertNoError(t, err)
	for i, r := range recs {
		if r == nil || r.Key != long[i] || r.Value[0] != byte(i) {
			t.Fatalf("long key %d: %v", i, r)
		}
	}

	// 2,500 keys go in three calls.
	many := slices.Repeat([]string{"small", "nope"}, 1250)
	recs, err = rs.ReadMany(ctx, many)
	assertNoError(t, err)
	for i, r := range recs {
		if (r != nil) != (i%2 == 0) {
			t.Fatalf("record %d: %v", i, r)
		}
	}
	var req storeReadManyRequest
	req.Keys = slices.Repeat([]string{"small"}, storeManyWireKeys+1)
	var rsp storeReadResponse
	assertCode(t, svc.Client().Call(ctx, "", "Store.ReadMany", &req, &rsp, WithAddress(svc.Addr())), CodeInvalidArgument)

	// A server that has only Store.Read.
	old := NewService(Name("old"), Address("127.0.0.1:0"), HandleSignal(false), Args())
	assertNoError(t, RegisterHandler(old.Server(), &testOldStore{&storeHandler{store: backing}}, HandlerName("Store")))
	assertNoError(t, old.Start())
	defer old.Close()
	recs, err = NewRemoteStore(old.Client(), "", WithAddress(old.Addr())).ReadMany(ctx, []string{"nope", "small"})
	assertNoError(t, err)
	assertEqual(t, recs[0] == nil && string(recs[1].Value) == "s", true)
}

// testOldStore serves Store.Read only, as a server from before ReadMany.
type testOldStore struct{ h *storeHandler }

func (o *testOldStore) Read(ctx context.Context, req *storeReadRequest, rsp *storeReadResponse) error {
	return o.h.Read(ctx, req, rsp)
}
