// Package upstream fetches access tokens from an OAuth 2.0 authorization
// server with the client credentials grant (RFC 6749 §4.4).
//
// A Client reads its client secret from a file at every fetch, so a rotated
// secret is used without a restart. It validates the response (access_token
// and token_type present, a positive expires_in, the scopes granted) and
// computes the expiry from its own clock. Failures are *Error values whose
// messages never contain the response body, the secret or a token.
//
// The token endpoint is not trusted beyond its answer: a redirect is never
// followed (the request, with the secret, goes to TokenURL and nowhere else),
// and a response is refused whole when a member appears twice or the access
// token is not a bearer token (see package bearer).
package upstream

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenbroker/tokenbroker/broker/bearer"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/secret"
)

// AuthMethod is how the client authenticates to the token endpoint
// (the token_endpoint_auth_method values of RFC 7591).
type AuthMethod string

// The supported client authentication methods.
const (
	// ClientSecretBasic sends the client ID and secret in an HTTP Basic Authorization header.
	ClientSecretBasic AuthMethod = "client_secret_basic"
	// ClientSecretPost sends the client ID and secret as form fields.
	ClientSecretPost AuthMethod = "client_secret_post"
	// TLSClientAuth authenticates with a client certificate on the connection (RFC 8705 §2.1).
	TLSClientAuth AuthMethod = "tls_client_auth"
)

// Defaults applied by New to zero Config fields.
const (
	DefaultTimeout        = 10 * time.Second
	DefaultConnectTimeout = 5 * time.Second
	DefaultTTL            = 5 * time.Minute
	DefaultMaxTTL         = 24 * time.Hour
)

// Config configures a Client. TokenURL, ClientID and ClientSecretFile are required.
type Config struct {
	// TokenURL is the authorization server's token endpoint.
	TokenURL string
	// ClientID is the client identifier issued by the authorization server.
	ClientID string
	// ClientSecretFile is the path of a file holding the client secret; it is
	// read at every fetch.
	ClientSecretFile string
	// ClientSecretFiles, during a rotation, replaces ClientSecretFile: the
	// files are tried in order, the next one only on invalid_client.
	ClientSecretFiles []string
	// AuthMethod is the client authentication method; empty means ClientSecretBasic.
	AuthMethod AuthMethod
	// PrivateKeyFile is the PEM key that signs client assertions
	// (PrivateKeyJWT); it is read at every fetch.
	PrivateKeyFile string
	// JWTAlg is RS256, PS256 or ES256; empty picks RS256 (RSA) or ES256 (P-256).
	JWTAlg string
	// KeyID, if set, is the assertion's kid header.
	KeyID string
	// JWTAudience is the assertion's aud; empty means TokenURL.
	JWTAudience string
	// TLSClientCertFile and TLSClientKeyFile are the client certificate for
	// TLSClientAuth, read at every new connection to the token endpoint.
	TLSClientCertFile, TLSClientKeyFile string
	// TLSCAFile holds the CA certificates the token endpoint's certificate
	// must chain to; empty means the system roots.
	TLSCAFile string
	// EndpointParams are extra form fields sent with every request (audience, resource).
	EndpointParams url.Values
	// DefaultTTL is the lifetime assumed when the response has no expires_in.
	DefaultTTL time.Duration
	// MaxTTL caps the lifetime the response declares.
	MaxTTL time.Duration
	// ExpiryMargin is taken off every lifetime (at most half of it), so that
	// clock skew and transit time never make the broker serve a token the
	// authorization server already considers expired.
	ExpiryMargin time.Duration
	// Timeout bounds one fetch, from connect to the end of the response body.
	Timeout time.Duration
	// ConnectTimeout bounds establishing the connection; it is at most Timeout.
	ConnectTimeout time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// DPoP, when set, makes every token request carry a DPoP proof (RFC
	// 9449) signed by its current key, and requires DPoP-bound tokens.
	DPoP *dpop.Keyring
	// TracerProvider, when set, traces each token request (method, host,
	// status; never the body or the form). The request carries no trace
	// context to the bank.
	TracerProvider trace.TracerProvider
}

