// Package oauthtest is an in-process OAuth 2.0 authorization server with a
// client credentials token endpoint (RFC 6749 §4.4), for tests and dev mode.
//
// It authenticates registered clients with client_secret_basic,
// client_secret_post, private_key_jwt (RFC 7523) or, over https,
// tls_client_auth (RFC 8705), enforces each client's allowed scopes, and rejects what
// a real server rejects (wrong secret → 401 invalid_client, scope not allowed →
// 400 invalid_scope, another grant type → 400 unsupported_grant_type, a method
// other than POST → 405). Faults can be switched on to imitate a failing
// server, and it counts every token request so tests can assert how many
// reached it.
//
// A client registered with DPoP must send a DPoP proof (RFC 9449) with
// every token request; its tokens are bound to the proof's key (token_type
// DPoP, cnf.jkt). ProofVerifier checks proofs as RFC 9449 §4.3 says, with
// nonces on demand, and ResourceServer is a resource server double that
// accepts a bound token only with a valid proof of its key.
package oauthtest

import (
	"cmp"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// TokenPath is the path of the token endpoint.
const TokenPath = "/oauth2/token"

// Format is the format of the access tokens the server issues.
type Format int

const (
	// Opaque tokens are random strings.
	Opaque Format = iota
	// JWT tokens are HS256-signed JSON Web Tokens (RFC 9068 claims).
	JWT
)

// Client is a registered client.
type Client struct {
	// ID is the client_id.
	ID string
	// Secret is the client secret.
	Secret string
	// Scopes are the scopes the client may be granted; the default grant is all of them.
	Scopes []string
	// PublicKey, when set, lets the client authenticate with private_key_jwt:
	// assertions signed by the matching private key.
	PublicKey crypto.PublicKey
	// TLSSubject, when set, lets the client authenticate with tls_client_auth:
	// a client certificate that chains to the server's client CAs and whose
	// common name or a DNS or URI SAN is TLSSubject.
	TLSSubject string
	// DPoP makes every token request of the client carry a DPoP proof
	// (RFC 9449): its tokens are bound to the proof's key, token_type DPoP.
	DPoP bool
}

// Faults make the token endpoint misbehave. The zero value is a healthy server.
type Faults struct {
	// Latency delays every token response.
	Latency time.Duration
	// Status, when non-zero, answers every token request with this HTTP status
	// and a plain-text body (e.g. 500, 503, 429).
	Status int
	// RetryAfter is sent as the Retry-After header with Status.
	RetryAfter string
	// ErrorCode, when set, answers with this RFC 6749 §5.2 error
	// (401 for invalid_client, 400 otherwise).
	ErrorCode string
	// ErrorDescription, when set, is the error_description sent with
	// ErrorCode, as given (a hostile server may send anything).
	ErrorDescription string
	// Malformed answers 200 with a body that is not valid JSON.
	Malformed bool
	// OmitExpiresIn leaves expires_in out of the response.
	OmitExpiresIn bool
	// FormEncoded answers application/x-www-form-urlencoded instead of JSON.
	FormEncoded bool
	// TokenType overrides the token_type sent ("" means "Bearer"; use "-" to omit it).
	TokenType string
	// GrantScopes, when non-nil, overrides the scope field of the response.
	GrantScopes []string
	// RedirectTo, when set, answers every token request with a redirect
	// (RedirectStatus, 307 when zero) to this URL, as a hijacked or
	// misconfigured endpoint would.
	RedirectTo     string
	RedirectStatus int
	// Body, when set, is sent as the whole 200 response to an authenticated
	// request, with ContentType ("application/json" when empty): a crafted
	// answer from a hostile or broken server.
	Body        string
	ContentType string
}

// Issued describes a token the server issued.
type Issued struct {
	// ClientID is the client the token was issued to.
	ClientID string
	// Scopes are the scopes granted.
	Scopes []string
	// AuthMethod is how the client authenticated: client_secret_basic or client_secret_post.
	AuthMethod string
	// Expiry is when the token expires.
	Expiry time.Time
	// JKT is the thumbprint of the DPoP key the token is bound to (its
	// cnf.jkt); empty for a bearer token.
	JKT string
}

// Server is the authorization server. Create it with New and start it with Start.
type Server struct {
	format Format
	key    []byte
	now    func() time.Time

	requests atomic.Int64

	mu        sync.Mutex
	clients   map[string]Client
	faults    Faults
	expiresIn time.Duration
	issued    map[string]Issued
	lastForm  url.Values
	jtis      map[string]time.Time // assertion IDs seen, until they expire
	proofs    ProofVerifier        // DPoP proofs at the token endpoint

	srv       *http.Server
	ln        net.Listener
	scheme    string
	clientCAs *x509.CertPool // with StartTLS: the CAs tls_client_auth certificates must chain to
}

// Options configures a Server.
type Options struct {
	// ExpiresIn is the lifetime of issued tokens; zero means one hour.
	ExpiresIn time.Duration
	// Format is the token format; the default is Opaque.
	Format Format
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// New returns a server with no clients.
func New(opts Options) *Server {
	if opts.ExpiresIn <= 0 {
		opts.ExpiresIn = time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Server{
		format:    opts.Format,
		key:       randomBytes(32),
		now:       opts.Now,
		clients:   map[string]Client{},
		expiresIn: opts.ExpiresIn,
		issued:    map[string]Issued{},
		jtis:      map[string]time.Time{},
		proofs:    ProofVerifier{Now: opts.Now},
	}
}

// DPoP is the verifier of the token endpoint's DPoP proofs: turn nonces on
// with its SetRequireNonce. With nonces on, every response carries the
// current nonce in DPoP-Nonce, and each token issued rotates it.
func (s *Server) DPoP() *ProofVerifier { return &s.proofs }

// AddClient registers c, replacing any client with the same ID.
func (s *Server) AddClient(c Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[c.ID] = c
}

// SetFaults replaces the active faults; the zero Faults heals the server.
func (s *Server) SetFaults(f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = f
}

// SetExpiresIn sets the lifetime of tokens issued from now on.
func (s *Server) SetExpiresIn(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expiresIn = d
}

// TokenRequests is the number of requests that reached the token endpoint,
// successful or not.
func (s *Server) TokenRequests() int64 { return s.requests.Load() }

// Lookup reports whether token was issued by this server, and to whom.
func (s *Server) Lookup(token string) (Issued, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	is, ok := s.issued[token]
	return is, ok
}

// Revoke forgets token: resource servers that look it up refuse it from now on.
func (s *Server) Revoke(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.issued, token)
}

// LastForm returns the form fields of the last token request, without client_secret.
func (s *Server) LastForm() url.Values {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastForm
}

// Start serves on addr (e.g. "127.0.0.1:0") until Close.
func (s *Server) Start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("oauthtest: listen: %w", err)
	}
	s.ln, s.scheme = ln, "http"
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
	return nil
}

