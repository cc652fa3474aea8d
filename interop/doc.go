// Package interop proves that micro's RPC speaks the Connect protocol: its
// tests, and nothing else, make calls between micro and connect-go
// (connectrpc.com/connect) in both directions, with JSON and binary protobuf,
// error codes and details, deadlines, gzip and metadata.
//
// It is a module of its own so that the core module need not require
// connect-go or google.golang.org/protobuf. Run it with
//
//	cd interop && go test -race ./...
package interop
