package micro

import (
	"context"
	"errors"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// RegisterStore serves st on s as the endpoints Store.Read, Store.ReadMany,
// Store.Write, Store.Delete and Store.List, so that devices and services
// can share one store through [NewRemoteStore]. Like any endpoint, they take JSON (or
// another registered codec) and can be called with curl:
//
//	POST /Store/Read   {"key":"a","prefix":true,"limit":10,"offset":0,"database":"","table":""}
//	                 → {"records":[{"key":"a1","value":"<base64>","metadata":{},"expiry":0}]}
//	POST /Store/ReadMany {"keys":["a","b"],"database":"","table":""}
//	                 → {"records":[{"key":"a","value":"<base64>"},null]}
//	POST /Store/Write  {"record":{"key":"a","value":"<base64>"},"ttl":0,"database":"","table":""}
//	POST /Store/Delete {"key":"a","database":"","table":""}
//	POST /Store/List   {"prefix":"a","suffix":"","limit":0,"offset":0,"database":"","table":""}
//	                 → {"keys":["a1"]}
//
// A missing key is not_found for Read, and null in ReadMany's records; a
// damaged record is data_loss. ReadMany takes at most 1,000 keys a call and
// answers with at most 32 MiB of keys, values and metadata (more as JSON,
// where values are base64); past that it is resource_exhausted. Durations (ttl,
// expiry) are in nanoseconds; a Write's ttl, when not zero, overrides its
// record's expiry, and a negative one writes a record that has already
// expired. The caller keeps ownership of st.
func RegisterStore(s *Server, st Store) error {
	if st == nil {
		return errors.New("micro: RegisterStore: store is nil")
	}
	return RegisterHandler(s, &storeHandler{store: st, maxReply: storeManyWireBytes}, HandlerName("Store"))
}

// RemoteStore is a [Store] served by another node through [RegisterStore],
// found by the service name it registered under and called with a
// [Client], so the client's balancing and retries apply. Make it with
// [NewRemoteStore]; it is safe for concurrent use.
type RemoteStore struct {
	client  *Client
	service string
	opts    []CallOption
	closed  atomic.Bool
	now     func() time.Time // turns WriteExpiry into a TTL
}

// NewRemoteStore returns a store that calls the store service registers,
// through client, with opts on every call (WithAddress skips discovery,
// RequestTimeout bounds each call). The caller keeps ownership of client.
func NewRemoteStore(client *Client, service string, opts ...CallOption) *RemoteStore {
	return &RemoteStore{client: client, service: service, opts: opts, now: time.Now}
}

// Read calls Store.Read.
func (s *RemoteStore) Read(ctx context.Context, key string, opts ...ReadOption) ([]*Record, error) {
	q, exact, err := storeReadQuery(key, opts)
	if err != nil {
		return nil, err
	}
	if exact && !utf8.ValidString(key) { // JSON would mangle it; it cannot have been written
		return nil, storeNotFound(key)
	}
	req := &storeReadRequest{Key: key, Prefix: q.isPrefix, Suffix: q.isSuffix, Limit: q.limit, Offset: q.offset,
		Database: q.db, Table: q.table}
	var rsp storeReadResponse
	if err := s.call(ctx, "Store.Read", req, &rsp); err != nil {
		return nil, err
	}
	if rsp.Records == nil {
		rsp.Records = []*Record{}
	}
	return rsp.Records, nil
}

// ReadMany calls Store.ReadMany for the keys (see [ReadMany]): once, or
// once per 1,000 keys or 512 KiB of them; a part whose reply the server
// finds too large (resource_exhausted) is asked again in halves. A server
// too old to have Store.ReadMany (unimplemented) is asked with one Read a
// key instead.
func (s *RemoteStore) ReadMany(ctx context.Context, keys []string, opts ...ReadOption) ([]*Record, error) {
	q, err := storeManyQuery(keys, opts)
	if err != nil {
		return nil, err
	}
	if err := s.ready(ctx); err != nil {
		return nil, err
	}
	out := make([]*Record, len(keys))
	// Keys that are not UTF-8 cannot have been written, and JSON would
	// mangle them: they are not sent.
	var send []string
	var at []int
	for i, k := range keys {
		if utf8.ValidString(k) {
			send, at = append(send, k), append(at, i)
		}
	}
	recs := make([]*Record, 0, len(send))
	for from := 0; from < len(send); {
		to, size := from, 0
		for to < len(send) && to-from < storeManyWireKeys && (to == from || size+len(send[to]) <= storeManyWireKeyBytes) {
			size += len(send[to])
			to++
		}
		part, err := s.readManyPart(ctx, q, send[from:to])
		if from == 0 && CodeOf(err) == CodeUnimplemented {
			recs, err = storeReadEach(ctx, s, send, opts)
			if err != nil {
				return nil, err
			}
			break
		}
		if err != nil {
			return nil, err
		}
		recs = append(recs, part...)
		from = to
	}
	for j, r := range recs {
		out[at[j]] = r
	}
	return out, nil
}

// readManyPart makes one Store.ReadMany call for keys, or, if the server
// finds its reply too large, one for each half.
func (s *RemoteStore) readManyPart(ctx context.Context, q storeQuery, keys []string) ([]*Record, error) {
	var rsp storeReadResponse
	err := s.call(ctx, "Store.ReadMany", &storeReadManyRequest{Keys: keys, Database: q.db, Table: q.table}, &rsp)
	if CodeOf(err) == CodeResourceExhausted && len(keys) > 1 {
		first, err := s.readManyPart(ctx, q, keys[:len(keys)/2])
		if err != nil {
			return nil, err
		}
		second, err := s.readManyPart(ctx, q, keys[len(keys)/2:])
		if err != nil {
			return nil, err
		}
		return append(first, second...), nil
	}
	if err != nil {
		return nil, err
	}
	if len(rsp.Records) != len(keys) {
		return nil, Errorf(CodeInternal, "micro: store: ReadMany of %d keys answered with %d records", len(keys), len(rsp.Records))
	}
	for j, r := range rsp.Records {
		if r != nil && r.Key != keys[j] {
			return nil, Errorf(CodeInternal, "micro: store: ReadMany answered %q for %q", r.Key, keys[j])
		}
	}
	return rsp.Records, nil
}

// Write calls Store.Write. An expiry is sent as a time to live, so it means
// the same whatever the server's clock says.
func (s *RemoteStore) Write(ctx context.Context, r *Record, opts ...WriteOption) error {
	o, err := storeWriteOpts(r, opts)
	if err != nil {
		return err
	}
	rec := *r
	rec.Expiry = 0
	req := &storeWriteRequest{Record: &rec, TTL: int64(storeTTL(r, &o, s.now())), Database: o.db, Table: o.table}
	return s.call(ctx, "Store.Write", req, &struct{}{})
}

// Delete calls Store.Delete.
func (s *RemoteStore) Delete(ctx context.Context, key string, opts ...DeleteOption) error {
	q, err := storeDeleteQuery(key, opts)
	if err != nil {
		return err
	}
	return s.call(ctx, "Store.Delete", &storeDeleteRequest{Key: key, Database: q.db, Table: q.table}, &struct{}{})
}

// List calls Store.List.
func (s *RemoteStore) List(ctx context.Context, opts ...ListOption) ([]string, error) {
	q, err := storeListQuery(opts)
	if err != nil {
		return nil, err
	}
	req := &storeListRequest{Prefix: q.prefix, Suffix: q.suffix, Limit: q.limit, Offset: q.offset, Database: q.db, Table: q.table}
	var rsp storeListResponse
	if err := s.call(ctx, "Store.List", req, &rsp); err != nil {
		return nil, err
	}
	if rsp.Keys == nil {
		rsp.Keys = []string{}
	}
	return rsp.Keys, nil
}

// Close makes the store refuse further calls; the client stays open.
func (s *RemoteStore) Close() error {
	s.closed.Store(true)
	return nil
}

// ready says whether a call can be made: the store open, the context not
// ended (the client may send a call whose context has ended).
func (s *RemoteStore) ready(ctx context.Context) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return AsError(err)
	}
	return nil
}

