// Package agent serves tokenbroker tokens to callers that cannot speak gRPC:
// it keeps a file holding the current access token, serves a loopback reverse
// proxy that adds "Authorization: Bearer" (for a DPoP-bound credential,
// "Authorization: DPoP" and a fresh proof) to every request it forwards to one
// upstream, and answers a health probe. It is what `tokenctl agent` runs, as
// a sidecar beside an application written in any language.
//
// It is built on broker/client: a watching Source keeps the token fresh, and
// the proxy's transport is client.Transport, so rotation, invalidation and a
// resource server's 401 behave as they do for Go callers. The token is never
// logged; rotations are logged with the token's fingerprint.
package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/oauth2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/client"
)

// Defaults and limits.
const (
	// DefaultFileMode is the token file's mode: readable by the file's group,
	// so an application container sharing the pod's fsGroup can read it.
	DefaultFileMode = 0o640
	// MaxReplayBody is the largest request body the proxy keeps to send
	// again after a 401; a larger one is streamed and not retried.
	MaxReplayBody = 1 << 20
	// ShutdownGrace bounds how long in-flight proxied requests may take to
	// finish after a stop is asked for.
	ShutdownGrace = 10 * time.Second
	// checkInterval is how often the agent asks its Source for the current
	// token (no call to the broker while the cached one is good).
	checkInterval = time.Second
	// maxBackoff caps the wait between attempts while the broker fails.
	maxBackoff = 30 * time.Second
)

// Config configures an Agent. Source, and File or Listen, are required.
type Config struct {
	// Source provides the tokens; it should watch (client.WithWatch) and
	// notify Changed (client.WithNotify).
	Source *client.Source
	// Changed receives the Source's signals of a new token.
	Changed <-chan struct{}
	// MinTTL is the lifetime the token in the file keeps at least; the
	// health probe fails when the agent holds no token with this much left.
	MinTTL time.Duration
	// File, when set, is kept holding exactly the current access token.
	File string
	// FileMode is File's mode; zero means DefaultFileMode.
	FileMode os.FileMode
	// Listen, when set, is the proxy's address. It must be a loopback
	// address unless ListenAny is set.
	Listen    string
	ListenAny bool
	// Upstream is the base URL every proxied request goes to.
	Upstream *url.URL
	// UpstreamTransport sends proxied requests; nil means one with the
	// system roots and the proxy from the environment.
	UpstreamTransport http.RoundTripper
	// Health, when set, is the address of the /healthz endpoint.
	Health string
	// Logger receives the agent's log; nil means none.
	Logger *zap.Logger
	// Hint explains an error from the broker when it can (a refused TLS
	// handshake); nil means none.
	Hint func(error) string
}

// Agent is a running token agent. Create it with New, then call Run.
type Agent struct {
	cfg                 Config
	log                 *zap.Logger
	proxyLn, health     net.Listener
	proxySrv, healthSrv *http.Server

	mu  sync.Mutex
	tok *oauth2.Token // the last token written and served
}

// ErrNoAccess wraps the broker's refusal at start: the caller may not have
// the credential, or the bank refuses the broker's registration. Retrying
// would not help.
var ErrNoAccess = errors.New("no access to the credential")