// Token is an access token fetched from the authorization server.
type Token struct {
	// AccessToken is the token.
	AccessToken string
	// TokenType is token_type as the server sent it.
	TokenType string
	// Scopes are the scopes granted: the response's scope field, else those asked for.
	Scopes []string
	// IssuedAt is when the response arrived.
	IssuedAt time.Time
	// Expiry is IssuedAt plus the granted lifetime.
	Expiry time.Time
	// SecretIndex is the index in ClientSecretFiles of the secret that worked.
	SecretIndex int
	// JKT is the thumbprint of the DPoP key the token is bound to; empty
	// for a bearer token.
	JKT string
}

// Client fetches tokens for one client registration. It is safe for concurrent use.
type Client struct {
	cfg  Config
	http *http.Client
	// nonce is the newest DPoP-Nonce the token endpoint sent.
	nonce atomic.Pointer[string]
}

// New returns a Client for cfg, filling in defaults.
func New(cfg Config) (*Client, error) {
	if cfg.ClientSecretFile != "" && len(cfg.ClientSecretFiles) > 0 { // the list, led by the single file
		cfg.ClientSecretFiles = append([]string{cfg.ClientSecretFile}, cfg.ClientSecretFiles...)
		cfg.ClientSecretFile = ""
	}
	if cfg.TokenURL == "" || cfg.ClientID == "" {
		return nil, errors.New("upstream: TokenURL and ClientID are required")
	}
	switch cfg.AuthMethod {
	case "":
		cfg.AuthMethod = ClientSecretBasic
		fallthrough
	case ClientSecretBasic, ClientSecretPost:
		if cfg.ClientSecretFile == "" && len(cfg.ClientSecretFiles) == 0 {
			return nil, errors.New("upstream: a client secret file is required")
		}
	case PrivateKeyJWT:
		if cfg.PrivateKeyFile == "" {
			return nil, errors.New("upstream: private_key_jwt needs PrivateKeyFile")
		}
	case TLSClientAuth:
		if cfg.TLSClientCertFile == "" || cfg.TLSClientKeyFile == "" {
			return nil, errors.New("upstream: tls_client_auth needs TLSClientCertFile and TLSClientKeyFile")
		}
	default:
		return nil, fmt.Errorf("upstream: unsupported auth method %q", cfg.AuthMethod)
	}
	if cfg.DefaultTTL <= 0 {
		cfg.DefaultTTL = DefaultTTL
	}
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = DefaultMaxTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	cfg.ConnectTimeout = min(cfg.ConnectTimeout, cfg.Timeout)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	tc, caSum, err := endpointTLS(cfg)
	if err != nil {
		return nil, err
	}
	hc := httpClientFor(cfg, tc, caSum)
	if cfg.TracerProvider != nil {
		rt := otelhttp.NewTransport(hc.Transport, otelhttp.WithTracerProvider(cfg.TracerProvider),
			otelhttp.WithPropagators(propagation.NewCompositeTextMapPropagator())) // nothing injected
		hc = &http.Client{Transport: rt, CheckRedirect: refuseRedirects}
	}
	return &Client{cfg: cfg, http: hc}, nil
}

// refuseRedirects keeps the client on TokenURL: following a redirect would
// send the form (with a client_secret_post secret or a client assertion) to
// wherever the Location points. The 3xx is returned to Fetch as it is.
func refuseRedirects(*http.Request, []*http.Request) error {
	return http.ErrUseLastResponse
}

// httpClients holds the HTTP clients that credentials share: every
// credential whose connections to token endpoints are configured alike (same
// CA, same timeouts, no client certificate of its own) uses one, and its
// transport, so that thousands of credentials at one bank reuse a few
// connections rather than holding one each (and not an http.Client each).
var httpClients sync.Map // transportKey → *http.Client

type transportKey struct {
	ca               [sha256.Size]byte // of the CA file's contents; zero: system roots
	connect, overall time.Duration
}

