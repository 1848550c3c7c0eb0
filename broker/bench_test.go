package broker

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
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
	as := oauthtest.New(oauthtest.Options{ExpiresIn: time.Hour})
	as.AddClient(oauthtest.Client{ID: "app", Secret: "bench-secret", Scopes: []string{"IDENTITY"}})
	if err := as.Start("127.0.0.1:0"); err != nil {
		b.Fatal(err)
	}
	defer as.Close()
	secretFile := filepath.Join(b.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("bench-secret"), 0o600); err != nil {
		b.Fatal(err)
	}
	up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile})
	if err != nil {
		b.Fatal(err)
	}
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
	callers, err := policy.Compile([]string{"spiffe://bank.internal/ns/kyc/*"})
	if err != nil {
		b.Fatal(err)
	}
	br, err := New(Options{Store: rst, Credentials: []Credential{{Name: "identity", Scopes: []string{"IDENTITY"},
		MinTTL: 30 * time.Second, Callers: callers, Fetcher: up, TokenURL: as.TokenURL(), ClientID: "app"}}})
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	defer rst.Close()

	ctx := context.Background()
	caller := policy.Identity("spiffe://bank.internal/ns/kyc/sa/worker")
	req := Request{Credential: "identity"}
	if _, err := br.GetToken(ctx, caller, req); err != nil {
		b.Fatal(err)
	}

	b.Run("memory", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if is, err := br.GetToken(ctx, caller, req); err != nil || is.Source != SourceMemory {
				b.Fatalf("source %q, err %v", is.Source, err)
			}
		}
	})
	b.Run("redis", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			br.EvictLocal()
			if is, err := br.GetToken(ctx, caller, req); err != nil || is.Source != "redis" {
				b.Fatalf("source %q, err %v", is.Source, err)
			}
		}
	})
	if n := as.TokenRequests(); n != 1 {
		b.Errorf("token requests = %d, want 1", n)
	}
}
