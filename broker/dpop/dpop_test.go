package dpop_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

// writeKey writes a new PEM private key of kind (ec, ed25519, rsa, rsa1024, p384) to dir.
func writeKey(t testing.TB, dir, name, kind string) string {
	t.Helper()
	var k crypto.Signer
	var err error
	switch kind {
	case "ec":
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "p384":
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "ed25519":
		_, k, err = ed25519.GenerateKey(rand.Reader)
	case "rsa":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case "rsa1024":
		k, err = rsa.GenerateKey(rand.Reader, 1024)
	}
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProofVerifiesPerAlg(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ kind, alg, want string }{
		{"ec", "ES256", "ES256"}, {"ec", "", "ES256"}, {"ed25519", "EdDSA", "EdDSA"},
		{"rsa", "RS256", "RS256"}, {"rsa", "PS256", "PS256"}, {"rsa", "", "RS256"},
	} {
		t.Run(tc.kind+"/"+tc.alg, func(t *testing.T) {
			k, err := dpop.LoadKey(writeKey(t, dir, tc.kind+tc.alg, tc.kind), tc.alg)
			if err != nil {
				t.Fatal(err)
			}
			if k.Alg() != tc.want {
				t.Errorf("Alg() = %s, want %s", k.Alg(), tc.want)
			}
			var v oauthtest.ProofVerifier
			proof, jti, err := k.Proof(dpop.Request{Method: "GET", URL: "https://API.bank.example:443/v1/accounts?id=7#x",
				AccessToken: "tok-1", Nonce: "n-1"}, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			v.SetRequireNonce(false)
			r, _ := http.NewRequest("GET", "https://api.bank.example/v1/accounts?id=7", nil)
			r.Header.Set("DPoP", proof)
			p, err := v.Verify(r, "https://api.bank.example/v1/accounts", "tok-1")
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if p.JKT != k.Thumbprint() || p.JTI != jti || p.HTU != "https://api.bank.example/v1/accounts" || p.Nonce != "n-1" {
				t.Errorf("proof = %+v; want jkt %s, jti %s, htu without query, nonce n-1", p, k.Thumbprint(), jti)
			}
		})
	}
}

func TestParseKeyRefuses(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ kind, alg, want string }{
		{"rsa1024", "RS256", "at least 2048"},
		{"p384", "", "does not fit an EC P-384 key"},
		{"ec", "RS256", "does not fit"},
		{"ed25519", "ES256", "does not fit an Ed25519 key"},
		{"rsa", "ES256", "does not fit an RSA key"},
	} {
		p := writeKey(t, dir, tc.kind+tc.alg, tc.kind)
		_, err := dpop.LoadKey(p, tc.alg)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("LoadKey(%s, %q) = %v; want an error naming the file and %q", tc.kind, tc.alg, err, tc.want)
		}
	}
	b, _ := os.ReadFile(writeKey(t, dir, "leak", "ec"))
	_, err := dpop.ParseKey(b[:len(b)-40], "")
	if err == nil || strings.Contains(err.Error(), string(b[40:80])) {
		t.Errorf("a truncated key: %v; want an error without the key's content", err)
	}
}

