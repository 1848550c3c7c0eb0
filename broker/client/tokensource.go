package client

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Defaults of a Source.
const (
	// DefaultMinTTL is the most lifetime a token must have left to be handed
	// out when WithMinTTL is not used: half of what the token had left when it
	// arrived, if that is less, so that short-lived tokens (30s, 60s) are
	// cached too. The broker then applies its own default min_ttl, which it
	// caps to what the bank's lifetime can give.
	DefaultMinTTL = 30 * time.Second
	// DefaultTimeout bounds each call to the broker.
	DefaultTimeout = 10 * time.Second
)

// Watch reconnection backoff: full jitter between these bounds, doubling.
const (
	watchBackoffMin = 100 * time.Millisecond
	watchBackoffMax = 30 * time.Second
)

// ErrClosed is returned by a Source after Close.
var ErrClosed = errors.New("client: token source closed")

// Option configures a Source.
type Option func(*Source)

// WithScopes asks for these scopes instead of the credential's configured ones.
func WithScopes(scopes ...string) Option {
	return func(s *Source) { s.scopes = append([]string(nil), scopes...) }
}

// WithMinTTL sets the lifetime a token must have left when Token returns it
// (default: see DefaultMinTTL). It is sent to the broker too, which never
// answers with less, and refuses (FAILED_PRECONDITION) one the bank's token
// lifetime cannot give.
func WithMinTTL(d time.Duration) Option {
	return func(s *Source) { s.minTTL, s.minTTLSet = d, true }
}

// WithTimeout bounds each call to the broker (default DefaultTimeout).
func WithTimeout(d time.Duration) Option {
	return func(s *Source) { s.timeout = d }
}

// WithWatch keeps the token fresh from a WatchToken stream: the broker pushes
// each replacement, so Token rarely calls the broker at all. The stream is
// reopened with backoff when it breaks (a broker restart, a network blip).
// Close the Source to end it.
func WithWatch() Option {
	return func(s *Source) { s.watch = true }
}

// WithNotify makes the Source signal ch each time it takes a new token,
// from the watch stream or a GetToken. The send never blocks: a full channel
// already holds a pending signal. Call Token to read the token.
func WithNotify(ch chan<- struct{}) Option {
	return func(s *Source) { s.notify = ch }
}

// Source is an oauth2.TokenSource backed by tokenbroker. It keeps the last
// token and returns it while it has more than the minimum lifetime left;
// concurrent calls that need a new one share a single call to the broker.
// It is safe for concurrent use.
type Source struct {
	c          pb.TokenBrokerClient
	credential string
	scopes     []string
	minTTL     time.Duration
	minTTLSet  bool      // WithMinTTL was used: minTTL is sent to the broker
	received   time.Time // when tok arrived
	timeout    time.Duration
	watch      bool
	now        func() time.Time
	notify     chan<- struct{}

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the watch loop has returned

	dpop atomic.Bool // the credential is DPoP-bound: GetToken needs a proof request

	mu       sync.Mutex
	tok      *pb.Token
	flight   *flight
	rejected []*rejection // the last fingerprints reported, oldest first
}

// flight is one GetToken call shared by the callers that wait for it.
type flight struct {
	done chan struct{}
	tok  *pb.Token
	err  error
}