func (s *RemoteStore) call(ctx context.Context, endpoint string, req, rsp any) error {
	if err := s.ready(ctx); err != nil {
		return err
	}
	err := s.client.Call(ctx, s.service, endpoint, req, rsp, s.opts...)
	if err == nil {
		return nil
	}
	e := AsError(err)
	switch {
	case e.Code == CodeNotFound: // the server's answer: no such key
		return &Error{Code: CodeNotFound, Message: e.Message, Meta: e.Meta, cause: ErrNotFound}
	case errors.Is(err, ErrNotFound):
		// The service was not found, which is not a missing key: keep the
		// code and text but not the chain, so errors.Is(err, ErrNotFound)
		// means only the latter.
		return &Error{Code: e.code(), Message: e.Message, Details: e.Details, Meta: e.Meta}
	}
	return err
}

// storeHandler serves a Store over RPC.
type storeHandler struct {
	store    Store
	maxReply int // bytes of keys, values and metadata in a ReadMany reply
}

type storeReadRequest struct {
	Key      string `json:"key"`
	Prefix   bool   `json:"prefix,omitempty"`
	Suffix   bool   `json:"suffix,omitempty"`
	Limit    int    `json:"limit,omitempty"`
	Offset   int    `json:"offset,omitempty"`
	Database string `json:"database,omitempty"`
	Table    string `json:"table,omitempty"`
}

type storeReadResponse struct {
	Records []*Record `json:"records"`
}

type storeReadManyRequest struct {
	Keys     []string `json:"keys"`
	Database string   `json:"database,omitempty"`
	Table    string   `json:"table,omitempty"`
}

type storeWriteRequest struct {
	Record   *Record `json:"record"`
	TTL      int64   `json:"ttl,omitempty"` // nanoseconds; overrides Record.Expiry unless 0
	Database string  `json:"database,omitempty"`
	Table    string  `json:"table,omitempty"`
}

type storeDeleteRequest struct {
	Key      string `json:"key"`
	Database string `json:"database,omitempty"`
	Table    string `json:"table,omitempty"`
}

