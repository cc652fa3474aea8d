module github.com/micro-kit/micro/interop

go 1.25

require (
	connectrpc.com/connect v1.19.1
	github.com/hashicorp/mdns v1.0.7
	github.com/micro-kit/micro v0.0.0
	github.com/miekg/dns v1.1.72
	google.golang.org/protobuf v1.36.12
)

require (
	golang.org/x/mod v0.31.0 // indirect
	golang.org/x/net v0.50.0 // indirect
	golang.org/x/sync v0.19.0 // indirect
	golang.org/x/sys v0.41.0 // indirect
	golang.org/x/tools v0.40.0 // indirect
)

replace github.com/micro-kit/micro => ../
