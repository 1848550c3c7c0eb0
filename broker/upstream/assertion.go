package upstream

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tokenbroker/tokenbroker/broker/pemkey"
)

// PrivateKeyJWT authenticates with a signed JWT assertion (RFC 7523 §2.2).
const PrivateKeyJWT AuthMethod = "private_key_jwt"

// assertionType is the client_assertion_type of RFC 7523.
const assertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// assertionLifetime is how long an assertion is valid: short, as RFC 7523
// asks, and under the five minutes servers commonly allow.
const assertionLifetime = 2 * time.Minute

// loadSigningKey reads a PEM private key (PKCS #8, PKCS #1 or SEC 1). The
// error names the file, never its content.
func loadSigningKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read private key: %w", err)
	}
	key, err := pemkey.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("private key %s: %w", path, err)
	}
	return key, nil
}

// signingAlg picks the JWS algorithm: the configured one, which must fit the
// key, or RS256 for RSA and ES256 for P-256 keys.
func signingAlg(key crypto.Signer, configured string) (jose.SignatureAlgorithm, error) {
	switch k := key.(type) {
	case *rsa.PrivateKey:
		switch configured {
		case "", "RS256":
			return jose.RS256, nil
		case "PS256":
			return jose.PS256, nil
		}
	case *ecdsa.PrivateKey:
		if k.Curve == elliptic.P256() && (configured == "" || configured == "ES256") {
			return jose.ES256, nil
		}
	}
	return "", fmt.Errorf("algorithm %q does not fit a %T key (RSA: RS256, PS256; EC P-256: ES256)", configured, key)
}

// assertion signs a client assertion: iss = sub = client ID, aud, a random
// jti, iat now, exp shortly after.
func (c *Client) assertion() (string, error) {
	key, err := loadSigningKey(c.cfg.PrivateKeyFile)
	if err != nil {
		return "", err
	}
	alg, err := signingAlg(key, c.cfg.JWTAlg)
	if err != nil {
		return "", err
	}
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if c.cfg.KeyID != "" {
		opts = opts.WithHeader("kid", c.cfg.KeyID)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		return "", fmt.Errorf("signer: %w", err)
	}
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", errors.New("jti: crypto/rand failed")
	}
	aud := c.cfg.JWTAudience
	if aud == "" {
		aud = c.cfg.TokenURL
	}
	now := c.cfg.Now()
	return jwt.Signed(signer).Claims(jwt.Claims{
		Issuer:   c.cfg.ClientID,
		Subject:  c.cfg.ClientID,
		Audience: jwt.Audience{aud},
		ID:       base64.RawURLEncoding.EncodeToString(jti[:]),
		IssuedAt: jwt.NewNumericDate(now),
		Expiry:   jwt.NewNumericDate(now.Add(assertionLifetime)),
	}).Serialize()
}
