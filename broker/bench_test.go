package broker

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"

	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// BenchmarkGetTokenSource measures Broker.GetToken (no gRPC) by where the
// token comes from: the in-process cache, or Redis after an in-process miss
// (the path of a replica whose cache is cold while another replica fetched).
//
//	go test -run '^$' -bench BenchmarkGetTokenSource -benchmem ./broker/
func BenchmarkGetTokenSource(b *testing.B) {
	rst := newRedisStore(b, redistest.Start(b).Addr(), "bench:", nil, nil)
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

// BenchmarkScaleCore is the in-process cache hit (no gRPC) with the rate
// limit on, as the deployment grows: 1, 100 and 10,000 credentials, each with
// a cached token, called by 1 and 1,000 distinct callers, round robin. The
// store is a real Redis, so the heap the process holds per cached token
// (reported as B/cached-token) is the in-process cache's alone.
//
// With 10,000 credentials each hit touches data of its own credential (policy,
// cache slot, token, counters) that is rarely in the CPU cache, so a hit costs
// more than with one; each credential keeps a pointer to its cache slot, so
// that no map lookup grows with the number of credentials.
//
//	go test -run '^$' -bench BenchmarkScaleCore -benchmem ./broker/
func BenchmarkScaleCore(b *testing.B) {
	rs := redistest.Start(b)
	for _, creds := range []int{1, 100, 10_000} {
		b.Run(fmt.Sprintf("credentials=%d", creds), func(b *testing.B) {
			br, names := newScaleBroker(b, rs.Addr(), creds)
			callers := make([]policy.Identity, 1000)
			for i := range callers {
				callers[i] = policy.Identity(fmt.Sprintf("spiffe://bank.internal/ns/kyc/sa/w%04d", i))
			}
			reqs := make([]Request, creds)
			for i, n := range names {
				reqs[i] = Request{Credential: n}
			}
			ctx := context.Background()
			warm := func() {
				for _, r := range reqs {
					if _, err := br.GetToken(ctx, callers[0], r); err != nil {
						b.Fatal(err)
					}
				}
			}
			warm()
			cached := liveHeap()
			br.EvictLocal()
			perToken := float64(cached-liveHeap()) / float64(creds)
			warm() // from Redis
			for _, n := range []int{1, 1000} {
				b.Run(fmt.Sprintf("callers=%d", n), func(b *testing.B) {
					b.ReportAllocs()
					i := 0
					for b.Loop() {
						is, err := br.GetToken(ctx, callers[i%n], reqs[i%creds])
						if err != nil || is.Source != SourceMemory {
							b.Fatalf("source %q, err %v", is.Source, err)
						}
						i++
					}
					b.ReportMetric(perToken, "B/cached-token")
				})
			}
		})
	}
}

// newScaleBroker returns a Broker on a Redis store at addr with creds
// credentials (identity-00000, …) at one oauthtest server, the rate limit on
// but never refusing, and no background refresher.
func newScaleBroker(b *testing.B, addr string, creds int) (*Broker, []string) {
	b.Helper()
	as := startOAuth(b, time.Hour, nil)
	secretFile, callers := testClientParts(b)
	rst := newRedisStore(b, addr, fmt.Sprintf("scale%d:", creds), nil, nil)
	var cs []Credential
	var names []string
	for i := range creds {
		up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile})
		if err != nil {
			b.Fatal(err)
		}
		name := fmt.Sprintf("identity-%05d", i)
		names = append(names, name)
		cs = append(cs, Credential{Name: name, Scopes: []string{"IDENTITY"}, MinTTL: 30 * time.Second,
			Callers: callers, Fetcher: up, TokenURL: as.TokenURL(), ClientID: "app"})
	}
	br, err := New(Options{Store: rst, RefreshInterval: -1, Credentials: cs})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(br.Close)
	br.requests = limiters{rate: 1e9, burst: 1e9} // on, but never refusing
	return br, names
}

func liveHeap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
