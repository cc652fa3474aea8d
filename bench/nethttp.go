package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
)

// nethttpImpl is stock net/http: a handler that echoes the body of a POST
// and a client that posts raw bytes, HTTP/1.1 with keep-alive. It is what
// any HTTP/1.1 RPC built on net/http pays at least.
type nethttpImpl struct{}

func init() {
	benchImpls.register("nethttp", 40, "stock net/http HTTP/1.1 server and client POSTing raw bytes", nethttpImpl{})
}

func (nethttpImpl) serve(l net.Listener) (io.Closer, error) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var buf bytes.Buffer
		if r.ContentLength > 0 {
			buf.Grow(int(r.ContentLength))
		}
		if _, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, rawMaxFrame)); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
		w.Write(buf.Bytes())
	})
	return benchServeHTTP(l, h, benchHTTP1()), nil
}

func (nethttpImpl) newCaller(addr string) (benchCallFunc, io.Closer, error) {
	hc := benchHTTPClient()
	url := "http://" + addr + "/echo"
	call := func(ctx context.Context, payload []byte) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(payload))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Content-Type", "application/octet-stream")
		rsp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		defer rsp.Body.Close()
		if rsp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("bench: nethttp: %s", rsp.Status)
		}
		var buf bytes.Buffer
		if rsp.ContentLength > 0 {
			buf.Grow(int(rsp.ContentLength))
		}
		if _, err := buf.ReadFrom(rsp.Body); err != nil {
			return nil, err
		}
		return buf.Bytes(), nil
	}
	return call, benchCloserFunc(func() error {
		hc.CloseIdleConnections()
		return nil
	}), nil
}