func httpClientFor(cfg Config, tc *tls.Config, caSum [sha256.Size]byte) *http.Client {
	newClient := func() *http.Client {
		return &http.Client{Transport: newTransport(cfg.ConnectTimeout, cfg.Timeout, tc), CheckRedirect: refuseRedirects}
	}
	if cfg.AuthMethod == TLSClientAuth { // its own client certificate
		return newClient()
	}
	k := transportKey{ca: caSum, connect: cfg.ConnectTimeout, overall: cfg.Timeout}
	if hc, ok := httpClients.Load(k); ok {
		return hc.(*http.Client)
	}
	hc, _ := httpClients.LoadOrStore(k, newClient())
	return hc.(*http.Client)
}

// endpointTLS is the TLS configuration for the token endpoint: the
// configured CA, and for TLSClientAuth the client certificate, loaded at
// each handshake so a renewed certificate is used without a restart. It also
// returns the CA file's checksum (zero without one).
func endpointTLS(cfg Config) (*tls.Config, [sha256.Size]byte, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	var caSum [sha256.Size]byte
	if cfg.TLSCAFile != "" {
		pemBytes, err := os.ReadFile(cfg.TLSCAFile)
		if err != nil {
			return nil, caSum, fmt.Errorf("upstream: CA file: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pemBytes) {
			return nil, caSum, errors.New("upstream: CA file: no PEM certificates found")
		}
		caSum = sha256.Sum256(pemBytes)
	}
	if cfg.AuthMethod == TLSClientAuth {
		certFile, keyFile := cfg.TLSClientCertFile, cfg.TLSClientKeyFile
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				return nil, fmt.Errorf("client certificate: %w", err)
			}
			return &c, nil
		}
	}
	return tc, caSum, nil
}

func newTransport(connect, overall time.Duration, tc *tls.Config) *http.Transport {
	return &http.Transport{
		TLSClientConfig:       tc,
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: connect, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   connect,
		ResponseHeaderTimeout: overall,
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   16, // shared by credentials: see httpClients
		IdleConnTimeout:       90 * time.Second,
	}
}

// Fetch requests a token for scopes. It returns an *Error on failure. With
// several secret files, the next is tried only when the server answers
// invalid_client to the previous one.
func (c *Client) Fetch(ctx context.Context, scopes []string) (*Token, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	var key *dpop.Key
	if c.cfg.DPoP != nil { // read at each fetch: a changed key file is used for the next token
		k, err := c.cfg.DPoP.Current()
		if err != nil {
			return nil, &Error{Reason: ReasonNoSecret, err: err}
		}
		key = k
	}
	if c.cfg.AuthMethod == PrivateKeyJWT {
		a, err := c.assertion()
		if err != nil {
			return nil, &Error{Reason: ReasonNoSecret, err: err}
		}
		return c.fetchWith(ctx, key, secret.Value{}, scopes, url.Values{"client_assertion_type": {assertionType}, "client_assertion": {a}})
	}
	if c.cfg.AuthMethod == TLSClientAuth { // the certificate on the connection authenticates; client_id in the body
		if _, err := tls.LoadX509KeyPair(c.cfg.TLSClientCertFile, c.cfg.TLSClientKeyFile); err != nil {
			return nil, &Error{Reason: ReasonNoSecret, err: fmt.Errorf("client certificate: %w", err)}
		}
		return c.fetchWith(ctx, key, secret.Value{}, scopes, nil)
	}
	files := c.cfg.ClientSecretFiles // during a rotation; else the one file
	if len(files) == 0 {
		files = []string{c.cfg.ClientSecretFile}
	}
	for i, f := range files {
		sec, err := secret.ReadFile(f)
		if err != nil {
			return nil, &Error{Reason: ReasonNoSecret, err: err}
		}
		t, err := c.fetchWith(ctx, key, sec, scopes, nil)
		var ue *Error
		if errors.As(err, &ue) && ue.Code == "invalid_client" && i+1 < len(files) {
			continue
		}
		if t != nil {
			t.SecretIndex = i
		}
		return t, err
	}
	panic("unreachable: New requires a secret file")
}

