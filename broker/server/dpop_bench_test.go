package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// BenchmarkDPoP compares, on one mTLS server and connection with the
// production logging, audit trail and rate limit (benchConfig), a cached
// GetToken of a bearer credential with a cached GetToken of a DPoP
// credential that carries a fresh proof, per algorithm: what a proof per
// request costs the broker (signing, the proof.issued audit line, the
// response).
//
// Most of a proof's cost is the signature and go-jose's JWS encoding (about
// a hundred allocations with EdDSA, two hundred with ES256); EdDSA costs less
// CPU than ES256, and RSA (BenchmarkProof in broker/dpop) far more: prefer
// EdDSA where the bank accepts it, and avoid RSA for busy credentials. A
// bearer GetToken allocates nothing more when dpop is unset.
//
//	go test -run '^$' -bench BenchmarkDPoP -benchmem -count 3 ./broker/server/
func BenchmarkDPoP(b *testing.B) {
	keys := map[string]crypto.Signer{}
	if k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err == nil {
		keys["ES256"] = k
	}
	if _, k, err := ed25519.GenerateKey(rand.Reader); err == nil {
		keys["EdDSA"] = k
	}
	dir := b.TempDir()
	prod := benchConfig(b)
	h := newHarness(b, func(c *config.Config) {
		prod(c)
		for _, alg := range []string{"ES256", "EdDSA"} {
			der, _ := x509.MarshalPKCS8PrivateKey(keys[alg])
			path := filepath.Join(dir, alg+".pem")
			if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
				b.Fatal(err)
			}
			d := c.Credentials[0]
			d.Name, d.ClientID, d.DPoP = "dpop-"+alg, "broker-dpop", &config.DPoP{KeyFile: path, Alg: alg}
			c.Credentials = append(c.Credentials, d)
		}
	})
	h.as.AddClient(oauthtest.Client{ID: "broker-dpop", Secret: h.secret, Scopes: []string{"IDENTITY", "IDENTITY_READ"}, DPoP: true})
	tb := pb.NewTokenBrokerClient(h.conn(nil, payments))
	ctx := context.Background()
	dp := &pb.DPoPRequest{Method: "GET", Url: "https://api.bank.example/v1/accounts/7?page=2"}
	reqs := map[string]*pb.GetTokenRequest{
		"Bearer":     {Credential: "identity"},
		"DPoP/ES256": {Credential: "dpop-ES256", Dpop: dp},
		"DPoP/EdDSA": {Credential: "dpop-EdDSA", Dpop: dp},
	}
	for _, name := range []string{"Bearer", "DPoP/ES256", "DPoP/EdDSA"} {
		req := reqs[name]
		if _, err := tb.GetToken(ctx, req); err != nil { // cached from here on
			b.Fatal(err)
		}
		fetches := h.as.TokenRequests()
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			cpu0 := cpuTime(b)
			defer func() { b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op") }()
			for b.Loop() {
				resp, err := tb.GetToken(ctx, req)
				if err != nil || (req.Dpop != nil) != (resp.GetDpopProof() != "") {
					b.Fatal(err)
				}
			}
		})
		if n := h.as.TokenRequests() - fetches; n != 0 {
			b.Errorf("%s: %d token requests, want 0 (served from the cache)", name, n)
		}
	}
}
