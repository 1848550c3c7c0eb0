package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

// The fetch path: what runs when the in-process cache cannot serve a call.
// One flight per cache key in this process (single flight), one lease per
// cache key across replicas, the credential's gate in front of the token
// endpoint, and the store written before the token is served.

type flight struct {
	entry  *store.Entry
	source string
}

// obtain gets a token from the store or the authorization server, sharing one
// fetch among all concurrent callers of the same key. The fetch is not bound
// to the first caller's context, so one caller giving up does not fail the
// others; each caller waits only as long as its own context allows.
func (b *Broker) obtain(ctx context.Context, c *credential, key string, scopes []string, w want) (Issued, error) {
	// A joiner may get a result that satisfied the min_ttl of the caller that
	// started the flight but not its own; it then tries once more.
	for range 2 {
		ch := b.flights.DoChan(key, func() (any, error) {
			return b.refresh(context.WithoutCancel(ctx), c, key, scopes, w)
		})
		var r singleflight.Result
		select {
		case <-ctx.Done():
			return Issued{}, ctx.Err()
		case r = <-ch:
		}
		if r.Err != nil {
			return Issued{}, r.Err
		}
		f := r.Val.(flight)
		minTTL := w.of(c, f.entry.Lifetime())
		if b.usable(f.entry, minTTL) {
			c.stats.use().source(f.source)
			return Issued{Entry: f.entry, Source: f.source}, nil
		}
		if f.source == SourceUpstream {
			if lt := f.entry.Lifetime(); lt < minTTL {
				return Issued{}, lifetimeTooShort(c.Name, minTTL, lt)
			}
		}
	}
	return Issued{}, fmt.Errorf("%w: no token for credential %q with min_ttl %s left could be had; retry", ErrUnavailable, c.Name, w.minTTL)
}

func lifetimeTooShort(name string, minTTL, lifetime time.Duration) error {
	return fmt.Errorf("%w: min_ttl %s is longer than the %s lifetime the authorization server grants for credential %q",
		ErrFailedPrecondition, minTTL, lifetime, name)
}

// refresh runs once per flight. Across replicas, a lease in the store lets one
// replica fetch while the others wait for its result; when the store is
// unreachable this replica fetches on its own (fail-open).
func (b *Broker) refresh(ctx context.Context, c *credential, key string, scopes []string, w want) (flight, error) {
	// Long enough to wait out a dead holder's lease (LockTTL), for the
	// replica that takes over to fetch (up to LockTTL), and, past the
	// overrun bound below, to fetch without the lease.
	ctx, cancel := context.WithTimeout(ctx, 3*c.LockTTL)
	defer cancel()
	if f, _, ok := b.fromStore(ctx, c, key, scopes, w); ok {
		return f, nil
	}
	owner := newOwner()
	var waitStart time.Time
	defer func() {
		if !waitStart.IsZero() {
			b.m.lockWait.Observe(time.Since(waitStart).Seconds())
		}
	}()
	for {
		err := b.store.Lock(ctx, key, owner, c.LockTTL)
		switch {
		case err == nil:
			defer func() { _ = b.store.Unlock(context.WithoutCancel(ctx), key, owner) }()
			// Another replica may have stored a token between the read and the lease.
			f, cur, ok := b.fromStore(ctx, c, key, scopes, w)
			if ok {
				return f, nil
			}
			return b.fetchUnlessAhead(ctx, c, key, scopes, cur, w)
		case errors.Is(err, store.ErrLocked):
			// A lease that a dead holder left expires within LockTTL, and the
			// replica that takes it over stores a token within another
			// LockTTL; refused for longer than both, the lease is not a
			// replica's: someone keeps rewriting it. Fetch without it, as
			// during a Redis outage.
			if !waitStart.IsZero() && time.Since(waitStart) > 2*c.LockTTL {
				c.stats.use().overruns.Add(1)
				b.log.Warn("waited longer than the lease bound for another replica's fetch; fetching without the lease",
					zap.String("credential", c.Name), zap.Duration("lease_bound", c.LockTTL))
				return b.fetchUnlessAhead(ctx, c, key, scopes, nil, w)
			}
			if waitStart.IsZero() {
				waitStart = time.Now()
				_, span := b.span(ctx, "tokenbroker.lease.wait", c)
				defer span.End() // until this flight has its token, another replica's or its own
			}
			wake := b.waiters.wait(key)
			t := time.NewTimer(pollInterval)
			select {
			case <-wake:
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return flight{}, fmt.Errorf("%w: another replica's fetch for credential %q did not finish in time; retry", ErrUnavailable, c.Name)
			}
			t.Stop()
			if f, _, ok := b.fromStore(ctx, c, key, scopes, w); ok {
				return f, nil
			}
			// No result yet: the holder is still fetching, failed, or died; try the lease again.
		default:
			b.storeFailed("lock", err)
			b.log.Debug("store lock failed; fetching without it", zap.String("credential", c.Name), zap.Error(err))
			return b.fetchUnlessAhead(ctx, c, key, scopes, nil, w)
		}
	}
}

