package broker

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

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
