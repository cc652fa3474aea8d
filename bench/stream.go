package bench

import (
	"context"
	"io"
	"net"
)

// streamImpl is one streaming RPC implementation under test: a server with a
// bidirectional echo stream (every message it receives it sends back, and it
// ends the stream cleanly once the caller has closed its side) and a client
// that opens such streams.
type streamImpl interface {
	// serve starts serving the echo stream on l and returns at once; the
	// closer stops the server, closes l and waits for the goroutines serve
	// started.
	serve(l net.Listener) (io.Closer, error)
	// newOpener returns a client of the server at addr. The open func is
	// safe for concurrent use; the closer releases the client's
	// connections once every stream it opened has ended.
	newOpener(addr string) (streamOpenFunc, io.Closer, error)
}

// streamOpenFunc opens one bidirectional echo stream, which lives until ctx
// ends or the stream is closed.
type streamOpenFunc func(ctx context.Context) (streamEcho, error)

// streamEcho is the client's end of one open echo stream. One goroutine may
// send while another receives; two may not send (or receive) at once.
type streamEcho interface {
	// send writes one message, blocking while flow control holds it back.
	send(payload []byte) error
	// recv returns the next echoed message, which the caller owns, or io.EOF
	// once the server has ended the stream cleanly.
	recv() ([]byte, error)
	// closeSend closes the sending side: the server ends the stream after
	// echoing what it has received.
	closeSend() error
	// close releases the stream, canceling it if it is still open. It is
	// idempotent, and every stream is closed, whatever recv returned.
	close()
}

// streamImpls holds every streaming implementation by name.
var streamImpls = newRegistry[streamImpl]("stream implementation")

// StreamImpls returns the names of the streaming implementations in their
// default order: grpc first, micro last.
func StreamImpls() []string { return streamImpls.names() }

// StreamAbout returns a one-line description of the streaming
// implementation name, or "".
func StreamAbout(name string) string { return streamImpls.about(name) }
