package upstream

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

// keyFile writes key as PKCS #8 PEM and returns its path.
func keyFile(t *testing.T, key crypto.Signer) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPrivateKeyJWT(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	as := oauthtest.New(oauthtest.Options{})
	if err := as.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer as.Close()
	as.AddClient(oauthtest.Client{ID: "rsa-app", PublicKey: rsaKey.Public(), Scopes: []string{"IDENTITY"}})
	as.AddClient(oauthtest.Client{ID: "ec-app", PublicKey: ecKey.Public(), Scopes: []string{"IDENTITY"}})

	client := func(id string, key crypto.Signer, alg string, now func() time.Time) *Client {
		c, err := New(Config{TokenURL: as.TokenURL(), ClientID: id, AuthMethod: PrivateKeyJWT,
			PrivateKeyFile: keyFile(t, key), JWTAlg: alg, KeyID: "k1", Now: now})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx := context.Background()
	for _, tt := range []struct {
		name, id string
		key      crypto.Signer
		alg      string
	}{
		{"RS256", "rsa-app", rsaKey, ""},
		{"PS256", "rsa-app", rsaKey, "PS256"},
		{"ES256", "ec-app", ecKey, ""},
	} {
		tok, err := client(tt.id, tt.key, tt.alg, nil).Fetch(ctx, []string{"IDENTITY"})
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if is, ok := as.Lookup(tok.AccessToken); !ok || is.AuthMethod != "private_key_jwt" || is.ClientID != tt.id {
			t.Errorf("%s: issued %+v", tt.name, is)
		}
		if as.LastForm().Get("client_id") != tt.id || as.LastForm().Has("client_secret") {
			t.Errorf("%s: form %v", tt.name, as.LastForm())
		}
	}

	refused := func(name string, err error) {
		t.Helper()
		var ue *Error
		if !errors.As(err, &ue) || ue.Code != "invalid_client" || ue.Temporary {
			t.Errorf("%s: %v, want invalid_client", name, err)
		}
	}
	_, err = client("ec-app", otherKey, "", nil).Fetch(ctx, nil)
	refused("wrong key", err)
	past := func() time.Time { return time.Now().Add(-10 * time.Minute) }
	_, err = client("ec-app", ecKey, "", past).Fetch(ctx, nil)
	refused("expired assertion", err)

	// A replayed assertion is refused the second time.
	c := client("ec-app", ecKey, "", nil)
	a, err := c.assertion()
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {"ec-app"},
		"client_assertion_type": {assertionType}, "client_assertion": {a}}
	for i, want := range []int{200, 401} {
		resp, err := http.Post(as.TokenURL(), "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("assertion use %d: status %d, want %d", i+1, resp.StatusCode, want)
		}
	}

	// A configured algorithm that does not fit the key fails before any request.
	before := as.TokenRequests()
	_, err = client("ec-app", ecKey, "RS256", nil).Fetch(ctx, nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonNoSecret || as.TokenRequests() != before {
		t.Errorf("ES key with RS256: %v, want a local key error and no request", err)
	}
}