// StartTLS serves https on addr with cert until Close. Client certificates
// are requested but not required, and checked per client (tls_client_auth)
// against clientCAs, so that a bad certificate gets invalid_client, as from a
// real server, rather than a failed handshake.
func (s *Server) StartTLS(addr string, cert tls.Certificate, clientCAs *x509.CertPool) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("oauthtest: listen: %w", err)
	}
	s.clientCAs = clientCAs
	s.ln, s.scheme = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12}), "https"
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.srv.Serve(s.ln) }()
	return nil
}

// URL is the server's base URL, once started.
func (s *Server) URL() string { return s.scheme + "://" + s.ln.Addr().String() }

// TokenURL is the token endpoint's URL, once started.
func (s *Server) TokenURL() string { return s.URL() + TokenPath }

// Close stops the server.
func (s *Server) Close() error {
	if s.srv == nil {
		return nil
	}
	return s.srv.Close()
}

// Handler returns the server's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(TokenPath, s.token)
	return mux
}

func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	s.mu.Lock()
	f := s.faults
	s.mu.Unlock()
	if f.Latency > 0 {
		select {
		case <-time.After(f.Latency):
		case <-r.Context().Done():
			return
		}
	}
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct != "application/x-www-form-urlencoded" {
		oauthError(w, http.StatusBadRequest, "invalid_request", "body must be application/x-www-form-urlencoded")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "cannot parse form")
		return
	}
	form := r.PostForm
	s.recordForm(form)

	switch {
	case f.RedirectTo != "":
		code := f.RedirectStatus
		if code == 0 {
			code = http.StatusTemporaryRedirect
		}
		http.Redirect(w, r, f.RedirectTo, code)
		return
	case f.Status != 0:
		if f.RetryAfter != "" {
			w.Header().Set("Retry-After", f.RetryAfter)
		}
		http.Error(w, http.StatusText(f.Status), f.Status)
		return
	case f.ErrorCode == "invalid_client":
		oauthError(w, http.StatusUnauthorized, f.ErrorCode, cmp.Or(f.ErrorDescription, "client authentication failed"))
		return
	case f.ErrorCode != "":
		oauthError(w, http.StatusBadRequest, f.ErrorCode, cmp.Or(f.ErrorDescription, "fault injected"))
		return
	}

	client, method, status, code := s.authenticate(r, form)
	if code != "" {
		if method == "client_secret_basic" {
			w.Header().Set("WWW-Authenticate", `Basic realm="oauthtest"`)
		}
		oauthError(w, status, code, "client authentication failed")
		return
	}
	if gt := form.Get("grant_type"); gt != "client_credentials" {
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "only client_credentials is supported")
		return
	}
	scopes := strings.Fields(form.Get("scope"))
	if len(scopes) == 0 {
		scopes = client.Scopes
	}
	for _, sc := range scopes {
		if !slices.Contains(client.Scopes, sc) {
			oauthError(w, http.StatusBadRequest, "invalid_scope", "scope not allowed for this client")
			return
		}
	}
	if f.Malformed {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token": "truncated`))
		return
	}
	if f.Body != "" {
		ct := f.ContentType
		if ct == "" {
			ct = "application/json"
		}
		w.Header().Set("Content-Type", ct)
		_, _ = w.Write([]byte(f.Body))
		return
	}
	jkt, ok := s.checkProof(w, r, client)
	if !ok {
		return
	}
	s.issue(w, client, method, scopes, f, jkt)
}

// checkProof checks the DPoP proof of a token request, if the client must
// send one or sends one anyway, and answers the request when it fails. It
// returns the thumbprint to bind the token to ("" for a bearer token).
func (s *Server) checkProof(w http.ResponseWriter, r *http.Request, c Client) (string, bool) {
	if !c.DPoP && r.Header.Get("DPoP") == "" {
		return "", true
	}
	if n := s.proofs.Nonce(); n != "" {
		w.Header().Set("DPoP-Nonce", n)
	}
	p, err := s.proofs.Verify(r, s.TokenURL(), "")
	switch {
	case errors.Is(err, ErrUseNonce):
		oauthError(w, http.StatusBadRequest, "use_dpop_nonce", "Authorization server requires nonce in DPoP proof")
		return "", false
	case err != nil:
		oauthError(w, http.StatusBadRequest, "invalid_dpop_proof", "the DPoP proof is not valid")
		return "", false
	}
	if n := s.proofs.RotateNonce(); n != "" {
		w.Header().Set("DPoP-Nonce", n)
	}
	return p.JKT, true
}

func (s *Server) recordForm(form url.Values) {
	c := url.Values{}
	for k, v := range form {
		if k != "client_secret" {
			c[k] = slices.Clone(v)
		}
	}
	s.mu.Lock()
	s.lastForm = c
	s.mu.Unlock()
}

// authenticate returns the client and the method it used, or an HTTP status and error code.
func (s *Server) authenticate(r *http.Request, form url.Values) (Client, string, int, string) {
	if form.Get("client_assertion_type") == jwtBearer {
		return s.authenticateAssertion(form)
	}
	user, pass, basic := r.BasicAuth()
	if !basic && !form.Has("client_secret") && form.Has("client_id") {
		return s.authenticateCertificate(r, form.Get("client_id"))
	}
	_, postID := form["client_id"]
	_, postSecret := form["client_secret"]
	var id, sec, method string
	switch {
	case basic && (postID || postSecret):
		return Client{}, "", http.StatusBadRequest, "invalid_request"
	case basic:
		// RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
		var err1, err2 error
		id, err1 = url.QueryUnescape(user)
		sec, err2 = url.QueryUnescape(pass)
		if err1 != nil || err2 != nil {
			return Client{}, "client_secret_basic", http.StatusUnauthorized, "invalid_client"
		}
		method = "client_secret_basic"
	case postID && postSecret:
		id, sec, method = form.Get("client_id"), form.Get("client_secret"), "client_secret_post"
	default:
		return Client{}, "", http.StatusUnauthorized, "invalid_client"
	}
	s.mu.Lock()
	c, ok := s.clients[id]
	s.mu.Unlock()
	if !ok || subtle.ConstantTimeCompare([]byte(c.Secret), []byte(sec)) != 1 {
		return Client{}, method, http.StatusUnauthorized, "invalid_client"
	}
	return c, method, 0, ""
}

// authenticateCertificate checks tls_client_auth (RFC 8705 §2.1): a client
// certificate on the connection, chaining to the client CAs, for the
// subject registered for client_id.
func (s *Server) authenticateCertificate(r *http.Request, id string) (Client, string, int, string) {
	const method = "tls_client_auth"
	refuse := func() (Client, string, int, string) {
		return Client{}, method, http.StatusUnauthorized, "invalid_client"
	}
	s.mu.Lock()
	c, ok := s.clients[id]
	s.mu.Unlock()
	if !ok || c.TLSSubject == "" || r.TLS == nil || len(r.TLS.PeerCertificates) == 0 || s.clientCAs == nil {
		return refuse()
	}
	leaf := r.TLS.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, ic := range r.TLS.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.clientCAs, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: s.now()}); err != nil {
		return refuse()
	}
	names := append([]string{leaf.Subject.CommonName}, leaf.DNSNames...)
	for _, u := range leaf.URIs {
		names = append(names, u.String())
	}
	if !slices.Contains(names, c.TLSSubject) {
		return refuse()
	}
	return c, method, 0, ""
}

// jwtBearer is the client_assertion_type of RFC 7523.
const jwtBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// authenticateAssertion checks a private_key_jwt assertion (RFC 7523 §3):
// signed by the client's registered key, iss = sub = client_id, aud naming
// this server, unexpired and at most five minutes long, and a jti not seen before.
func (s *Server) authenticateAssertion(form url.Values) (Client, string, int, string) {
	const method = "private_key_jwt"
	refuse := func() (Client, string, int, string) {
		return Client{}, method, http.StatusUnauthorized, "invalid_client"
	}
	tok, err := jwt.ParseSigned(form.Get("client_assertion"), []jose.SignatureAlgorithm{jose.RS256, jose.PS256, jose.ES256})
	if err != nil {
		return refuse()
	}
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return refuse()
	}
	s.mu.Lock()
	c, ok := s.clients[unverified.Issuer]
	s.mu.Unlock()
	if !ok || c.PublicKey == nil || (form.Has("client_id") && form.Get("client_id") != c.ID) {
		return refuse()
	}
	var claims jwt.Claims
	if err := tok.Claims(c.PublicKey, &claims); err != nil {
		return refuse()
	}
	now := s.now()
	err = claims.ValidateWithLeeway(jwt.Expected{Issuer: c.ID, Subject: c.ID,
		AnyAudience: jwt.Audience{s.TokenURL(), s.URL()}, Time: now}, 5*time.Second)
	if err != nil || claims.Expiry == nil || claims.Expiry.Time().Sub(now) > 5*time.Minute || claims.ID == "" {
		return refuse()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, exp := range s.jtis {
		if now.After(exp) {
			delete(s.jtis, id)
		}
	}
	if _, replayed := s.jtis[claims.ID]; replayed {
		return refuse()
	}
	s.jtis[claims.ID] = claims.Expiry.Time()
	return c, method, 0, ""
}

func (s *Server) issue(w http.ResponseWriter, c Client, method string, scopes []string, f Faults, jkt string) {
	now := s.now()
	s.mu.Lock()
	ttl := s.expiresIn
	s.mu.Unlock()
	exp := now.Add(ttl)
	tok := s.mint(c.ID, scopes, now, exp, jkt)

	s.mu.Lock()
	for k, is := range s.issued { // keep the record bounded in long dev runs
		if now.After(is.Expiry) {
			delete(s.issued, k)
		}
	}
	s.issued[tok] = Issued{ClientID: c.ID, Scopes: slices.Clone(scopes), AuthMethod: method, Expiry: exp, JKT: jkt}
	s.mu.Unlock()

	tokenType := "Bearer"
	if jkt != "" {
		tokenType = "DPoP"
	}
	if f.TokenType != "" {
		tokenType = f.TokenType
	}
	granted := scopes
	if f.GrantScopes != nil {
		granted = f.GrantScopes
	}
	fields := [][2]string{{"access_token", tok}}
	if tokenType != "-" {
		fields = append(fields, [2]string{"token_type", tokenType})
	}
	if !f.OmitExpiresIn {
		fields = append(fields, [2]string{"expires_in", strconv.FormatInt(int64(ttl/time.Second), 10)})
	}
	fields = append(fields, [2]string{"scope", strings.Join(granted, " ")})

	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	if f.FormEncoded {
		v := url.Values{}
		for _, kv := range fields {
			v.Set(kv[0], kv[1])
		}
		w.Header().Set("Content-Type", "application/x-www-form-urlencoded")
		_, _ = w.Write([]byte(v.Encode()))
		return
	}
	m := map[string]any{}
	for _, kv := range fields {
		m[kv[0]] = kv[1]
	}
	if !f.OmitExpiresIn {
		m["expires_in"] = int64(ttl / time.Second)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(m)
}

// mint makes an access token in the configured format.
func (s *Server) mint(clientID string, scopes []string, iat, exp time.Time, jkt string) string {
	if s.format != JWT {
		return "tbt_" + base64.RawURLEncoding.EncodeToString(randomBytes(32))
	}
	enc := base64.RawURLEncoding
	header := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"at+jwt"}`))
	c := map[string]any{
		"iss": "oauthtest", "sub": clientID, "client_id": clientID,
		"scope": strings.Join(scopes, " "), "iat": iat.Unix(), "exp": exp.Unix(),
		"jti": enc.EncodeToString(randomBytes(12)),
	}
	if jkt != "" {
		c["cnf"] = map[string]string{"jkt": jkt} // RFC 9449 §6.1
	}
	claims, _ := json.Marshal(c)
	signing := header + "." + enc.EncodeToString(claims)
	mac := hmac.New(sha256.New, s.key)
	mac.Write([]byte(signing))
	return signing + "." + enc.EncodeToString(mac.Sum(nil))
}

func oauthError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(errors.New("oauthtest: crypto/rand failed"))
	}
	return b
}
