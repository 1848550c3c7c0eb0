package broker

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"

	"github.com/tokenbroker/tokenbroker/store"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// BenchmarkGetTokenSource measures Broker.GetToken (no gRPC) by where the
// token comes from: the in-process cache, or Redis after an in-process miss
// (the path of a replica whose cache is cold while another replica fetched).
//
//	go test -run '^$' -bench BenchmarkGetTokenSource -benchmem ./broker/
func BenchmarkGetTokenSource(b *testing.B) {
	rs := redistest.Start(b)
	key := make([]byte, store.KeySize)
	_, _ = rand.Read(key)
	sealer, err := store.NewSealer(key)
	if err != nil {
		b.Fatal(err)
	}
	rst, err := store.NewRedis(store.RedisOptions{Client: store.NewRedisClient(store.RedisConfig{Addrs: []string{rs.Addr()}}),
		Prefix: "bench:", Sealer: sealer})
	if err != nil {
		b.Fatal(err)
	}
	defer rst.Close()
	br, as, _ := newTestBroker(b, rst, time.Hour)

	ctx := context.Background()
	req := Request{Credential: "identity"}
	if _, err := br.GetToken(ctx, testCaller, req); err != nil {
		b.Fatal(err)
	}
	b.Run("memory", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if is, err := br.GetToken(ctx, testCaller, req); err != nil || is.Source != SourceMemory {
				b.Fatalf("source %q, err %v", is.Source, err)
			}
		}
	})
	b.Run("redis", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			br.EvictLocal()
			if is, err := br.GetToken(ctx, testCaller, req); err != nil || is.Source != "redis" {
				b.Fatalf("source %q, err %v", is.Source, err)
			}
		}
	})
	if n := as.TokenRequests(); n != 1 {
		b.Errorf("token requests = %d, want 1", n)
	}
}

// BenchmarkGetTokenRateLimited is the in-process hit with the per-caller rate
// limit on (as by default), from many goroutines and callers at once.
//
//	go test -run '^$' -bench BenchmarkGetTokenRateLimited -benchmem ./broker/
func BenchmarkGetTokenRateLimited(b *testing.B) {
	br, _, _ := newTestBroker(b, nil, time.Hour)
	br.requests = limiters{rate: 1e9, burst: 1e9} // on, but never refusing
	ctx := context.Background()
	callers := make([]policy.Identity, 64)
	for i := range callers {
		callers[i] = policy.Identity(fmt.Sprintf("spiffe://bank.internal/ns/kyc/sa/w%d", i))
	}
	if _, err := br.GetToken(ctx, callers[0], Request{Credential: "identity"}); err != nil {
		b.Fatal(err)
	}
	var n atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		caller := callers[n.Add(1)%int64(len(callers))]
		for pb.Next() {
			if _, err := br.GetToken(ctx, caller, Request{Credential: "identity"}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