func TestEveryProofIsNew(t *testing.T) {
	k, err := dpop.LoadKey(writeKey(t, t.TempDir(), "k", "ec"), "ES256")
	if err != nil {
		t.Fatal(err)
	}
	var v oauthtest.ProofVerifier
	seen := map[string]bool{}
	for range 50 {
		proof, jti, err := k.Proof(dpop.Request{Method: "POST", URL: "http://127.0.0.1:1/token"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if seen[jti] {
			t.Fatalf("jti %s issued twice", jti)
		}
		seen[jti] = true
		r, _ := http.NewRequest("POST", "http://127.0.0.1:1/token", nil)
		r.Header.Set("DPoP", proof)
		if _, err := v.Verify(r, "http://127.0.0.1:1/token", ""); err != nil {
			t.Fatalf("Verify: %v", err)
		}
		if _, err := v.Verify(r, "http://127.0.0.1:1/token", ""); !errors.Is(err, oauthtest.ErrInvalidProof) {
			t.Fatalf("replayed proof: %v, want invalid_dpop_proof", err)
		}
	}
}

// TestVerifierRefuses makes the resource server's and the token endpoint's
// checks fail one at a time (RFC 9449 §4.3).
func TestVerifierRefuses(t *testing.T) {
	dir := t.TempDir()
	k, _ := dpop.LoadKey(writeKey(t, dir, "k", "ec"), "")
	now := time.Now()
	const u = "https://api.example/v1/x"
	good := dpop.Request{Method: "GET", URL: u, AccessToken: "tok"}
	for _, tc := range []struct {
		name  string
		req   dpop.Request
		at    time.Time
		token string
		mut   func(r *http.Request)
	}{
		{name: "other method", req: dpop.Request{Method: "POST", URL: u, AccessToken: "tok"}, at: now, token: "tok"},
		{name: "other url", req: dpop.Request{Method: "GET", URL: "https://api.example/v1/y", AccessToken: "tok"}, at: now, token: "tok"},
		{name: "other host", req: dpop.Request{Method: "GET", URL: "https://evil.example/v1/x", AccessToken: "tok"}, at: now, token: "tok"},
		{name: "old iat", req: good, at: now.Add(-5 * time.Minute), token: "tok"},
		{name: "future iat", req: good, at: now.Add(5 * time.Minute), token: "tok"},
		{name: "other token", req: good, at: now, token: "tok2"},
		{name: "no ath", req: dpop.Request{Method: "GET", URL: u}, at: now, token: "tok"},
		{name: "two headers", req: good, at: now, token: "tok", mut: func(r *http.Request) { r.Header.Add("DPoP", r.Header.Get("DPoP")) }},
		{name: "no header", req: good, at: now, token: "tok", mut: func(r *http.Request) { r.Header.Del("DPoP") }},
		{name: "tampered", req: good, at: now, token: "tok", mut: func(r *http.Request) {
			p := strings.Split(r.Header.Get("DPoP"), ".")
			r.Header.Set("DPoP", p[0]+"."+p[1][:len(p[1])-2]+"AA."+p[2])
		}},
		{name: "hmac", req: good, at: now, token: "tok", mut: func(r *http.Request) {
			// {"alg":"HS256","typ":"dpop+jwt"} . {} . sig
			r.Header.Set("DPoP", "eyJhbGciOiJIUzI1NiIsInR5cCI6ImRwb3Arand0In0.e30.c2ln")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proof, _, err := k.Proof(tc.req, tc.at)
			if err != nil {
				t.Fatal(err)
			}
			r, _ := http.NewRequest("GET", u, nil)
			r.Header.Set("DPoP", proof)
			if tc.mut != nil {
				tc.mut(r)
			}
			var v oauthtest.ProofVerifier
			if _, err := v.Verify(r, u, tc.token); !errors.Is(err, oauthtest.ErrInvalidProof) {
				t.Errorf("Verify = %v, want invalid_dpop_proof", err)
			}
		})
	}
	t.Run("nonce", func(t *testing.T) {
		var v oauthtest.ProofVerifier
		v.SetRequireNonce(true)
		for _, n := range []string{"", "stale"} {
			proof, _, _ := k.Proof(dpop.Request{Method: "GET", URL: u, Nonce: n}, now)
			r, _ := http.NewRequest("GET", u, nil)
			r.Header.Set("DPoP", proof)
			if _, err := v.Verify(r, u, ""); !errors.Is(err, oauthtest.ErrUseNonce) {
				t.Errorf("nonce %q: %v, want use_dpop_nonce", n, err)
			}
		}
		proof, _, _ := k.Proof(dpop.Request{Method: "GET", URL: u, Nonce: v.Nonce()}, now)
		r, _ := http.NewRequest("GET", u, nil)
		r.Header.Set("DPoP", proof)
		if _, err := v.Verify(r, u, ""); err != nil {
			t.Errorf("current nonce: %v", err)
		}
	})
}

func TestRequestChecks(t *testing.T) {
	for _, tc := range []struct{ url, want string }{
		{"https://API.Example:443/a/b?q=1#f", "https://api.example/a/b"},
		{"http://127.0.0.1:80", "http://127.0.0.1/"},
		{"http://[::1]:8080/x", "http://[::1]:8080/x"},
		{"https://h.example:8443/%7Euser", "https://h.example:8443/%7Euser"},
	} {
		got, err := dpop.HTU(tc.url)
		if err != nil || got != tc.want {
			t.Errorf("HTU(%q) = %q, %v; want %q", tc.url, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "/relative", "ftp://h/x", "https://user:pw@h/x", "mailto:a@b", "https://" + strings.Repeat("a", 5000)} {
		if _, err := dpop.HTU(bad); err == nil {
			t.Errorf("HTU(%q) accepted", bad)
		}
	}
	for _, bad := range []string{"", "GE T", "GET\n", strings.Repeat("X", 40)} {
		if dpop.CheckMethod(bad) == nil {
			t.Errorf("CheckMethod(%q) accepted", bad)
		}
	}
	for _, bad := range []string{"", `a"b`, `a\b`, "a b", "é"} {
		if dpop.CheckNonce(bad) == nil {
			t.Errorf("CheckNonce(%q) accepted", bad)
		}
	}
}

func TestKeyringKeepsEarlierKeys(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "dpop.pem")
	first := writeKey(t, dir, "a", "ec")
	second := writeKey(t, dir, "b", "ed25519")
	copyFile := func(from string) {
		b, _ := os.ReadFile(from)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(first)
	r := dpop.NewKeyring(path, "")
	k1, err := r.Current()
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := r.Current(); again != k1 {
		t.Error("an unchanged file gave another Key")
	}
	copyFile(second)
	k2, err := r.Current()
	if err != nil || k2.Thumbprint() == k1.Thumbprint() || k2.Alg() != "EdDSA" {
		t.Fatalf("after the file changed: %v, %v", k2, err)
	}
	if k, ok := r.Key(k1.Thumbprint()); !ok || k != k1 {
		t.Error("the earlier key is gone; tokens bound to it would get no proofs")
	}
	// Another keyring (a replica) that never read the first key cannot sign for it.
	other := dpop.NewKeyring(path, "")
	if _, ok := other.Key(k1.Thumbprint()); ok {
		t.Error("a keyring found a key it never read")
	}
	if k, ok := other.Key(k2.Thumbprint()); !ok || k.Thumbprint() != k2.Thumbprint() {
		t.Error("a keyring did not read the file for the current key")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Current(); err == nil {
		t.Error("Current with the file gone: no error")
	}
}

// BenchmarkProof is the cost of one proof per algorithm, signing included.
//
//	go test -run '^$' -bench BenchmarkProof -benchmem ./broker/dpop/
func BenchmarkProof(b *testing.B) {
	dir := b.TempDir()
	for _, tc := range []struct{ kind, alg string }{{"ec", "ES256"}, {"ed25519", "EdDSA"}, {"rsa", "PS256"}} {
		k, err := dpop.LoadKey(writeKeyB(b, dir, tc.kind), tc.alg)
		if err != nil {
			b.Fatal(err)
		}
		r := dpop.Request{Method: "GET", URL: "https://api.bank.example/v1/accounts/7?page=2", AccessToken: strings.Repeat("t", 800)}
		b.Run(tc.alg, func(b *testing.B) {
			b.ReportAllocs()
			now := time.Now()
			for b.Loop() {
				if _, _, err := k.Proof(r, now); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func writeKeyB(b *testing.B, dir, kind string) string { return writeKey(b, dir, kind+".pem", kind) }