type storeListRequest struct {
	Prefix   string `json:"prefix,omitempty"`
	Suffix   string `json:"suffix,omitempty"`
	Limit    int    `json:"limit,omitempty"`
	Offset   int    `json:"offset,omitempty"`
	Database string `json:"database,omitempty"`
	Table    string `json:"table,omitempty"`
}

type storeListResponse struct {
	Keys []string `json:"keys"`
}

// Read serves Store.Read.
func (h *storeHandler) Read(ctx context.Context, req *storeReadRequest, rsp *storeReadResponse) error {
	opts := []ReadOption{ReadLimit(req.Limit), ReadOffset(req.Offset), ReadFrom(req.Database, req.Table)}
	if req.Prefix {
		opts = append(opts, ReadPrefix())
	}
	if req.Suffix {
		opts = append(opts, ReadSuffix())
	}
	recs, err := h.store.Read(ctx, req.Key, opts...)
	rsp.Records = recs
	return storeWireError(err)
}

const (
	// storeManyWireKeys bounds the keys of one Store.ReadMany call;
	// RemoteStore.ReadMany splits a longer list.
	storeManyWireKeys = 1000
	// storeManyWireKeyBytes is the most key bytes RemoteStore.ReadMany puts
	// in one call (as JSON, at most six times as many: under the server's
	// default 4 MiB request limit).
	storeManyWireKeyBytes = 512 << 10
	// storeManyWireBytes bounds the keys, values and metadata of one
	// Store.ReadMany reply, a key asked for twice counting twice, so that a
	// short request cannot make a long reply.
	storeManyWireBytes = 32 << 20
)

// ReadMany serves Store.ReadMany: records aligned with the keys, null
// where there is none. Each key is read once, however often it is asked
// for. More than 1,000 keys is invalid_argument; a reply over 32 MiB is
// resource_exhausted.
func (h *storeHandler) ReadMany(ctx context.Context, req *storeReadManyRequest, rsp *storeReadResponse) error {
	if len(req.Keys) > storeManyWireKeys {
		return Errorf(CodeInvalidArgument, "micro: store: ReadMany of %d keys: at most %d a call", len(req.Keys), storeManyWireKeys)
	}
	at := make(map[string]int, len(req.Keys))
	var distinct []string
	for _, k := range req.Keys {
		if _, ok := at[k]; !ok {
			at[k] = len(distinct)
			distinct = append(distinct, k)
		}
	}
	recs, err := ReadMany(ctx, h.store, distinct, ReadFrom(req.Database, req.Table))
	if err != nil {
		return storeWireError(err)
	}
	rsp.Records = make([]*Record, len(req.Keys))
	size := 0
	for i, k := range req.Keys {
		r := recs[at[k]]
		if r == nil {
			continue
		}
		size += len(r.Key) + len(r.Value)
		for mk, mv := range r.Metadata {
			size += len(mk) + len(mv)
		}
		if size > h.maxReply {
			return Errorf(CodeResourceExhausted, "micro: store: ReadMany's reply would pass %d bytes: ask for fewer keys a call", h.maxReply)
		}
		rsp.Records[i] = r
	}
	return nil
}

// Write serves Store.Write.
func (h *storeHandler) Write(ctx context.Context, req *storeWriteRequest, rsp *struct{}) error {
	if req.Record == nil {
		return Errorf(CodeInvalidArgument, "micro: store: no record to write")
	}
	opts := []WriteOption{WriteTo(req.Database, req.Table)}
	if req.TTL != 0 {
		opts = append(opts, WriteTTL(time.Duration(req.TTL)))
	}
	return storeWireError(h.store.Write(ctx, req.Record, opts...))
}

// Delete serves Store.Delete.
func (h *storeHandler) Delete(ctx context.Context, req *storeDeleteRequest, rsp *struct{}) error {
	return storeWireError(h.store.Delete(ctx, req.Key, DeleteFrom(req.Database, req.Table)))
}

// List serves Store.List.
func (h *storeHandler) List(ctx context.Context, req *storeListRequest, rsp *storeListResponse) error {
	keys, err := h.store.List(ctx, ListPrefix(req.Prefix), ListSuffix(req.Suffix), ListLimit(req.Limit),
		ListOffset(req.Offset), ListFrom(req.Database, req.Table))
	rsp.Keys = keys
	return storeWireError(err)
}

// storeWireError gives a store's error the code a caller across the wire
// needs: not_found for a missing key, data_loss for a damaged record (its
// path stays on this side), unavailable for a closed store.
func storeWireError(err error) error {
	var corrupt *StoreCorruptError
	switch {
	case err == nil:
		return nil
	case CodeOf(err) == CodeNotFound:
		return err
	case errors.Is(err, ErrNotFound):
		return &Error{Code: CodeNotFound, Message: err.Error(), cause: err}
	case errors.As(err, &corrupt):
		return &Error{Code: CodeDataLoss, Message: "micro: store: a stored record is damaged", cause: err}
	case errors.Is(err, ErrClosed):
		return &Error{Code: CodeUnavailable, Message: err.Error(), cause: err}
	}
	return err
}
