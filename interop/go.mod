module github.com/micro-kit/micro/interop

go 1.24.0

require (
	connectrpc.com/connect v1.19.1
	github.com/micro-kit/micro v0.0.0
	google.golang.org/protobuf v1.36.12
)

require golang.org/x/sync v0.19.0 // indirect

replace github.com/micro-kit/micro => ../
