package server

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// benchConfig is the production shape for benchmarks: info logging, the audit
// trail in a file, and the per-caller rate limit on (high enough never to
// refuse, so its cost is measured and not its refusals), as is the
// per-connection rate of new streams.
func benchConfig(b *testing.B) func(*config.Config) {
	dir := b.TempDir()
	return func(c *config.Config) {
		c.Log.Level = "info"
		c.Audit.Path = filepath.Join(dir, "audit.log")
		c.RateLimit = &config.RateLimit{RequestsPerSecond: 1e9, Burst: 1e9}
		// One connection carries all the load: a client, not an attacker.
		c.Limits = config.Limits{NewStreamsPerSecond: 1e9, NewStreamsBurst: 1e9}
	}
}

// BenchmarkServer compares, on one mTLS server and client connection backed
// by a real Redis, with the audit trail and rate limit on: GetToken served
// from the in-process cache, served from Redis after an in-process miss, and
// cold (no valid token anywhere: a fetch from the oauthtest authorization
// server on loopback), and grpc.health.v1.Health/Check, the floor set by gRPC
// over TLS on loopback; and Floor, a test-only method that answers the same
// GetToken request with a pre-built response of the same bytes through the
// same server options and interceptors: what carrying the token costs
// without the broker's work.
//
//	go test -run '^$' -bench BenchmarkServer -benchmem -count 5 ./broker/server/
func BenchmarkServer(b *testing.B) {
	rs := redistest.Start(b)
	fb := newFloorBench(b, withRedis("", rs.Addr()))
	h, tb, ctx, getReq := fb.h, fb.tb, context.Background(), fb.getReq

	var coldCalls atomic.Int64 // b.Loop runs more iterations than the final b.N
	calls := map[string]func() error{
		"GetToken": fb.getToken,
		"GetTokenFromRedis": func() error {
			h.srv.broker.EvictLocal()
			_, err := tb.GetToken(ctx, getReq)
			return err
		},
		"GetTokenCold": func() error {
			// A token lifetime later, nothing cached is valid: the call
			// fetches (concurrent cold calls may share a fetch).
			h.clock.Add(tokenTTL)
			coldCalls.Add(1)
			_, err := tb.GetToken(ctx, getReq)
			return err
		},
		"Health": fb.health,
		"Floor":  fb.floor,
	}
	for _, name := range []string{"GetToken", "Floor", "GetTokenFromRedis", "GetTokenCold", "Health"} {
		call := calls[name]
		for _, mode := range []string{"serial", "parallel"} {
			fetches := h.as.TokenRequests()
			coldCalls.Store(0)
			ran := false // not when -bench filters this one out
			b.Run(name+"/"+mode, func(b *testing.B) {
				ran = true
				b.ReportAllocs()
				cpu0 := cpuTime(b)
				defer func() { b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op") }()
				if mode == "serial" {
					for b.Loop() {
						if err := call(); err != nil {
							b.Fatal(err)
						}
					}
					return
				}
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := call(); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
			fetched := h.as.TokenRequests() - fetches
			switch {
			case !ran:
			case name == "GetTokenCold" && mode == "serial" && fetched != coldCalls.Load():
				b.Errorf("%s/%s: %d token requests for %d calls, want one per call", name, mode, fetched, coldCalls.Load())
			case name == "GetTokenCold" && (fetched == 0 || fetched > coldCalls.Load()):
				b.Errorf("%s/%s: %d token requests for %d calls, want 1 to one per call", name, mode, fetched, coldCalls.Load())
			case name != "GetTokenCold" && fetched != 0:
				b.Errorf("%s/%s: %d token requests, want 0 (every call is served from a cache)", name, mode, fetched)
			}
		}
	}
}

// BenchmarkScale is the in-process cache hit over gRPC as the deployment
// grows: 1, 100 and 10,000 configured credentials, each with a cached token,
// called by 1 and 1,000 distinct caller identities (each on its own mTLS
// connection), round robin over both; Health/Check over the same connections
// shows what spreading calls over them costs the transport. (BenchmarkScaleCore
// in package broker measures the broker alone, and memory per cached token.)
//
//	go test -run '^$' -bench BenchmarkScale -benchmem ./broker/server/
func BenchmarkScale(b *testing.B) {
	for _, creds := range []int{1, 100, 10_000} {
		b.Run(fmt.Sprintf("credentials=%d", creds), func(b *testing.B) {
			h := newHarness(b, func(c *config.Config) {
				benchConfig(b)(c)
				base := c.Credentials[0]
				c.Credentials = c.Credentials[:0]
				for i := range creds {
					cr := base
					cr.Name = fmt.Sprintf("identity-%05d", i)
					c.Credentials = append(c.Credentials, cr)
				}
			})
			names := make([]string, creds)
			for i := range names {
				names[i] = fmt.Sprintf("identity-%05d", i)
			}
			warm(b, h, names)

			conns := make([]pb.TokenBrokerClient, 1000)
			health := make([]healthpb.HealthClient, 1000)
			for i := range conns {
				conn := h.conn(nil, fmt.Sprintf("spiffe://bank.internal/ns/kyc/sa/w%04d", i))
				conns[i], health[i] = pb.NewTokenBrokerClient(conn), healthpb.NewHealthClient(conn)
			}
			reqs := make([]*pb.GetTokenRequest, creds)
			for i, n := range names {
				reqs[i] = &pb.GetTokenRequest{Credential: n}
			}
			ctx := context.Background()
			healthReq := &healthpb.HealthCheckRequest{}
			for _, callers := range []int{1, 1000} {
				// Open every connection first, so handshakes are not measured.
				for _, c := range conns[:callers] {
					if _, err := c.GetToken(ctx, reqs[0]); err != nil {
						b.Fatal(err)
					}
				}
				fetches := h.as.TokenRequests()
				b.Run(fmt.Sprintf("callers=%d/GetToken", callers), func(b *testing.B) {
					b.ReportAllocs()
					i := 0
					for b.Loop() {
						if _, err := conns[i%callers].GetToken(ctx, reqs[i%creds]); err != nil {
							b.Fatal(err)
						}
						i++
					}
				})
				if n := h.as.TokenRequests() - fetches; n != 0 {
					b.Errorf("%d token requests while measuring hits, want 0", n)
				}
				// The transport's own cost of spreading calls over as many
				// connections, on the same server.
				b.Run(fmt.Sprintf("callers=%d/Health", callers), func(b *testing.B) {
					b.ReportAllocs()
					i := 0
					for b.Loop() {
						if _, err := health[i%callers].Check(ctx, healthReq); err != nil {
							b.Fatal(err)
						}
						i++
					}
				})
			}
		})
	}
}

// warm caches a token for each credential, 32 fetches at a time.
func warm(b *testing.B, h *harness, names []string) {
	b.Helper()
	c := pb.NewTokenBrokerClient(h.conn(nil, payments))
	ctx := context.Background()
	sem := make(chan struct{}, 32)
	errs := make(chan error, len(names))
	for _, n := range names {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			_, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: n})
			errs <- err
		}()
	}
	for range names {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	if n := h.as.TokenRequests(); n != int64(len(names)) {
		b.Fatalf("%d token requests to warm %d credentials", n, len(names))
	}
}
