package server

import (
	"context"
	"testing"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// BenchmarkServer compares, on one mTLS server and client connection backed
// by a real Redis: GetToken served from the in-process cache, GetToken served
// from Redis after an in-process miss, and grpc.health.v1.Health/Check, the
// floor set by gRPC over TLS on loopback.
//
//	go test -run '^$' -bench BenchmarkServer -benchmem -count 5 ./broker/server/
func BenchmarkServer(b *testing.B) {
	rs := redistest.Start(b)
	h := newHarness(b, func(c *config.Config) {
		c.Log.Level = "info"
		withRedis("", rs.Addr())(c)
	})
	conn := h.conn(nil, payments)
	tb := pb.NewTokenBrokerClient(conn)
	hc := healthpb.NewHealthClient(conn)
	ctx := context.Background()
	getReq := &pb.GetTokenRequest{Credential: "identity"}
	healthReq := &healthpb.HealthCheckRequest{}
	if _, err := tb.GetToken(ctx, getReq); err != nil { // warm the cache
		b.Fatal(err)
	}

	calls := map[string]func() error{
		"GetToken": func() error { _, err := tb.GetToken(ctx, getReq); return err },
		"GetTokenFromRedis": func() error {
			h.srv.broker.EvictLocal()
			_, err := tb.GetToken(ctx, getReq)
			return err
		},
		"Health": func() error { _, err := hc.Check(ctx, healthReq); return err },
	}
	for _, name := range []string{"GetToken", "GetTokenFromRedis", "Health"} {
		call := calls[name]
		b.Run(name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := call(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := call(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
	if n := h.as.TokenRequests(); n != 1 {
		b.Errorf("token requests = %d, want 1 (every GetToken after the first is a cache hit)", n)
	}
}