// fetchWith makes one token request (RFC 6749 §4.4.2) with sec (empty for
// the methods that send no secret) and extra form fields; with a DPoP key,
// each HTTP request carries a fresh proof, and a use_dpop_nonce answer that
// names a nonce is tried once more with it.
func (c *Client) fetchWith(ctx context.Context, key *dpop.Key, sec secret.Value, scopes []string, extra url.Values) (*Token, error) {
	form := url.Values{}
	for k, v := range c.cfg.EndpointParams {
		form[k] = v
	}
	for k, v := range extra {
		form[k] = v
	}
	form.Set("grant_type", "client_credentials")
	if len(scopes) > 0 {
		form.Set("scope", strings.Join(scopes, " "))
	}
	if c.cfg.AuthMethod != ClientSecretBasic { // post, and every method that sends client_id in the body
		form.Set("client_id", c.cfg.ClientID)
		if c.cfg.AuthMethod == ClientSecretPost {
			form.Set("client_secret", sec.Reveal())
		}
	}
	body := form.Encode()
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.cfg.TokenURL, strings.NewReader(body))
		if err != nil {
			return nil, &Error{Reason: ReasonNetwork, detail: "token_url does not make a request"}
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Accept", "application/json")
		if c.cfg.AuthMethod == ClientSecretBasic {
			// RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
			req.SetBasicAuth(url.QueryEscape(c.cfg.ClientID), url.QueryEscape(sec.Reveal()))
		}
		sentNonce := ""
		if key != nil {
			if sentNonce, err = c.prove(req, key); err != nil {
				return nil, &Error{Reason: ReasonNoSecret, err: err}
			}
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return nil, classify(ctx, err)
		}
		t, err := c.read(ctx, resp, scopes, key)
		resp.Body.Close()
		var ue *Error
		if errors.As(err, &ue) && ue.Description != "" {
			// A server that echoes what it was sent would put the secret or the
			// assertion in front of operators, logs and /readyz.
			sent := []string{sec.Reveal(), url.QueryEscape(sec.Reveal()), req.Header.Get("Authorization")}
			sent = append(sent, form["client_assertion"]...)
			ue.Description = withholdEcho(ue.Description, sent)
		}
		// RFC 9449 §8: a server that wants a nonce says which; asked once.
		if key != nil && attempt == 0 && nonceAsked(err) && c.newNonce(resp, sentNonce) {
			if c.cfg.AuthMethod == PrivateKeyJWT { // an assertion's jti is used once
				a, aerr := c.assertion()
				if aerr != nil {
					return nil, &Error{Reason: ReasonNoSecret, err: aerr}
				}
				form.Set("client_assertion", a)
				body = form.Encode()
			}
			continue
		}
		return t, err
	}
}

// withheldDescription replaces an error_description that repeats any of
// what the request sent to authenticate.
const withheldDescription = "[withheld: it repeated the broker's client credentials]"

func withholdEcho(description string, sent []string) string {
	for _, v := range sent {
		if _, cut, _ := strings.Cut(v, " "); cut != "" && strings.HasPrefix(v, "Basic ") {
			v = cut // the credentials of an Authorization header, not its scheme
		}
		if len(v) >= 4 && strings.Contains(description, v) {
			return withheldDescription
		}
	}
	return description
}

// read reads and checks the token endpoint's answer to a request for scopes.
func (c *Client) read(ctx context.Context, resp *http.Response, scopes []string, key *dpop.Key) (*Token, error) {
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // so the connection can be reused
		return nil, redirected(resp)
	}
	if key != nil {
		c.keepNonce(resp)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	arrived := c.cfg.Now()
	if err != nil {
		return nil, classify(ctx, err)
	}
	ok := resp.StatusCode >= 200 && resp.StatusCode < 300
	if len(body) > maxBody {
		if ok {
			return nil, &Error{Reason: ReasonMalformed, Temporary: true, StatusCode: resp.StatusCode, detail: "body over 1 MiB"}
		}
		body = nil // an error page; its status says enough
	}
	r, perr := parseBody(resp.Header.Get("Content-Type"), body)
	switch {
	case errors.Is(perr, errDuplicate):
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, StatusCode: resp.StatusCode, detail: perr.Error()}
	case !ok:
		return nil, fromResponse(resp, r.errorCode, r.errorDescription)
	case perr != nil:
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, detail: perr.Error()}
	case r.errorCode != "": // an error in a 2xx body
		return nil, fromResponse(resp, r.errorCode, r.errorDescription)
	}
	return c.validate(r, scopes, arrived, key)
}