// New checks cfg and binds the listeners, so that a bad address fails at
// once rather than after the first token.
func New(cfg Config) (*Agent, error) {
	if cfg.Source == nil {
		return nil, errors.New("agent: a Source is required")
	}
	if cfg.File == "" && cfg.Listen == "" {
		return nil, errors.New("agent: --write or --listen is required")
	}
	if cfg.FileMode == 0 {
		cfg.FileMode = DefaultFileMode
	}
	a := &Agent{cfg: cfg, log: cfg.Logger}
	if a.log == nil {
		a.log = zap.NewNop()
	}
	if cfg.Listen != "" {
		if cfg.Upstream == nil {
			return nil, errors.New("agent: --listen needs --upstream")
		}
		if !cfg.ListenAny && !Loopback(cfg.Listen) {
			return nil, fmt.Errorf("agent: --listen %s is not a loopback address: the proxy adds the bank's token to every request it forwards, so anyone who can reach it can use the bank's API as this workload (use 127.0.0.1:PORT, or --listen-any if a NetworkPolicy guards the port)", cfg.Listen)
		}
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			return nil, fmt.Errorf("agent: --listen: %w", err)
		}
		a.proxyLn = ln
		_, port, _ := net.SplitHostPort(ln.Addr().String())
		a.proxySrv = &http.Server{Handler: a.guard(port, a.proxy()), ReadHeaderTimeout: 10 * time.Second}
	}
	if cfg.Health != "" {
		ln, err := net.Listen("tcp", cfg.Health)
		if err != nil {
			a.closeListeners()
			return nil, fmt.Errorf("agent: --health: %w", err)
		}
		a.health = ln
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", a.healthz)
		a.healthSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	}
	return a, nil
}

// addrString is ln's address, or "" without a listener (for the log).
func addrString(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

func (a *Agent) closeListeners() {
	for _, ln := range []net.Listener{a.proxyLn, a.health} {
		if ln != nil {
			_ = ln.Close()
		}
	}
}

// Loopback reports whether addr (host:port) names a loopback host.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Run gets the first token (writing the file before anything is served),
// then keeps the file current and serves until ctx ends; then it stops
// accepting, lets in-flight requests finish for up to ShutdownGrace, and
// returns nil. A refusal at start (see fatal) is returned wrapped in
// ErrNoAccess; other failures are retried with backoff.
func (a *Agent) Run(ctx context.Context) error {
	if a.healthSrv != nil {
		go func() { _ = a.healthSrv.Serve(a.health) }()
	}
	if err := a.first(ctx); err != nil {
		a.closeListeners()
		return err
	}
	if ctx.Err() != nil {
		a.closeListeners()
		return nil
	}
	if a.proxySrv != nil {
		go func() { _ = a.proxySrv.Serve(a.proxyLn) }()
	}
	a.log.Info("agent ready", zap.String("file", a.cfg.File), zap.String("proxy", addrString(a.proxyLn)),
		zap.String("health", addrString(a.health)))

	wait := checkInterval
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.shutdown()
			return nil
		case <-a.cfg.Changed:
		case <-t.C:
		}
		if err := a.refresh(); err != nil {
			wait = min(2*wait, maxBackoff)
			a.logFailure(err, wait)
		} else {
			wait = checkInterval
		}
		t.Reset(wait)
	}
}

// first gets and writes the first token, retrying transient failures.
func (a *Agent) first(ctx context.Context) error {
	wait := checkInterval
	for {
		err := a.refresh()
		if err == nil {
			return nil
		}
		if errors.Is(err, ErrDPoPFile) {
			return err
		}
		if fatal(err) {
			return fmt.Errorf("%w: %w", ErrNoAccess, err)
		}
		a.logFailure(err, wait)
		t := time.NewTimer(wait/2 + rand.N(wait/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, maxBackoff)
	}
}

// fatal reports a refusal that waiting will not change: the caller may not
// have the credential, it does not exist, the request is invalid, or the bank
// refuses the broker's registration.
func fatal(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.NotFound, codes.FailedPrecondition, codes.InvalidArgument, codes.Unauthenticated:
		return true
	}
	return false
}

func (a *Agent) logFailure(err error, retry time.Duration) {
	fields := []zap.Field{zap.Error(err), zap.Duration("retry_in", retry)}
	if a.cfg.Hint != nil {
		if h := a.cfg.Hint(err); h != "" {
			fields = append(fields, zap.String("hint", h))
		}
	}
	a.log.Warn("no token from the broker; the last one stays in use while it is valid", fields...)
}

// ErrDPoPFile: a token file was asked for a DPoP-bound credential.
var ErrDPoPFile = errors.New("agent: the credential is DPoP-bound (sender-constrained): a token file cannot carry the proof each request needs; use --listen ADDR --upstream URL, whose proxy adds a proof per request, or broker/client.Transport in Go")

