package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

// Token sources, as reported with each issued token.
const (
	// SourceMemory: the broker's in-process cache.
	SourceMemory = "memory"
	// SourceUpstream: fetched from the authorization server for this request.
	SourceUpstream = "upstream"
)

// DefaultIdleTimeout is the IdleTimeout of a Credential that sets none.
const DefaultIdleTimeout = 30 * time.Minute

// pollInterval is how often a replica waiting for another's fetch re-reads the
// store in case the announcement was lost or the holder died.
const pollInterval = 100 * time.Millisecond

// Fetcher fetches tokens from an authorization server; *upstream.Client is one.
type Fetcher interface {
	Fetch(ctx context.Context, scopes []string) (*upstream.Token, error)
}

// Credential is a credential the Broker vends tokens for.
type Credential struct {
	// Name is what callers ask for.
	Name string
	// Scopes are the default scopes and the most a caller may ask for. The
	// Broker keeps the slice itself when it is sorted and without
	// duplicates, so it must not change afterwards.
	Scopes []string
	// MinTTL is the min_ttl applied when a request sets none, capped to
	// DefaultMinTTLShare of the lifetime the bank grants.
	MinTTL time.Duration
	// Callers admits the callers that may use the credential; nil admits none.
	Callers *policy.Matcher
	// Fetcher gets new tokens.
	Fetcher Fetcher
	// Timeout is the upstream timeout: the longest one fetch takes. The
	// refresh of a token starts at the latest when it has this plus the
	// largest min_ttl asked left. Zero means DefaultTimeout.
	Timeout time.Duration
	// LockTTL is the lease a replica holds on a cache key while it fetches; it
	// outlasts one fetch so that a replica that dies mid-fetch is replaced
	// soon after. Zero means Timeout plus LeaseSlack.
	LockTTL time.Duration
	// RefreshAt is the fraction of a token's lifetime after which it is
	// replaced in the background (jittered by ±0.1). Zero means late (see
	// lifecycle.go). Either way the refresh starts at the latest when the
	// token has the largest min_ttl asked plus Timeout left.
	RefreshAt float64
	// IdleTimeout stops refreshing tokens nobody asked for in this long.
	// Zero means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// TokenURL, ClientID and EndpointParams identify the upstream registration;
	// they are part of the cache key.
	TokenURL       string
	ClientID       string
	EndpointParams map[string]string
	// DPoP, when set, is the key the credential's tokens are bound to
	// (RFC 9449): GetToken then requires a ProofRequest (see proof.go).
	DPoP *dpop.Keyring
	// Secrets is how many client secrets the Fetcher tries (client_secret_files
	// during a rotation); tokenbroker_client_secret_used_total has series
	// only for a credential with more than one.
	Secrets int
}

// Options configures a Broker.
type Options struct {
	// Credentials are the credentials to vend; names must be unique.
	Credentials []Credential
	// Store is the shared token store (the second cache level).
	Store store.Store
	// Logger receives operational logs; nil means none.
	Logger *zap.Logger
	// Audit receives the audit trail; nil means none.
	Audit *audit.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// RateLimit and RateBurst limit each caller's calls (InvalidateToken has
	// its own, stricter limit); a zero RateLimit means no limit.
	RateLimit float64
	RateBurst int
	// WatchStreams caps the WatchToken streams one caller identity may hold
	// open at once; zero means DefaultWatchStreams.
	WatchStreams int
	// Tracer, when set, traces what a call that misses the in-process cache
	// does: the store read, the lease wait, the token endpoint request.
	Tracer trace.Tracer
	// MaxBackoffWithWaiters caps the wait before the next attempt after a
	// transient failure while callers wait with no usable token; zero means
	// DefaultMaxBackoffWithWaiters.
	MaxBackoffWithWaiters time.Duration
	// MaxRetryAfter caps the Retry-After honoured; zero means DefaultMaxRetryAfter.
	MaxRetryAfter time.Duration
	// RefreshInterval is how often the background refresher looks for tokens
	// to replace; zero means one second, negative turns it off (tests then
	// call RefreshDue themselves).
	RefreshInterval time.Duration
	// CheckInterval is how often idle credentials' token endpoints are
	// checked (see health.go); zero means DefaultCheckInterval, negative
	// turns the checks off.
	CheckInterval time.Duration
}