// validate checks a successful response and computes its expiry.
func (c *Client) validate(r tokenResponse, asked []string, arrived time.Time, key *dpop.Key) (*Token, error) {
	if r.accessToken == "" {
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, detail: "no access_token"}
	}
	if !bearer.Valid(r.accessToken) {
		return nil, &Error{Reason: ReasonMalformed, Temporary: true,
			detail: fmt.Sprintf("access_token is not a bearer token (RFC 6750 b64token of at most %d bytes)", bearer.MaxLen)}
	}
	if r.tokenType == "" {
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, detail: "no token_type"}
	}
	switch {
	case key != nil && !strings.EqualFold(r.tokenType, "DPoP"):
		// The server ignored the proof: the token is not bound to the key,
		// and a copy of it would work without the broker.
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, detail: "token_type is not DPoP: the token is not bound to the DPoP key"}
	case key == nil && !strings.EqualFold(r.tokenType, "Bearer"):
		return nil, &Error{Reason: ReasonTokenType, detail: "token_type is not Bearer"}
	}
	ttl, err := lifetime(r.expiresIn, c.cfg.DefaultTTL, c.cfg.MaxTTL)
	if err != nil {
		return nil, &Error{Reason: ReasonMalformed, Temporary: true, detail: err.Error()}
	}
	ttl -= min(max(c.cfg.ExpiryMargin, 0), ttl/2)
	granted := asked
	if s := strings.TrimSpace(r.scope); s != "" {
		granted = strings.Fields(s)
	}
	if missing := missingScopes(asked, granted); len(missing) > 0 {
		return nil, &Error{Reason: ReasonScopeNotGranted, detail: "not granted: " + strings.Join(missing, " ")}
	}
	t := &Token{
		AccessToken: r.accessToken,
		TokenType:   r.tokenType,
		Scopes:      granted,
		IssuedAt:    arrived,
		Expiry:      arrived.Add(ttl),
	}
	if key != nil {
		t.JKT = key.Thumbprint()
	}
	return t, nil
}

// absurdTTL is a lifetime no access token has: a response declaring more is
// broken, not merely generous.
const absurdTTL = 10 * 365 * 24 * time.Hour

// lifetime reads expires_in (a JSON number, or a string as some servers and
// form-encoded bodies send it) and applies the default and the cap.
func lifetime(v any, def, maxTTL time.Duration) (time.Duration, error) {
	var secs float64
	switch x := v.(type) {
	case nil:
		return min(def, maxTTL), nil
	case float64:
		secs = x
	case string:
		if x == "" {
			return min(def, maxTTL), nil
		}
		f, err := strconv.ParseFloat(x, 64)
		if err != nil {
			return 0, errors.New("expires_in is not a number")
		}
		secs = f
	default:
		return 0, errors.New("expires_in is not a number")
	}
	if !(secs >= 1) { // also rejects NaN
		return 0, errors.New("expires_in is not positive")
	}
	if secs > absurdTTL.Seconds() {
		return 0, errors.New("expires_in is absurdly large (over ten years)")
	}
	if secs >= maxTTL.Seconds() {
		return maxTTL, nil
	}
	return time.Duration(secs) * time.Second, nil
}

func missingScopes(asked, granted []string) []string {
	var missing []string
	for _, a := range asked {
		found := false
		for _, g := range granted {
			if a == g {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, a)
		}
	}
	return missing
}