// fromStore returns the stored token for key if it has what w asks left;
// it returns the stored token either way, or nil.
func (b *Broker) fromStore(ctx context.Context, c *credential, key string, scopes []string, w want) (flight, *store.Entry, bool) {
	ctx, span := b.span(ctx, "tokenbroker.store.get", c)
	defer span.End()
	e, err := b.store.Get(ctx, key)
	if span.IsRecording() {
		span.SetAttributes(attribute.String("tokenbroker.store", b.store.Name()), attribute.Bool("tokenbroker.found", err == nil))
	}
	switch {
	case err == nil && b.usable(e, w.of(c, e.Lifetime())) && b.keep(key, c, scopes, e):
		return flight{entry: e, source: b.store.Name()}, e, true
	case err == nil:
		return flight{}, e, false
	case !errors.Is(err, store.ErrNotFound):
		b.storeFailed("get", err)
		b.log.Debug("store get failed", zap.String("credential", c.Name), zap.Error(err))
	}
	return flight{}, nil, false
}

// checkAhead refuses a caller's fetch that would come ahead of key's
// refresh schedule too soon after the last one (see aheadOfSchedule); cur is
// the stored token, if any. The newest token this replica knows decides.
//
// A newest token that meets w after all (this process got it while the
// flight began, from another replica or its own refresher) is returned
// instead of a refusal, to be served.
func (b *Broker) checkAhead(c *credential, key string, cur *store.Entry, w want) (*store.Entry, error) {
	if w.refresh {
		return nil, nil
	}
	var s *slot
	if v, ok := b.l1.Load(key); ok {
		s = v.(*slot)
		if e := s.entry.Load(); e != nil && (cur == nil || e.Expiry.After(cur.Expiry)) {
			cur = e
		}
	}
	if !b.aheadOfSchedule(c, s, cur, b.now()) {
		return nil, nil
	}
	lt := cur.Lifetime()
	if b.usable(cur, w.of(c, lt)) {
		return cur, nil
	}
	return nil, tooSoon(c, w.of(c, lt), lt)
}

// fetchUnlessAhead fetches, unless the fetch would be ahead of schedule: then
// it returns the newest token if that meets w, or the refusal.
func (b *Broker) fetchUnlessAhead(ctx context.Context, c *credential, key string, scopes []string, cur *store.Entry, w want) (flight, error) {
	e, err := b.checkAhead(c, key, cur, w)
	switch {
	case err != nil:
		return flight{}, err
	case e != nil:
		return flight{entry: e, source: SourceMemory}, nil
	}
	return b.fetch(ctx, c, key, scopes)
}