// Request asks for a token.
type Request struct {
	// Credential is the credential name.
	Credential string
	// Scopes are the scopes wanted; empty means the credential's.
	Scopes []string
	// MinTTL is the lifetime the token must have left; used when MinTTLSet.
	MinTTL time.Duration
	// MinTTLSet says whether the caller sent a min_ttl.
	MinTTLSet bool
	// MinTTLInvalid says that the min_ttl the caller sent is not a valid
	// duration. The request is refused (ErrInvalidArgument) once the
	// caller's rate limit and access have been checked, like any other
	// refusal, so that a malformed request costs no more than a denied one.
	MinTTLInvalid bool
	// Proof asks for a DPoP proof with the token: required for a DPoP
	// credential, refused for a bearer one.
	Proof *ProofRequest
}

// Issued is a token handed to a caller, with where it came from.
type Issued struct {
	*store.Entry
	// Source is SourceMemory, the store's name, or SourceUpstream.
	Source string
	// Proof is the DPoP proof asked for with Request.Proof; nil otherwise.
	Proof *Proof
}

// Broker vends tokens. It is safe for concurrent use.
type Broker struct {
	store store.Store
	log   *zap.Logger
	now   func() time.Time

	creds         atomic.Pointer[map[string]*credential]
	setting       sync.Mutex                    // held by SetCredentials
	retired       [numSources]uint64            // under setting: tokens handed out for removed credentials, by source (token_source_total never goes down)
	changes       atomic.Pointer[chan struct{}] // closed and replaced by each SetCredentials
	resyncing     atomic.Bool                   // dropBuried is running
	l1            sync.Map                      // cache key → *slot
	flights       singleflight.Group
	waiters       waiters
	invalidations limiters // InvalidateToken, per caller
	requests      limiters // the other calls, per caller
	streams       streamCounts
	m             *metrics
	audit         *audit.Logger
	tracer        trace.Tracer // nil when tracing is off
	stop          context.CancelFunc
	maxWait       time.Duration // Options.MaxBackoffWithWaiters
	maxRetryAfter time.Duration // Options.MaxRetryAfter
}

// credential is a Credential in force, holding what an idle one needs:
// what serving requests takes beyond that (cache keys, the record of use, the
// retry gate) is made at the first request. With ten thousand credentials,
// most of them idle at any time, that is a few hundred bytes each.
type credential struct {
	Credential
	stats     *credStats
	keysP     atomic.Pointer[credKeys] // made at the first request
	log       *zap.Logger
	capLogged atomic.Bool // the default min_ttl cap was logged
}

// credKeys are a credential's cache keys, made at its first request.
type credKeys struct {
	upstreamID string
	defaultKey string
	ruleScopes map[int]scopeSet // per restricted policy rule: its default scopes and their key
	// hint is the in-process cache slot of defaultKey, found without a map
	// lookup: with many credentials that lookup is most of a cache hit.
	hint atomic.Pointer[slot]
}

// keys returns c's cache keys, making them at the first call.
func (c *credential) keys() *credKeys {
	if k := c.keysP.Load(); k != nil {
		return k
	}
	k := &credKeys{upstreamID: upstreamID(c.TokenURL, c.ClientID, c.EndpointParams)}
	if c.DPoP != nil { // bound tokens never mix with bearer ones of the same registration
		k.upstreamID += "\x00dpop"
	}
	k.defaultKey = cacheKey(c.Name, k.upstreamID, c.Scopes)
	for i, r := range c.Callers.Rules() {
		if len(r.Scopes) > 0 {
			if k.ruleScopes == nil { // most credentials have none: no map
				k.ruleScopes = map[int]scopeSet{}
			}
			s := c.scopesFor(r.Scopes)
			k.ruleScopes[i] = scopeSet{s, k.keyOf(c, s)}
		}
	}
	if !c.keysP.CompareAndSwap(nil, k) {
		return c.keysP.Load()
	}
	return k
}

// keyOf is the cache key of c's sorted scope set s.
func (k *credKeys) keyOf(c *credential, s []string) string {
	if slices.Equal(s, c.Scopes) {
		return k.defaultKey
	}
	return cacheKey(c.Name, k.upstreamID, s)
}

