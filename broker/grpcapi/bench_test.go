package grpcapi

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
)

// BenchmarkServiceGetToken is the broker's own work on a cached GetToken,
// without the transport: the adapter (caller identity, request ID, response)
// and the core (rate limit, policy, cache, audit record to a file) as the
// gRPC server calls them. BenchmarkServer in package server puts it beside
// what gRPC over TLS costs around it.
//
//	go test -run '^$' -bench BenchmarkServiceGetToken -benchmem ./broker/grpcapi/
func BenchmarkServiceGetToken(b *testing.B) {
	svc, _, _ := newTestService(b)
	req := &pb.GetTokenRequest{Credential: "identity"}
	caller := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}})
	for _, bc := range []struct {
		name string
		ctx  context.Context
	}{
		{"made-up-id", caller},
		{"caller-id", metadata.NewIncomingContext(caller, metadata.Pairs(RequestIDHeader, "c0ffee-42"))},
	} {
		want, err := svc.GetToken(bc.ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				resp, err := svc.GetToken(bc.ctx, req)
				if err != nil || resp.GetToken().GetAccessToken() != want.GetToken().GetAccessToken() {
					b.Fatalf("GetToken = %v, %v", resp, err)
				}
			}
		})
	}
}

// newTestService returns a Service on a broker with one credential, served
// by an oauthtest authorization server on loopback, the per-caller rate
// limit on (never refusing) and the audit trail in the file at path.
func newTestService(b testing.TB) (svc *Service, trail *audit.Logger, path string) {
	b.Helper()
	as := oauthtest.New(oauthtest.Options{ExpiresIn: time.Hour})
	as.AddClient(oauthtest.Client{ID: "app", Secret: "bench-secret", Scopes: []string{"IDENTITY"}})
	if err := as.Start("127.0.0.1:0"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = as.Close() })
	dir := b.TempDir()
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte("bench-secret"), 0o600); err != nil {
		b.Fatal(err)
	}
	up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secret})
	if err != nil {
		b.Fatal(err)
	}
	callers, err := policy.Compile([]string{"spiffe://bank.internal/ns/kyc/*"})
	if err != nil {
		b.Fatal(err)
	}
	path = filepath.Join(dir, "audit.log")
	trail, err = audit.New(audit.Config{Path: path})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = trail.Close() })
	core, err := broker.New(broker.Options{Store: store.NewMemory(nil), Audit: trail, RateLimit: 1e9, RateBurst: 1e9,
		RefreshInterval: -1, Credentials: []broker.Credential{{Name: "identity", Scopes: []string{"IDENTITY"},
			MinTTL: 30 * time.Second, Callers: callers, Fetcher: up, TokenURL: as.TokenURL(), ClientID: "app"}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(core.Close)
	return NewService(core, nil, false), trail, path
}