// refresh asks the Source for the current token and, if it changed, writes
// it to the file. For a DPoP-bound credential, the proxy gets a token and a
// proof per request; the watched token, once the stream has brought it,
// serves the health probe.
func (a *Agent) refresh() error {
	tok, err := a.cfg.Source.Token()
	if dpop := errors.Is(err, client.ErrDPoPRequired); dpop || err == nil && tok.TokenType == "DPoP" {
		if a.cfg.File != "" {
			return ErrDPoPFile
		}
		if dpop {
			return nil
		}
	}
	if err != nil {
		return err
	}
	a.mu.Lock()
	prev := a.tok
	a.mu.Unlock()
	if prev != nil && client.Fingerprint(prev) == client.Fingerprint(tok) {
		return nil
	}
	if a.cfg.File != "" {
		if err := writeFile(a.cfg.File, []byte(tok.AccessToken), a.cfg.FileMode); err != nil {
			return err
		}
	}
	a.mu.Lock()
	a.tok = tok
	a.mu.Unlock()
	a.log.Info("token rotated", zap.String("fingerprint", client.Fingerprint(tok)), zap.Time("expire_time", tok.Expiry))
	return nil
}

// writeFile replaces path with data atomically: a reader sees the old token
// or the new one, never a part of either.
func writeFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("token file: %w", err)
	}
	tmp := f.Name()
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("token file: %w", err)
	}
	return nil
}

// healthz answers 200 while the agent holds a token with MinTTL left.
func (a *Agent) healthz(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	tok := a.tok
	a.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if tok == nil || time.Until(tok.Expiry) < a.cfg.MinTTL {
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, "no token with the minimum lifetime left\n")
		return
	}
	_, _ = fmt.Fprintf(w, "ok: token %s expires %s\n", client.Fingerprint(tok), tok.Expiry.UTC().Format(time.RFC3339))
}

// proxy is the reverse proxy to Upstream (behind guard): the incoming host is
// ignored, the path is normalised under Upstream's path, the query is kept, any incoming Authorization is dropped and the current
// token set by client.Transport, which also handles a 401 once. For a
// DPoP-bound credential the Transport adds a proof for the outgoing
// request, whose URL is Upstream's with the normalised path: htu never
// comes from the caller's Host. An incoming DPoP header is dropped too.
func (a *Agent) proxy() http.Handler {
	base := a.cfg.UpstreamTransport
	if base == nil {
		base = http.DefaultTransport
	}
	target := a.cfg.Upstream
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target) // no X-Forwarded-* headers: Rewrite leaves them out
			// The path normalised, as guard checked it (it cannot fail here).
			pr.Out.URL.Path, pr.Out.URL.RawPath, _ = upstreamPath(target, pr.In.URL)
			pr.Out.Header.Del("Authorization")
			pr.Out.Header.Del("DPoP")
			replayable(pr.Out)
		},
		Transport: &client.Transport{Source: a.cfg.Source, Base: base},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			a.log.Warn("proxied request failed", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Error(err))
			http.Error(w, "tokenctl agent: the request could not be sent upstream", http.StatusBadGateway)
		},
	}
}

// replayable buffers a body of up to MaxReplayBody bytes so that
// client.Transport can send it again after a 401; a longer body is streamed
// as it comes and not retried.
func replayable(r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	orig := r.Body
	buf, err := io.ReadAll(io.LimitReader(orig, MaxReplayBody+1))
	if err != nil || len(buf) > MaxReplayBody {
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(buf), orig), orig}
		r.GetBody = nil
		return
	}
	_ = orig.Close()
	r.ContentLength = int64(len(buf))
	r.Body = io.NopCloser(bytes.NewReader(buf))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
}

// shutdown stops accepting and waits up to ShutdownGrace for in-flight
// requests.
func (a *Agent) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), ShutdownGrace)
	defer cancel()
	for _, s := range []*http.Server{a.proxySrv, a.healthSrv} {
		if s != nil {
			_ = s.Shutdown(ctx)
		}
	}
	a.log.Info("agent stopped")
}
