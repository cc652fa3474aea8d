module github.com/micro-kit/micro/bench

go 1.24.0

require (
	connectrpc.com/connect v1.19.1
	github.com/micro-kit/micro v0.0.0
	go.etcd.io/bbolt v1.4.3
	google.golang.org/grpc v1.80.0
	google.golang.org/protobuf v1.36.12
)

require (
	golang.org/x/net v0.50.0 // indirect
	golang.org/x/sync v0.19.0 // indirect
	golang.org/x/sys v0.41.0 // indirect
	golang.org/x/text v0.34.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260120221211-b8f7ae30c516 // indirect
)

replace github.com/micro-kit/micro => ../