// New returns a Broker for opts.
func New(opts Options) (*Broker, error) {
	if opts.Store == nil {
		return nil, errors.New("broker: Store is required")
	}
	b := &Broker{store: opts.Store, log: opts.Logger, now: opts.Now, m: newMetrics(), audit: opts.Audit,
		invalidations: limiters{rate: invalidateRate, burst: invalidateBurst},
		requests:      limiters{rate: rate.Limit(opts.RateLimit), burst: max(opts.RateBurst, 1)}}
	b.streams.limit = opts.WatchStreams
	if b.streams.limit <= 0 {
		b.streams.limit = DefaultWatchStreams
	}
	if b.log == nil {
		b.log = zap.NewNop()
	}
	b.tracer = opts.Tracer // nil: off
	b.maxWait = cmp.Or(opts.MaxBackoffWithWaiters, DefaultMaxBackoffWithWaiters)
	b.maxRetryAfter = cmp.Or(opts.MaxRetryAfter, DefaultMaxRetryAfter)
	if b.now == nil {
		b.now = time.Now
	}
	if err := b.SetCredentials(opts.Credentials); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.stop = cancel
	if n, ok := b.store.(store.Notifier); ok {
		n.Subscribe(ctx, b.onEvent)
	}
	switch {
	case opts.RefreshInterval == 0:
		go b.refreshLoop(ctx, time.Second)
	case opts.RefreshInterval > 0:
		go b.refreshLoop(ctx, opts.RefreshInterval)
	}
	if opts.CheckInterval >= 0 {
		go b.checkLoop(ctx, cmp.Or(opts.CheckInterval, DefaultCheckInterval))
	}
	return b, nil
}

// EvictLocal drops this process's copies of every token; the next GetToken
// for each reads the shared store (or, with the memory store, fetches anew).
// Tokens in the shared store are untouched.
func (b *Broker) EvictLocal() {
	b.l1.Range(func(k, v any) bool {
		b.forget(k.(string), v.(*slot))
		return true
	})
}

// Close stops the refresher and stops listening to the store's announcements.
func (b *Broker) Close() { b.stop() }

// onEvent reacts to another replica's change: a stored token wakes the callers
// waiting for it; a dropped token leaves this replica's cache too; a
// subscription (re)established checks the cache against the store's
// tombstones, for the invalidations announced while it was down.
func (b *Broker) onEvent(ev store.Event) {
	switch ev.Kind {
	case store.EventResync:
		if b.resyncing.CompareAndSwap(false, true) {
			go func() {
				defer b.resyncing.Store(false)
				b.dropBuried()
			}()
		}
		return
	case store.EventDelete:
		b.drop(ev.Key, ev.Fingerprint)
	}
	b.waiters.wake(ev.Key)
}