// TokenSource returns a Source for credential over conn (see Dial). Call
// Close when done with it if WithWatch is used.
//
//	ts := client.TokenSource(conn, "identity")
//	httpClient := oauth2.NewClient(ctx, ts)
func TokenSource(conn grpc.ClientConnInterface, credential string, opts ...Option) *Source {
	s := &Source{c: pb.NewTokenBrokerClient(conn), credential: credential, minTTL: DefaultMinTTL,
		timeout: DefaultTimeout, now: time.Now, done: make(chan struct{})}
	for _, o := range opts {
		o(s)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if s.watch {
		go s.watchLoop()
	} else {
		close(s.done)
	}
	return s
}

// Token returns a token with more than the minimum lifetime left: the cached
// one, or a new one from the broker. If the broker cannot be reached, the
// cached token is returned while it is still valid at all.
func (s *Source) Token() (*oauth2.Token, error) {
	return s.TokenContext(context.Background())
}

// TokenContext is Token for a caller with a context: a call it makes to the
// broker carries ctx's trace context (see Dial), so that the broker's spans
// join the caller's trace. The call is bounded by the Source's timeout, not
// by ctx: callers that join it share it.
func (s *Source) TokenContext(ctx context.Context) (*oauth2.Token, error) {
	s.mu.Lock()
	if t := s.tok; t != nil && t.GetExpireTime().AsTime().Sub(s.now()) > s.threshold(t) {
		s.mu.Unlock()
		return s.oauthToken(t), nil
	}
	if s.dpop.Load() { // asking without a proof request would only be refused
		s.mu.Unlock()
		return nil, ErrDPoPRequired
	}
	f := s.flight
	if f == nil {
		f = &flight{done: make(chan struct{})}
		s.flight = f
		go s.fetch(f, trace.SpanContextFromContext(ctx))
	}
	s.mu.Unlock()

	<-f.done
	if f.err == nil {
		return s.oauthToken(f.tok), nil
	}
	if transient(f.err) {
		s.mu.Lock()
		t := s.tok
		s.mu.Unlock()
		if t != nil && s.now().Before(t.GetExpireTime().AsTime()) {
			return s.oauthToken(t), nil
		}
	}
	return nil, f.err
}

// threshold is the lifetime t must have left to be handed out; s.mu held.
func (s *Source) threshold(t *pb.Token) time.Duration {
	if s.minTTLSet {
		return s.minTTL
	}
	return min(s.minTTL, t.GetExpireTime().AsTime().Sub(s.received)/2)
}

// minTTLReq is the min_ttl sent to the broker: none (the broker's default)
// unless WithMinTTL was used.
func (s *Source) minTTLReq() *durationpb.Duration {
	if !s.minTTLSet {
		return nil
	}
	return durationpb.New(s.minTTL)
}

// fetch makes the shared GetToken call of f, in the trace of sc when valid.
func (s *Source) fetch(f *flight, sc trace.SpanContext) {
	ctx := s.ctx
	if sc.IsValid() {
		ctx = trace.ContextWithSpanContext(ctx, sc)
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.GetToken(ctx, &pb.GetTokenRequest{Credential: s.credential, Scopes: s.scopes,
		MinTtl: s.minTTLReq()})
	if err == nil && resp.GetToken().GetAccessToken() == "" {
		err = errors.New("client: the broker answered without a token")
	}
	if dpopRequired(err) {
		s.dpop.Store(true)
		err = dpopErr(s.credential, err)
	}
	if s.ctx.Err() != nil {
		err = ErrClosed
	}
	s.mu.Lock()
	if err == nil {
		f.tok = resp.GetToken()
		s.keepLocked(f.tok)
	}
	f.err = err
	s.flight = nil
	s.mu.Unlock()
	close(f.done)
}

// keepLocked makes t the cached token unless the cached one expires later.
func (s *Source) keepLocked(t *pb.Token) {
	if s.tok == nil || !t.GetExpireTime().AsTime().Before(s.tok.GetExpireTime().AsTime()) {
		s.tok, s.received = t, s.now()
		s.notifyLocked()
	}
}

// notifyLocked signals the WithNotify channel, if any, without blocking.
func (s *Source) notifyLocked() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Invalidate reports that a resource server rejected the token with this
// fingerprint (see Fingerprint): the broker drops it if it is still its
// current one, and the Source drops its copy, so the next Token gets a new
// token. It returns whether the broker dropped it. A fingerprint is reported
// at most once: when the Source holds another token (the one rejected was
// already replaced) or already reported this one, it only returns false.
func (s *Source) Invalidate(ctx context.Context, fingerprint string) (bool, error) {
	report, r := s.markRejected(fingerprint)
	if !report {
		return false, nil
	}
	return s.report(ctx, r)
}

// Close ends the watch stream, if any, and makes Token fail with ErrClosed
// once the cached token is no longer good.
func (s *Source) Close() error {
	s.cancel()
	<-s.done
	return nil
}

// watchLoop keeps a WatchToken stream open until Close, storing each token it
// receives, and reopens it with jittered exponential backoff when it breaks.
func (s *Source) watchLoop() {
	defer close(s.done)
	backoff := watchBackoffMin
	for s.ctx.Err() == nil {
		stream, err := s.c.WatchToken(s.ctx, &pb.WatchTokenRequest{Credential: s.credential, Scopes: s.scopes,
			MinTtl: s.minTTLReq()})
		for err == nil {
			var resp *pb.WatchTokenResponse
			if resp, err = stream.Recv(); err == nil && resp.GetToken().GetAccessToken() != "" {
				s.mu.Lock()
				s.tok, s.received = resp.GetToken(), s.now() // the broker's current token, even if it expires sooner
				s.notifyLocked()
				s.mu.Unlock()
				backoff = watchBackoffMin
			}
		}
		t := time.NewTimer(rand.N(backoff) + time.Millisecond)
		select {
		case <-s.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, watchBackoffMax)
	}
}

// transient reports errors after which a still-valid cached token is better
// than none: the broker is unreachable, slow or shutting down.
func transient(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted:
		return true
	}
	return false
}

// oauthToken converts t, keeping its fingerprint and scopes as extras.
func (s *Source) oauthToken(t *pb.Token) *oauth2.Token {
	typ := "Bearer"
	if strings.EqualFold(t.GetTokenType(), "DPoP") {
		typ = "DPoP"
	}
	ot := &oauth2.Token{AccessToken: t.GetAccessToken(), TokenType: typ, Expiry: t.GetExpireTime().AsTime()}
	return ot.WithExtra(map[string]any{"fingerprint": t.GetFingerprint(), "scope": strings.Join(t.GetScopes(), " ")})
}

// Fingerprint returns the broker's fingerprint of a token from a Source
// (safe to log, unlike the token), or "" for another token.
func Fingerprint(t *oauth2.Token) string {
	if t == nil {
		return ""
	}
	fp, _ := t.Extra("fingerprint").(string)
	return fp
}
