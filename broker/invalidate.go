package broker

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"golang.org/x/time/rate"

	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Invalidation limits per caller: a resource server rejecting tokens is rare,
// and each invalidation can cost a request to the bank.
const (
	invalidateRate  = rate.Limit(1) // per second, sustained
	invalidateBurst = 10
)

// InvalidateRequest reports a token that a resource server rejected.
type InvalidateRequest struct {
	// Credential and Scopes name the cache entry, as in GetToken.
	Credential string
	Scopes     []string
	// Fingerprint is the rejected token's fingerprint.
	Fingerprint string
}

// Invalidate drops the token with the request's fingerprint if it is still
// the current one for its credential and scopes, here and (through the
// store's announcements) on every replica, so that exactly one refresh
// follows. It reports whether it dropped anything; a token already replaced
// is left alone and no fetch follows.
func (b *Broker) Invalidate(ctx context.Context, caller policy.Identity, req InvalidateRequest) (bool, error) {
	p, err := b.prepare(caller, Request{Credential: req.Credential, Scopes: req.Scopes})
	if err != nil {
		return false, err
	}
	c, key := p.c, p.key
	if !validFingerprint(req.Fingerprint) {
		return false, fmt.Errorf("%w: fingerprint must be 32 lowercase hex digits", ErrInvalidArgument)
	}
	if !b.invalidations.allow(caller) {
		return false, fmt.Errorf("%w: too many invalidations from caller %s; slow down", ErrResourceExhausted, caller)
	}
	// Revoked first, then deleted from the store, then dropped here: a
	// concurrent read of the store cannot bring the token back in between.
	fp := req.Fingerprint
	b.slotFor(key, c, p.scopes).revoked.Store(&fp)
	deleted, err := b.store.DeleteIfCurrent(ctx, key, fp)
	if err != nil {
		b.storeFailed("delete", err)
		b.log.Debug("store delete failed", zap.String("credential", c.Name), zap.Error(err))
	}
	dropped := b.drop(key, fp)
	outcome := "not_current"
	if dropped || deleted {
		outcome = "invalidated"
		b.log.Info("token invalidated", zap.String("credential", c.Name), zap.String("caller", string(caller)),
			zap.String("fingerprint", req.Fingerprint))
	}
	_ = b.Record(audit.Event{Event: audit.TokenInvalidated, RequestID: RequestID(ctx), Caller: string(caller),
		Credential: c.Name, Scopes: p.scopes, Fingerprint: req.Fingerprint, Outcome: outcome})
	return dropped || deleted, nil
}

func validFingerprint(s string) bool {
	if len(s) != 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// limiters holds a token bucket per caller, forgetting callers idle for
// long. A zero rate means no limit. The lookup takes no lock shared between
// callers: it is on the path of every GetToken.
type limiters struct {
	rate  rate.Limit
	burst int

	m         sync.Map     // policy.Identity → *limiter
	nextSweep atomic.Int64 // Unix seconds
}

type limiter struct {
	*rate.Limiter
	last atomic.Int64 // Unix seconds of the last call
}

const limiterIdle = 10 * 60 // seconds after which an idle caller's bucket is dropped

func (l *limiters) allow(id policy.Identity) bool {
	if l.rate == 0 {
		return true
	}
	now := time.Now()
	sec := now.Unix()
	v, ok := l.m.Load(id)
	if !ok {
		v, _ = l.m.LoadOrStore(id, &limiter{Limiter: rate.NewLimiter(l.rate, l.burst)})
	}
	lim := v.(*limiter)
	if lim.last.Load() != sec {
		lim.last.Store(sec)
	}
	if next := l.nextSweep.Load(); sec >= next && l.nextSweep.CompareAndSwap(next, sec+limiterIdle) {
		l.m.Range(func(k, v any) bool {
			if sec-v.(*limiter).last.Load() > limiterIdle {
				l.m.CompareAndDelete(k, v)
			}
			return true
		})
	}
	return lim.AllowN(now, 1)
}
