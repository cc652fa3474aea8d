package interop_test

import (
	"net"
	"testing"

	"github.com/micro-kit/micro"
)

func TestZZLeak(t *testing.T) {
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go micro.NewServer().Serve(l)
}
