package micro

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
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