// dropBuried drops each cached token the store has a tombstone for: one
// store read per cached key, and no token request unless one was buried.
func (b *Broker) dropBuried() {
	ts, ok := b.store.(store.Tombstones)
	if !ok {
		return
	}
	b.l1.Range(func(k, v any) bool {
		key, e := k.(string), v.(*slot).entry.Load()
		if e == nil {
			return true
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		buried, err := ts.Buried(ctx, key, e)
		cancel()
		if err == nil && buried && b.drop(key, e.Fingerprint) {
			b.log.Info("dropped a token invalidated while the store's announcements were not heard",
				zap.String("fingerprint", e.Fingerprint))
		}
		return true
	})
}

// SetCredentials replaces the credentials atomically. Cached tokens stay
// valid for credentials whose upstream registration and scopes are unchanged;
// a credential's statistics and retry state go on under its name.
func (b *Broker) SetCredentials(cs []Credential) error {
	b.setting.Lock()
	defer b.setting.Unlock()
	var old map[string]*credential
	if p := b.creds.Load(); p != nil {
		old = *p
	}
	m := make(map[string]*credential, len(cs))
	for _, c := range cs {
		if c.Name == "" || c.Fetcher == nil {
			return fmt.Errorf("broker: credential %q needs a name and a Fetcher", c.Name)
		}
		if _, dup := m[c.Name]; dup {
			return fmt.Errorf("broker: credential %q is defined twice", c.Name)
		}
		cr := &credential{Credential: c, log: b.log}
		if !sortedSet(c.Scopes) { // one that is a sorted set already is kept as given
			cr.Scopes = slices.Clone(c.Scopes)
			slices.Sort(cr.Scopes)
			cr.Scopes = slices.Compact(cr.Scopes)
		}
		if cr.Timeout <= 0 {
			cr.Timeout = DefaultTimeout
		}
		if cr.LockTTL <= 0 {
			cr.LockTTL = cr.Timeout + LeaseSlack
		}
		if cr.IdleTimeout <= 0 {
			cr.IdleTimeout = DefaultIdleTimeout
		}
		if prev := old[c.Name]; prev != nil {
			cr.stats = prev.stats // the same credential, reloaded: its history goes on
		} else {
			cr.stats = &credStats{}
		}
		m[c.Name] = cr
	}
	b.creds.Store(&m)
	// A removed credential's counts move to retired: a token still being
	// handed out for it is not counted (its counts are read no more).
	for name, c := range old {
		if _, kept := m[name]; !kept {
			if u := c.stats.useP.Load(); u != nil {
				for j := range u.sources {
					b.retired[j] += u.sources[j].Swap(0)
				}
			}
		}
	}
	// Open streams re-authorize against what was just stored.
	next := make(chan struct{})
	if old := b.changes.Swap(&next); old != nil {
		close(*old)
	}
	// A removed credential stops being served at once (authorize finds it no
	// more) and its tokens leave this process.
	b.forgetRemoved(m)
	return nil
}

// GetToken returns a token for caller that has at least the requested min_ttl left.
func (b *Broker) GetToken(ctx context.Context, caller policy.Identity, req Request) (Issued, error) {
	p, err := b.prepare(caller, req)
	if err == nil {
		err = p.c.checkProof(caller, req.Proof)
	}
	if err != nil {
		return Issued{}, err
	}
	now := b.now() // one clock read for the hit and the inventory's note
	is, err := b.get(ctx, p, now)
	if err != nil {
		// While the token endpoint backs off, a caller that can wait for the
		// next attempt does so, sharing it with the others, rather than be
		// told to retry at the moment the attempt goes.
		if is, err = b.afterBackoff(ctx, caller, req, p, err); err != nil {
			return Issued{}, err
		}
	}
	if is.Source != SourceMemory {
		// Not a hit: the call may have waited on the store or the bank
		// while a reload took the caller's access away.
		np, err := b.readmit(caller, req, p)
		if err == nil {
			err = np.c.checkProof(caller, req.Proof)
		}
		if err != nil {
			return Issued{}, err
		}
		p = np
	}
	if req.Proof != nil {
		if is, err = b.prove(ctx, p, is, req.Proof); err != nil {
			return Issued{}, err
		}
	}
	p.c.stats.use().noteIssued(caller, now)
	return is, nil
}

// readmit returns p, or p admitted anew when the credentials or the policy
// changed since it was.
func (b *Broker) readmit(caller policy.Identity, req Request, p prepared) (prepared, error) {
	select {
	case <-p.changes:
		return b.admit(caller, req)
	default:
		return p, nil
	}
}

// afterBackoff waits for the gate's next attempt and tries again when err
// says the token endpoint backs off and ctx can wait that long.
func (b *Broker) afterBackoff(ctx context.Context, caller policy.Identity, req Request, p prepared, err error) (Issued, error) {
	var ce *closedError
	if errors.As(err, &ce) && mayWait(ctx, ce) {
		g := b.gate(p.c)
		g.waiting.Add(1)
		werr := g.await(ctx, ce, b.now)
		g.waiting.Add(-1)
		if werr != nil {
			return Issued{}, werr
		}
		// The wait may be long (a Retry-After): the caller is admitted
		// again, under the configuration in force, before anything is fetched.
		if p, err = b.readmit(caller, req, p); err != nil {
			return Issued{}, err
		}
		return b.get(ctx, p, b.now())
	}
	return Issued{}, err
}

// prepared is a checked request.
type prepared struct {
	c         *credential
	scopes    []string
	key       string
	minTTL    time.Duration   // what this get needs
	demand    time.Duration   // what the caller asked; Watch raises minTTL, not this
	defaulted bool            // the caller asked for none: minTTL is the credential's, capped per token
	changes   <-chan struct{} // closed when the credentials or policy it was admitted under change
}

// policyChanges returns a channel that is closed at the next SetCredentials.
func (b *Broker) policyChanges() <-chan struct{} { return *b.changes.Load() }

// want is what this get asks of a token.
func (p prepared) want() want { return want{minTTL: p.minTTL, defaulted: p.defaulted} }

// prepare checks a request, the caller's right to it and the caller's rate.
func (b *Broker) prepare(caller policy.Identity, req Request) (prepared, error) {
	if !b.requests.allow(caller) {
		return prepared{}, fmt.Errorf("%w: caller %s is over its rate limit; slow down", ErrResourceExhausted, caller)
	}
	return b.admit(caller, req)
}

// admit checks a request and the caller's right to it under the credentials
// and policy in force.
func (b *Broker) admit(caller policy.Identity, req Request) (prepared, error) {
	changes := b.policyChanges() // before the credentials are read
	c, grant, err := b.authorize(caller, req.Credential)
	if err != nil {
		return prepared{}, err
	}
	scopes, key, err := c.resolve(caller, grant, req.Scopes)
	if err != nil {
		return prepared{}, err
	}
	if req.MinTTLInvalid {
		return prepared{}, fmt.Errorf("%w: min_ttl is not a valid duration", ErrInvalidArgument)
	}
	minTTL, defaulted := c.MinTTL, !req.MinTTLSet
	if req.MinTTLSet {
		if req.MinTTL < 0 || req.MinTTL > config.MaxMinTTL {
			return prepared{}, fmt.Errorf("%w: min_ttl must be between 0s and 24h, got %s", ErrInvalidArgument, req.MinTTL)
		}
		minTTL = req.MinTTL
	}
	return prepared{c: c, scopes: scopes, key: key, minTTL: minTTL, demand: minTTL, defaulted: defaulted, changes: changes}, nil
}

// get serves a prepared request from the in-process cache, as of now, or
// obtains a token.
func (b *Broker) get(ctx context.Context, p prepared, now time.Time) (Issued, error) {
	w := p.want()
	if s := b.lookup(p); s != nil {
		e := s.entry.Load()
		if e == nil {
			s.touch(now, 0)
		} else {
			lt := e.Lifetime()
			minTTL, demand := p.minTTL, p.demand
			if p.defaulted {
				minTTL = w.of(p.c, lt)
				demand = minTTL
			}
			if demand > p.c.plannable(lt) {
				demand = 0 // more than a refresh can give: served within the bound on fetches ahead of schedule only
			}
			s.touch(now, demand)
			if left := e.Expiry.Sub(now); left > 0 && left >= minTTL {
				p.c.stats.use().sources[fromMemory].Add(1)
				return Issued{Entry: e, Source: SourceMemory}, nil
			}
			// The last token shows what the server grants; asking it again for a
			// lifetime it does not give would only add load on the bank.
			if lt < minTTL {
				return Issued{}, lifetimeTooShort(p.c.Name, minTTL, lt)
			}
		}
	}
	// This caller waits for a token: the gate keeps its backoff short.
	g := b.gate(p.c)
	g.waiting.Add(1)
	defer g.waiting.Add(-1)
	return b.obtain(ctx, p.c, p.key, p.scopes, w)
}

// authorize checks the request's credential name and the caller's right to it.
// An unknown credential and a forbidden one give the same error, so callers
// cannot probe which credentials exist.
func (b *Broker) authorize(caller policy.Identity, name string) (*credential, policy.Grant, error) {
	if name == "" {
		return nil, policy.Grant{}, fmt.Errorf("%w: credential is required", ErrInvalidArgument)
	}
	if !config.ValidName(name) {
		return nil, policy.Grant{}, fmt.Errorf("%w: credential must be 1 to %d characters of A-Z a-z 0-9 . _ -", ErrInvalidArgument, config.MaxNameLen)
	}
	if c := (*b.creds.Load())[name]; c != nil {
		if g, ok := c.Callers.Grant(caller); ok {
			return c, g, nil
		}
	}
	return nil, policy.Grant{}, fmt.Errorf("%w: caller %s may not use credential %q", ErrPermissionDenied, caller, name)
}

// sortedSet reports whether s is sorted with no duplicates.
func sortedSet(s []string) bool {
	for i := 1; i < len(s); i++ {
		if s[i-1] >= s[i] {
			return false
		}
	}
	return true
}

// scopeSet is a sorted scope set and its cache key.
type scopeSet struct {
	scopes []string
	key    string
}

// scopesFor returns the credential's scopes that are also in allowed.
func (c *credential) scopesFor(allowed []string) []string {
	var s []string
	for _, sc := range c.Scopes {
		if slices.Contains(allowed, sc) {
			s = append(s, sc)
		}
	}
	if slices.Equal(s, c.Scopes) {
		return c.Scopes
	}
	return s
}

// resolve returns the sorted scope set of a request and its cache key. An
// empty request means every scope the caller may use.
func (c *credential) resolve(caller policy.Identity, g policy.Grant, req []string) ([]string, string, error) {
	k := c.keys()
	if len(req) == 0 {
		switch {
		case g.Scopes == nil:
			return c.Scopes, k.defaultKey, nil
		case g.Rule >= 0:
			rs := k.ruleScopes[g.Rule]
			return rs.scopes, rs.key, nil
		default:
			s := c.scopesFor(g.Scopes)
			return s, k.keyOf(c, s), nil
		}
	}
	if len(req) > config.MaxScopes {
		return nil, "", fmt.Errorf("%w: at most %d scopes", ErrInvalidArgument, config.MaxScopes)
	}
	for _, s := range req {
		if len(s) > config.MaxScopeLen {
			return nil, "", fmt.Errorf("%w: a scope is longer than %d characters", ErrInvalidArgument, config.MaxScopeLen)
		}
		// One answer whether the scope exists or is only not granted, so
		// that a caller cannot enumerate the credential's scopes.
		if _, in := slices.BinarySearch(c.Scopes, s); !in || g.Scopes != nil && !slices.Contains(g.Scopes, s) {
			return nil, "", fmt.Errorf("%w: caller %s may not use scope %q of credential %q", ErrPermissionDenied, caller, s, c.Name)
		}
	}
	scopes := slices.Clone(req)
	slices.Sort(scopes)
	scopes = slices.Compact(scopes)
	if slices.Equal(scopes, c.Scopes) {
		return c.Scopes, k.defaultKey, nil
	}
	return scopes, cacheKey(c.Name, k.upstreamID, scopes), nil
}

// usable reports whether e has at least minTTL left. A token is never served
// at or past its expiry, even with a zero min_ttl.
func (b *Broker) usable(e *store.Entry, minTTL time.Duration) bool {
	left := e.Expiry.Sub(b.now())
	return left > 0 && left >= minTTL
}

// Record writes an audit event and counts it. Its error matters only when
// the audit trail is fail-closed.
func (b *Broker) Record(e audit.Event) error {
	if c := b.m.auditEvents[e.Event]; c != nil { // not looked up by its label on every call
		c.Inc()
	} else {
		// A copy, so that e's strings do not escape (and its caller's
		// request ID can stay on the stack).
		b.m.audit.WithLabelValues(strings.Clone(e.Event)).Inc()
	}
	return b.audit.Write(e)
}

// storeFailed counts a failed store operation, including those refused
// fast while the store is down.
func (b *Broker) storeFailed(op string, err error) {
	if err != nil {
		b.m.storeErrors.WithLabelValues(op).Inc()
	}
}

// gate returns the retry gate of credential c, making it at its first use.
func (b *Broker) gate(c *credential) *gate {
	st := c.stats
	if g := st.gateP.Load(); g != nil {
		return g
	}
	// Made at the credential's first fetch: an idle credential has none.
	st.gateP.CompareAndSwap(nil, &gate{maxWait: b.maxWait, maxRetryAfter: b.maxRetryAfter})
	return st.gateP.Load()
}

// Health returns the upstream state of every credential.
func (b *Broker) Health() map[string]CredentialHealth {
	out := map[string]CredentialHealth{}
	for name, c := range *b.creds.Load() {
		out[name] = b.health(c)
	}
	return out
}

// CredentialInfo describes a credential a caller may use.
type CredentialInfo struct {
	// Name is the credential name.
	Name string
	// Scopes are the scopes the caller may ask for.
	Scopes []string
}

// ListCredentials returns the credentials caller may use, sorted by name.
func (b *Broker) ListCredentials(caller policy.Identity) ([]CredentialInfo, error) {
	if !b.requests.allow(caller) {
		return nil, fmt.Errorf("%w: caller %s is over its rate limit; slow down", ErrResourceExhausted, caller)
	}
	var out []CredentialInfo
	for _, c := range *b.creds.Load() {
		if g, ok := c.Callers.Grant(caller); ok {
			scopes := c.Scopes
			if g.Scopes != nil {
				scopes = c.scopesFor(g.Scopes)
			}
			out = append(out, CredentialInfo{Name: c.Name, Scopes: slices.Clone(scopes)})
		}
	}
	slices.SortFunc(out, func(a, b CredentialInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// noSpan is the span of the work of a broker that does not trace.
var noSpan = trace.SpanFromContext(context.Background())

// span starts a span named name for credential c when tracing is on; off,
// it returns ctx and a span that records nothing, without allocating.
func (b *Broker) span(ctx context.Context, name string, c *credential) (context.Context, trace.Span) {
	if b.tracer == nil {
		return ctx, noSpan
	}
	return b.tracer.Start(ctx, name, trace.WithAttributes(attribute.String("tokenbroker.credential", c.Name)))
}