// fetch gets a new token from the authorization server, if the credential's
// gate lets it, and stores it.
func (b *Broker) fetch(ctx context.Context, c *credential, key string, scopes []string) (flight, error) {
	g := b.gate(c)
	if err := g.admit(b.now(), c.LockTTL); err != nil {
		return flight{}, err
	}
	start := b.now()
	began := time.Now() // real time for the histogram, whatever the clock seam says
	ctx, span := b.span(ctx, "tokenbroker.token_endpoint", c)
	defer span.End()
	t, err := c.Fetcher.Fetch(ctx, scopes)
	use := c.stats.use()
	b.m.upstreamDur.WithLabelValues(endpointOf(c.TokenURL)).Observe(time.Since(began).Seconds())
	if err != nil {
		berr := b.upstreamFailed(c, err)
		var ue *upstream.Error
		outcome := "error"
		if errors.As(err, &ue) {
			outcome = string(ue.Reason)
		}
		use.failed(outcome)
		if span.IsRecording() {
			span.SetAttributes(attribute.String("tokenbroker.outcome", outcome))
			span.SetStatus(otelcodes.Error, outcome)
		}
		use.lastFetch.Store(&FetchRecord{Time: b.now(), Outcome: outcome})
		_ = b.Record(audit.Event{Event: audit.UpstreamFetch, Credential: c.Name, Scopes: scopes, Outcome: "error", Reason: outcome})
		g.failed(b.now(), berr, ue)
		return flight{}, berr
	}
	use.ok.Add(1)
	if span.IsRecording() {
		span.SetAttributes(attribute.String("tokenbroker.outcome", "ok"), attribute.String("tokenbroker.fingerprint", Fingerprint(t.AccessToken)))
	}
	use.lastFetch.Store(&FetchRecord{Time: b.now(), Outcome: "ok"})
	if c.Secrets > 1 {
		use.secretUsed(t.SecretIndex)
	}
	if t.SecretIndex > 0 {
		b.log.Warn("an older client secret worked; the first in client_secret_files was refused (is the rotation done at the bank?)",
			zap.String("credential", c.Name), zap.Int("secret_index", t.SecretIndex))
	}
	g.succeeded()
	b.noteSuccess(c.stats)
	e := &store.Entry{
		AccessToken: t.AccessToken,
		TokenType:   t.TokenType,
		Scopes:      t.Scopes,
		IssuedAt:    t.IssuedAt,
		Expiry:      t.Expiry,
		Fingerprint: Fingerprint(t.AccessToken),
		JKT:         t.JKT,
	}
	if _, err := b.store.PutIfNewer(ctx, key, e); err != nil {
		b.storeFailed("put", err)
		b.log.Debug("store put failed", zap.String("credential", c.Name), zap.Error(err))
	}
	b.keep(key, c, scopes, e) // new, so never revoked
	_ = b.Record(audit.Event{Event: audit.UpstreamFetch, Credential: c.Name, Scopes: e.Scopes, Source: SourceUpstream,
		Fingerprint: e.Fingerprint, ExpireTime: e.Expiry, Outcome: "ok"})
	b.log.Info("token fetched",
		zap.String("credential", c.Name),
		zap.Strings("scopes", e.Scopes),
		zap.String("fingerprint", e.Fingerprint),
		zap.Time("expire_time", e.Expiry),
		zap.Duration("took", b.now().Sub(start)))
	return flight{entry: e, source: SourceUpstream}, nil
}

// newOwner returns a unique lease owner token.
func newOwner() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// upstreamFailed logs a failed fetch and turns it into a Broker error. The
// message names the failure class only: never the response body.
func (b *Broker) upstreamFailed(c *credential, err error) error {
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		b.log.Error("token fetch failed", zap.String("credential", c.Name), zap.Error(err))
		return fmt.Errorf("%w: token endpoint for credential %q failed; retry", ErrUnavailable, c.Name)
	}
	b.log.Warn("token fetch failed",
		zap.String("credential", c.Name),
		zap.String("reason", string(ue.Reason)),
		zap.String("oauth_error", ue.Code),
		zap.Int("http_status", ue.StatusCode),
		zap.String("oauth_error_description", ue.Description),
		zap.Error(ue))
	what := string(ue.Reason)
	if ue.Code != "" {
		what = ue.Code
	}
	switch {
	case ue.Temporary:
		return fmt.Errorf("%w: token endpoint for credential %q is failing (%s) and no cached token has the min_ttl asked for left; retry",
			ErrUnavailable, c.Name, what)
	case ue.Reason == upstream.ReasonNoSecret:
		return fmt.Errorf("%w: the broker cannot use the client secret or key of credential %q (%s)", ErrFailedPrecondition, c.Name, what)
	case ue.Reason == upstream.ReasonScopeNotGranted:
		return fmt.Errorf("%w: token endpoint granted fewer scopes than asked for credential %q (%s)", ErrFailedPrecondition, c.Name, what)
	case ue.Reason == upstream.ReasonRedirect:
		return fmt.Errorf("%w: token endpoint of credential %q answered with a redirect (HTTP %d) to %s, which the broker never follows; token_url must be the token endpoint itself",
			ErrFailedPrecondition, c.Name, ue.StatusCode, ue.Location)
	case ue.Reason == upstream.ReasonTokenType:
		return fmt.Errorf("%w: token endpoint issued a token that is not Bearer for credential %q (%s)", ErrFailedPrecondition, c.Name, what)
	default:
		return fmt.Errorf("%w: token endpoint refused credential %q (%s); the broker's registration needs attention",
			ErrFailedPrecondition, c.Name, what)
	}
}
