package upstream

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

// dpopKeyFile writes a new EC P-256 (or Ed25519) DPoP key.
func dpopKeyFile(t *testing.T, ed bool) string {
	t.Helper()
	if ed {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return keyFile(t, k)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return keyFile(t, k)
}

// TestDPoPAllAuthMethods: every client authentication method carries a
// proof, and the token comes back bound to the broker's key.
func TestDPoPAllAuthMethods(t *testing.T) {
	clientCA, err := devpki.NewCA("client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	as, bankCA := mtlsServer(t, clientCA)
	jwtKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	as.AddClient(oauthtest.Client{ID: "app", Secret: testSecret, Scopes: []string{"IDENTITY"}, DPoP: true,
		PublicKey: jwtKey.Public(), TLSSubject: "broker.bank.internal"})
	pair, err := clientCA.Client(time.Hour, "broker.bank.internal")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cf, kf := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := pair.WriteFiles(cf, kf); err != nil {
		t.Fatal(err)
	}
	ring := dpop.NewKeyring(dpopKeyFile(t, false), "ES256")
	want, err := ring.Current()
	if err != nil {
		t.Fatal(err)
	}
	for _, cfg := range []Config{
		{AuthMethod: ClientSecretBasic, ClientSecretFile: secretFile(t, testSecret)},
		{AuthMethod: ClientSecretPost, ClientSecretFile: secretFile(t, testSecret)},
		{AuthMethod: PrivateKeyJWT, PrivateKeyFile: keyFile(t, jwtKey)},
		{AuthMethod: TLSClientAuth, TLSClientCertFile: cf, TLSClientKeyFile: kf},
	} {
		cfg.TokenURL, cfg.ClientID, cfg.TLSCAFile, cfg.DPoP = as.TokenURL(), "app", bankCA, ring
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		tok, err := c.Fetch(context.Background(), nil)
		if err != nil {
			t.Fatalf("%s: %v", cfg.AuthMethod, err)
		}
		is, ok := as.Lookup(tok.AccessToken)
		if !ok || is.AuthMethod != string(cfg.AuthMethod) || is.JKT != want.Thumbprint() || tok.JKT != want.Thumbprint() || tok.TokenType != "DPoP" {
			t.Errorf("%s: token %s bound to %q (issued %+v), want DPoP bound to %s", cfg.AuthMethod, tok.TokenType, tok.JKT, is, want.Thumbprint())
		}
	}
	// Without a proof, the server refuses a DPoP client.
	c, _ := New(Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile(t, testSecret), TLSCAFile: bankCA})
	_, err = c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Code != "invalid_dpop_proof" {
		t.Errorf("no proof: %v, want invalid_dpop_proof", err)
	}
}

// TestDPoPNonce: a use_dpop_nonce answer is tried again once, with its
// nonce; the newest nonce, from errors and successes alike, goes with the
// next request, so the next fetch needs one request.
func TestDPoPNonce(t *testing.T) {
	as := newServer(t)
	as.AddClient(oauthtest.Client{ID: "dpop-app", Secret: testSecret, Scopes: []string{"IDENTITY"}, DPoP: true})
	as.DPoP().SetRequireNonce(true)
	jwtKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	as.AddClient(oauthtest.Client{ID: "jwt-app", PublicKey: jwtKey.Public(), Scopes: []string{"IDENTITY"}, DPoP: true})
	for _, cfg := range []Config{
		{ClientID: "dpop-app", ClientSecretFile: secretFile(t, testSecret)},
		{ClientID: "jwt-app", AuthMethod: PrivateKeyJWT, PrivateKeyFile: keyFile(t, jwtKey)}, // a new assertion for the retry
	} {
		cfg.TokenURL, cfg.DPoP = as.TokenURL(), dpop.NewKeyring(dpopKeyFile(t, true), "EdDSA")
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		before := as.TokenRequests()
		if _, err := c.Fetch(context.Background(), nil); err != nil {
			t.Fatalf("%s: first fetch: %v", cfg.ClientID, err)
		}
		if n := as.TokenRequests() - before; n != 2 {
			t.Errorf("%s: first fetch took %d requests, want 2 (challenge, answer)", cfg.ClientID, n)
		}
		for i := range 3 { // each success rotated the nonce and sent the new one
			before = as.TokenRequests()
			if _, err := c.Fetch(context.Background(), nil); err != nil {
				t.Fatalf("fetch %d: %v", i, err)
			}
			if n := as.TokenRequests() - before; n != 1 {
				t.Errorf("%s: fetch %d took %d requests, want 1 (the newest nonce kept)", cfg.ClientID, i, n)
			}
		}
	}
	// A server that keeps asking is asked once more, not in a loop.
	c, _ := New(Config{TokenURL: as.TokenURL(), ClientID: "dpop-app", ClientSecretFile: secretFile(t, testSecret),
		DPoP: dpop.NewKeyring(dpopKeyFile(t, false), "")})
	as.SetFaults(oauthtest.Faults{ErrorCode: "use_dpop_nonce"})
	before := as.TokenRequests()
	_, err := c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Code != "use_dpop_nonce" || !ue.Temporary {
		t.Errorf("a server that always asks for a nonce: %v", err)
	}
	if n := as.TokenRequests() - before; n > 2 {
		t.Errorf("%d requests, want at most 2", n)
	}
}

// TestDPoPTokenTypeMustBeDPoP: a server that ignores the proof and issues a
// bearer token has not bound it; that answer is malformed.
func TestDPoPTokenTypeMustBeDPoP(t *testing.T) {
	as := newServer(t)
	as.AddClient(oauthtest.Client{ID: "dpop-app", Secret: testSecret, Scopes: []string{"IDENTITY"}, DPoP: true})
	c, _ := New(Config{TokenURL: as.TokenURL(), ClientID: "dpop-app", ClientSecretFile: secretFile(t, testSecret),
		DPoP: dpop.NewKeyring(dpopKeyFile(t, false), "")})
	as.SetFaults(oauthtest.Faults{TokenType: "Bearer"})
	_, err := c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonMalformed || !strings.Contains(err.Error(), "not DPoP") {
		t.Errorf("Bearer for a DPoP credential: %v, want malformed", err)
	}
}

// TestDPoPKeyRotation: a changed key file is used for the next token; a
// missing one fails the fetch as a missing secret does, naming no content.
func TestDPoPKeyRotation(t *testing.T) {
	as := newServer(t)
	as.AddClient(oauthtest.Client{ID: "dpop-app", Secret: testSecret, Scopes: []string{"IDENTITY"}, DPoP: true})
	path := filepath.Join(t.TempDir(), "dpop.pem")
	put := func(from string) {
		b, _ := os.ReadFile(from)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	put(dpopKeyFile(t, false))
	c, _ := New(Config{TokenURL: as.TokenURL(), ClientID: "dpop-app", ClientSecretFile: secretFile(t, testSecret),
		DPoP: dpop.NewKeyring(path, "")})
	t1, err := c.Fetch(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	put(dpopKeyFile(t, false))
	t2, err := c.Fetch(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if t1.JKT == t2.JKT {
		t.Error("the changed key file was not used for the next token")
	}
	_ = os.Remove(path)
	_, err = c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonNoSecret {
		t.Errorf("key file gone: %v, want no_secret", err)
	}
}
