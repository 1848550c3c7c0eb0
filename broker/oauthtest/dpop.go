package oauthtest

import (
	"crypto"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// ProofAlgs are the JWS algorithms a ProofVerifier accepts: asymmetric
// only, never "none" or an HMAC (RFC 9449 §4.3 point 5).
var ProofAlgs = []jose.SignatureAlgorithm{jose.ES256, jose.EdDSA, jose.RS256, jose.PS256}

// Errors a ProofVerifier reports. ErrUseNonce asks the client to try again
// with the server's nonce; the others are invalid_dpop_proof.
var (
	ErrUseNonce     = errors.New("use_dpop_nonce")
	ErrInvalidProof = errors.New("invalid_dpop_proof")
)

// ProofVerifier checks DPoP proofs as RFC 9449 §4.3 says: exactly one
// DPoP header holding one JWS; typ dpop+jwt; an allowed asymmetric alg; a
// public jwk in the header that verifies the signature; htm and htu (query
// and fragment ignored) of the request; iat within Window; a jti not seen
// before; ath of the presented token; and, when nonces are on, the
// server's current nonce. It is safe for concurrent use.
type ProofVerifier struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Window is how far iat may be from now, either way; zero means 60s.
	Window time.Duration

	mu       sync.Mutex
	seen     map[string]time.Time // jti → when it may be forgotten
	nonceOn  bool
	nonce    string
	verified int64
}

// Proof is what a verified proof says.
type Proof struct {
	// JKT is the RFC 7638 thumbprint of the proof's key, base64url.
	JKT string
	// JTI, HTM, HTU and IAT are the proof's claims.
	JTI, HTM, HTU string
	IAT           time.Time
	// Nonce is the nonce the proof carried, if any.
	Nonce string
}

// SetRequireNonce turns server-provided nonces on or off. On, a proof
// must carry the current nonce (Nonce), and RotateNonce makes a new one.
func (v *ProofVerifier) SetRequireNonce(on bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.nonceOn = on
	if on && v.nonce == "" {
		v.nonce = base64.RawURLEncoding.EncodeToString(randomBytes(18))
	}
}

// Nonce is the current nonce, "" while nonces are off.
func (v *ProofVerifier) Nonce() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.nonceOn {
		return ""
	}
	return v.nonce
}

// RotateNonce replaces the current nonce and returns the new one ("" while
// nonces are off).
func (v *ProofVerifier) RotateNonce() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.nonceOn {
		return ""
	}
	v.nonce = base64.RawURLEncoding.EncodeToString(randomBytes(18))
	return v.nonce
}

// Verified counts the proofs that passed.
func (v *ProofVerifier) Verified() int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.verified
}

type proofClaims struct {
	JTI   string   `json:"jti"`
	HTM   string   `json:"htm"`
	HTU   string   `json:"htu"`
	IAT   *float64 `json:"iat"`
	ATH   string   `json:"ath"`
	Nonce string   `json:"nonce"`
}

// Verify checks the DPoP proof of r, made for htu (the URL the server
// serves r at, without query) and, when token is set, for that access
// token. It returns ErrUseNonce or an error wrapping ErrInvalidProof.
func (v *ProofVerifier) Verify(r *http.Request, htu, token string) (Proof, error) {
	bad := func(why string) (Proof, error) { return Proof{}, errors.Join(ErrInvalidProof, errors.New(why)) }
	hs := r.Header.Values("DPoP")
	if len(hs) != 1 {
		return bad("want exactly one DPoP header")
	}
	jws, err := jose.ParseSigned(hs[0], ProofAlgs)
	if err != nil || len(jws.Signatures) != 1 {
		return bad("not a JWS signed with " + algNames())
	}
	h := jws.Signatures[0].Protected
	if typ, _ := h.ExtraHeaders[jose.HeaderType].(string); typ != "dpop+jwt" {
		return bad("typ is not dpop+jwt")
	}
	jwk := h.JSONWebKey
	if jwk == nil || !jwk.Valid() || !jwk.IsPublic() {
		return bad("no public jwk in the header")
	}
	payload, err := jws.Verify(jwk.Key)
	if err != nil {
		return bad("the signature does not verify with the header's jwk")
	}
	var c proofClaims
	if err := json.Unmarshal(payload, &c); err != nil || c.JTI == "" || c.HTM == "" || c.HTU == "" || c.IAT == nil {
		return bad("jti, htm, htu and iat are required")
	}
	if c.HTM != r.Method {
		return bad("htm is not the request method")
	}
	if !sameHTU(c.HTU, htu) {
		return bad("htu is not the request URL")
	}
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	window := v.Window
	if window <= 0 {
		window = time.Minute
	}
	iat := time.Unix(int64(*c.IAT), 0)
	if d := now().Sub(iat); d > window || d < -window {
		return bad("iat is outside the accepted window")
	}
	if token != "" {
		sum := sha256.Sum256([]byte(token))
		if subtle.ConstantTimeCompare([]byte(c.ATH), []byte(base64.RawURLEncoding.EncodeToString(sum[:]))) != 1 {
			return bad("ath is not the hash of the access token")
		}
	}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return bad("no thumbprint for the jwk")
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.nonceOn && c.Nonce != v.nonce {
		return Proof{}, ErrUseNonce
	}
	if v.seen == nil {
		v.seen = map[string]time.Time{}
	}
	t := now()
	for id, until := range v.seen {
		if t.After(until) {
			delete(v.seen, id)
		}
	}
	if _, replayed := v.seen[c.JTI]; replayed {
		return bad("jti was used before")
	}
	v.seen[c.JTI] = iat.Add(2 * window)
	v.verified++
	return Proof{JKT: base64.RawURLEncoding.EncodeToString(tp), JTI: c.JTI, HTM: c.HTM, HTU: c.HTU, IAT: iat, Nonce: c.Nonce}, nil
}

// sameHTU compares a proof's htu with the URL of the request, ignoring
// query and fragment, scheme and host compared without case and default
// ports dropped (RFC 9449 §4.3 point 9, RFC 3986 §6.2.2 and §6.2.3).
func sameHTU(claim, want string) bool {
	a, err1 := url.Parse(claim)
	b, err2 := url.Parse(want)
	if err1 != nil || err2 != nil {
		return false
	}
	norm := func(u *url.URL) string {
		host := strings.ToLower(u.Host)
		scheme := strings.ToLower(u.Scheme)
		host = strings.TrimSuffix(host, map[string]string{"https": ":443", "http": ":80"}[scheme])
		p := u.EscapedPath()
		if p == "" {
			p = "/"
		}
		return scheme + "://" + host + p
	}
	return a.User == nil && a.Host != "" && norm(a) == norm(b)
}

func algNames() string {
	var s []string
	for _, a := range ProofAlgs {
		s = append(s, string(a))
	}
	return strings.Join(s, ", ")
}
