package dpop

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/tokenbroker/tokenbroker/broker/pemkey"
)

// The algorithms a Key signs with.
const (
	ES256 = "ES256"
	EdDSA = "EdDSA"
	RS256 = "RS256"
	PS256 = "PS256"
)

// Algs lists the algorithms a Key may use, for messages and allow-lists.
var Algs = []string{ES256, EdDSA, RS256, PS256}

// MinRSABits is the smallest RSA key accepted.
const MinRSABits = 2048

// Key is a DPoP private key: it signs proofs and shows only its public part.
type Key struct {
	alg    jose.SignatureAlgorithm
	signer jose.Signer // header: typ dpop+jwt, alg, jwk
	jwk    jose.JSONWebKey
	jkt    string
}

// ParseKey parses a PEM private key (PKCS #8, SEC 1 or PKCS #1) for alg:
// ES256 for an EC P-256 key, EdDSA for Ed25519, RS256 or PS256 for RSA of at
// least MinRSABits. An empty alg picks ES256, EdDSA or RS256 by key type.
// The error never holds the key's content.
func ParseKey(pemBytes []byte, alg string) (*Key, error) {
	key, err := pemkey.Parse(pemBytes)
	if err != nil {
		return nil, err
	}
	var pub crypto.PublicKey
	var a jose.SignatureAlgorithm
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() || (alg != "" && alg != ES256) {
			return nil, fmt.Errorf("alg %q does not fit an EC %s key (EC P-256: ES256)", alg, k.Curve.Params().Name)
		}
		a, pub = jose.ES256, k.Public()
	case ed25519.PrivateKey:
		if alg != "" && alg != EdDSA {
			return nil, fmt.Errorf("alg %q does not fit an Ed25519 key (EdDSA)", alg)
		}
		a, pub = jose.EdDSA, k.Public()
	case *rsa.PrivateKey:
		if k.N.BitLen() < MinRSABits {
			return nil, fmt.Errorf("RSA key of %d bits; at least %d are required", k.N.BitLen(), MinRSABits)
		}
		switch alg {
		case "", RS256:
			a = jose.RS256
		case PS256:
			a = jose.PS256
		default:
			return nil, fmt.Errorf("alg %q does not fit an RSA key (RS256 or PS256)", alg)
		}
		pub = k.Public()
	default:
		return nil, fmt.Errorf("unsupported key type %T (EC P-256, Ed25519 or RSA)", key)
	}
	return newKey(key, pub, a)
}

// LoadKey reads and parses the PEM key in path (see ParseKey).
func LoadKey(path, alg string) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dpop key: %w", err)
	}
	k, err := ParseKey(b, alg)
	if err != nil {
		return nil, fmt.Errorf("dpop key %s: %w", path, err)
	}
	return k, nil
}

func newKey(priv any, pub crypto.PublicKey, alg jose.SignatureAlgorithm) (*Key, error) {
	jwk := jose.JSONWebKey{Key: pub}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("thumbprint: %w", err)
	}
	opts := (&jose.SignerOptions{EmbedJWK: true}).WithType("dpop+jwt")
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: priv}, opts)
	if err != nil {
		return nil, fmt.Errorf("signer: %w", err)
	}
	return &Key{alg: alg, signer: s, jwk: jwk, jkt: base64.RawURLEncoding.EncodeToString(tp)}, nil
}

// Thumbprint is the RFC 7638 SHA-256 thumbprint of the public key,
// base64url without padding: the jkt a bound token's cnf claim carries.
func (k *Key) Thumbprint() string { return k.jkt }

// Alg is the JWS algorithm the key signs with.
func (k *Key) Alg() string { return string(k.alg) }

// PublicJWK is the public key as a JWK.
func (k *Key) PublicJWK() jose.JSONWebKey { return k.jwk }

// Request is what a proof is for.
type Request struct {
	// Method is the HTTP method (htm), e.g. "POST".
	Method string
	// URL is the HTTP URL; its query and fragment are left out of htu.
	URL string
	// Nonce, when set, is the server-provided nonce.
	Nonce string
	// AccessToken, when set, is the token the request carries; the proof
	// binds to it with ath.
	AccessToken string
}

// claims is a proof's payload (RFC 9449 §4.2).
type claims struct {
	JTI   string `json:"jti"`
	HTM   string `json:"htm"`
	HTU   string `json:"htu"`
	IAT   int64  `json:"iat"`
	ATH   string `json:"ath,omitempty"`
	Nonce string `json:"nonce,omitempty"`
}

// Proof signs a new proof for r at now. It returns the compact JWS and its
// jti (for the audit trail). r must be valid (see CheckMethod, HTU,
// CheckNonce); an invalid one is an error.
func (k *Key) Proof(r Request, now time.Time) (proof, jti string, err error) {
	if err := CheckMethod(r.Method); err != nil {
		return "", "", err
	}
	htu, err := HTU(r.URL)
	if err != nil {
		return "", "", err
	}
	if r.Nonce != "" {
		if err := CheckNonce(r.Nonce); err != nil {
			return "", "", err
		}
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return "", "", errors.New("dpop: crypto/rand failed")
	}
	c := claims{JTI: base64.RawURLEncoding.EncodeToString(id[:]), HTM: r.Method, HTU: htu, IAT: now.Unix(), Nonce: r.Nonce}
	if r.AccessToken != "" {
		c.ATH = ATH(r.AccessToken)
	}
	payload, err := json.Marshal(c)
	if err != nil {
		return "", "", fmt.Errorf("dpop: encode claims: %w", err)
	}
	jws, err := k.signer.Sign(payload)
	if err != nil {
		return "", "", fmt.Errorf("dpop: sign: %w", err)
	}
	s, err := jws.CompactSerialize()
	if err != nil {
		return "", "", fmt.Errorf("dpop: serialize: %w", err)
	}
	return s, c.JTI, nil
}

// ATH is the ath claim for token: base64url (no padding) of its SHA-256.
func ATH(token string) string {
	h := sha256.Sum256([]byte(token))
	return base64.RawURLEncoding.EncodeToString(h[:])
}
