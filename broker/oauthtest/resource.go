package oauthtest

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ResourceServer is a resource server test double for the tokens a Server
// issues. A DPoP-bound token must come as "Authorization: DPoP <token>"
// with a proof that passes a ProofVerifier (RFC 9449 §7.1) for this
// request and token, signed by the key the token is bound to: the proof
// key's RFC 7638 thumbprint must be the token's cnf.jkt. A bearer token
// comes as "Authorization: Bearer <token>". Anything else is answered 401
// with a WWW-Authenticate challenge, as RFC 9449 §7.1 and RFC 6750 §3 write
// them. It answers every path with 200 and a small JSON body.
type ResourceServer struct {
	as     *Server
	proofs ProofVerifier

	accepted, refused atomic.Int64

	mu      sync.Mutex
	reasons map[string]int // refusals by error code
	srv     *http.Server
	ln      net.Listener
}

// NewResourceServer returns a resource server that accepts the tokens as issues.
func NewResourceServer(as *Server) *ResourceServer {
	return &ResourceServer{as: as, proofs: ProofVerifier{Now: as.now}, reasons: map[string]int{}}
}

// DPoP is the verifier of the proofs the resource server receives: turn
// nonces on with its SetRequireNonce.
func (rs *ResourceServer) DPoP() *ProofVerifier { return &rs.proofs }

// Start serves on addr (e.g. "127.0.0.1:0") until Close.
func (rs *ResourceServer) Start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("oauthtest: listen: %w", err)
	}
	rs.ln = ln
	rs.srv = &http.Server{Handler: rs, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = rs.srv.Serve(ln) }()
	return nil
}

// URL is the server's base URL, once started.
func (rs *ResourceServer) URL() string { return "http://" + rs.ln.Addr().String() }

// Close stops the server.
func (rs *ResourceServer) Close() error {
	if rs.srv == nil {
		return nil
	}
	return rs.srv.Close()
}

// Accepted counts the requests served.
func (rs *ResourceServer) Accepted() int64 { return rs.accepted.Load() }

// Refused counts the requests refused.
func (rs *ResourceServer) Refused() int64 { return rs.refused.Load() }

// Refusals counts the refusals by error code (invalid_token,
// invalid_dpop_proof, use_dpop_nonce, or "" for a request without a token).
func (rs *ResourceServer) Refusals() map[string]int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	out := make(map[string]int, len(rs.reasons))
	for k, v := range rs.reasons {
		out[k] = v
	}
	return out
}

// ServeHTTP checks the request's token and proof.
func (rs *ResourceServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if n := rs.proofs.Nonce(); n != "" {
		w.Header().Set("DPoP-Nonce", n)
	}
	scheme, tok, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	is, known := rs.as.Lookup(tok)
	if known && !rs.as.now().Before(is.Expiry) {
		known = false
	}
	switch {
	case tok == "":
		rs.refuse(w, `DPoP algs="ES256 EdDSA RS256 PS256", Bearer`, "")
		return
	case strings.EqualFold(scheme, "Bearer"):
		if !known || is.JKT != "" { // a bound token without its proof is no token (RFC 9449 §7.2)
			rs.refuse(w, `Bearer error="invalid_token"`, "invalid_token")
			return
		}
	case strings.EqualFold(scheme, "DPoP"):
		if !known || is.JKT == "" {
			rs.refuse(w, `DPoP error="invalid_token", algs="ES256 EdDSA RS256 PS256"`, "invalid_token")
			return
		}
		p, err := rs.proofs.Verify(r, "http://"+r.Host+r.URL.EscapedPath(), tok)
		switch {
		case errors.Is(err, ErrUseNonce):
			rs.refuse(w, `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`, "use_dpop_nonce")
			return
		case err != nil:
			rs.refuse(w, `DPoP error="invalid_dpop_proof", algs="ES256 EdDSA RS256 PS256"`, "invalid_dpop_proof")
			return
		case subtle.ConstantTimeCompare([]byte(p.JKT), []byte(is.JKT)) != 1:
			// A proof from another key: the token is not this key's.
			rs.refuse(w, `DPoP error="invalid_token", error_description="the proof key is not the token's key"`, "invalid_token")
			return
		}
	default:
		rs.refuse(w, `DPoP algs="ES256 EdDSA RS256 PS256", Bearer`, "")
		return
	}
	rs.accepted.Add(1)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"client_id": is.ClientID, "path": r.URL.Path, "method": r.Method})
}

func (rs *ResourceServer) refuse(w http.ResponseWriter, challenge, code string) {
	rs.refused.Add(1)
	rs.mu.Lock()
	rs.reasons[code]++
	rs.mu.Unlock()
	w.Header().Set("WWW-Authenticate", challenge)
	http.Error(w, "unauthorized", http.StatusUnauthorized)
}
