package broker

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/store"
)

// slot is the in-process cache entry for one cache key: the current token,
// when it should be replaced, and when a caller last asked for it.
type slot struct {
	entry      atomic.Pointer[store.Entry] // nil after an invalidation
	refreshAt  atomic.Int64                // Unix nanoseconds
	lastUsed   atomic.Int64                // Unix seconds
	minTTL     atomic.Int64                // the largest min_ttl asked, in nanoseconds
	refreshing atomic.Bool
	watchers   atomic.Int32           // open WatchToken streams on this key
	gone       atomic.Bool            // removed from the in-process cache
	revoked    atomic.Pointer[string] // fingerprint of the last token invalidated
	cred       string
	scopes     []string
}

// touch records demand: when, and the largest min_ttl asked. It writes at
// most once a second per key, and min_ttl only when it grows, so the hit path
// does not bounce a cache line between cores on every call.
func (s *slot) touch(now time.Time, minTTL time.Duration) {
	if sec := now.Unix(); s.lastUsed.Load() != sec {
		s.lastUsed.Store(sec)
	}
	for {
		cur := s.minTTL.Load()
		if int64(minTTL) <= cur || s.minTTL.CompareAndSwap(cur, int64(minTTL)) {
			return
		}
	}
}

// isRevoked reports whether fp is the token last invalidated on s.
func (s *slot) isRevoked(fp string) bool {
	r := s.revoked.Load()
	return r != nil && *r == fp
}

// lookup returns the slot for p's key, if there is one. A credential's
// default scope set (nearly every call) is found through its hint.
func (b *Broker) lookup(p prepared) *slot {
	isDefault := p.key == p.c.defaultKey
	if isDefault {
		if s := p.c.hint.Load(); s != nil && !s.gone.Load() {
			return s
		}
	}
	v, ok := b.l1.Load(p.key)
	if !ok {
		return nil
	}
	s := v.(*slot)
	if isDefault {
		p.c.hint.Store(s)
	}
	return s
}

// forget removes slot s of key from the in-process cache; hints to it are
// marked stale first. (A slot is stored once, so afterwards it is gone either
// way.)
func (b *Broker) forget(key string, s *slot) {
	s.gone.Store(true)
	b.l1.CompareAndDelete(key, s)
}

// slotFor returns the slot for key, creating it.
func (b *Broker) slotFor(key string, c *credential, scopes []string) *slot {
	if v, ok := b.l1.Load(key); ok {
		return v.(*slot)
	}
	s := &slot{cred: c.Name, scopes: scopes}
	s.lastUsed.Store(b.now().Unix())
	v, _ := b.l1.LoadOrStore(key, s)
	return v.(*slot)
}

// keep makes e the cached token for key unless a later-expiring one is there,
// schedules its refresh, and wakes whoever waits for a change of key. It
// reports false, keeping nothing, when e was invalidated: a read of the store
// that raced the invalidation must not bring the token back.
func (b *Broker) keep(key string, c *credential, scopes []string, e *store.Entry) bool {
	s := b.slotFor(key, c, scopes)
	if s.isRevoked(e.Fingerprint) {
		return false
	}
	for {
		cur := s.entry.Load()
		if cur != nil && !e.Expiry.After(cur.Expiry) {
			return true
		}
		if s.entry.CompareAndSwap(cur, e) {
			s.refreshAt.Store(refreshPoint(e, c.RefreshAt, max(c.MinTTL, time.Duration(s.minTTL.Load()))).UnixNano())
			b.waiters.wake(key)
			return true
		}
	}
}

// drop removes the cached token for key if it has fingerprint fp.
func (b *Broker) drop(key, fp string) bool {
	v, ok := b.l1.Load(key)
	if !ok {
		return false
	}
	s := v.(*slot)
	s.revoked.Store(&fp)
	cur := s.entry.Load()
	if cur == nil || cur.Fingerprint != fp || !s.entry.CompareAndSwap(cur, nil) {
		return false
	}
	b.waiters.wake(key)
	return true
}

// refreshPoint is when a token should be replaced, jittered so that keys do
// not refresh in step. With a fraction frac: after frac ±0.1 of its lifetime.
// Without: late, so that the bank sees about one request per lifetime, yet
// with RefreshLead (at least; up to a quarter more) of retries before the
// token falls below minTTL; short tokens after at most 60% of their lifetime.
func refreshPoint(e *store.Entry, frac float64, minTTL time.Duration) time.Time {
	lt := e.Lifetime()
	if frac > 0 {
		f := min(max(frac+rand.Float64()*0.2-0.1, 0.1), 0.95)
		return e.IssuedAt.Add(time.Duration(f * float64(lt)))
	}
	lead := min(max(minTTL+RefreshLead, lt/20), lt*2/5)
	lead += time.Duration(rand.Float64() * float64(lead) / 4)
	return e.Expiry.Add(-lead)
}

// RefreshDue replaces every cached token past its refresh point whose key a
// caller asked for within its credential's idle timeout, and waits for the
// replacements. Tokens nobody asks for are left to expire, and their slots
// are forgotten. With a shared store only one replica fetches: the others
// find the newer token there.
func (b *Broker) RefreshDue(ctx context.Context) {
	now := b.now()
	creds := *b.creds.Load()
	var wg sync.WaitGroup
	b.l1.Range(func(k, v any) bool {
		key, s := k.(string), v.(*slot)
		c := creds[s.cred]
		e := s.entry.Load()
		idle := c == nil || s.watchers.Load() == 0 && now.Sub(time.Unix(s.lastUsed.Load(), 0)) > c.IdleTimeout
		switch {
		case idle && (e == nil || !now.Before(e.Expiry)):
			b.forget(key, s)
			return true
		case idle, e == nil, now.UnixNano() < s.refreshAt.Load():
			return true
		case !s.refreshing.CompareAndSwap(false, true):
			return true // the previous refresh of this key is still running
		}
		wg.Go(func() {
			defer s.refreshing.Store(false)
			// Anything with more time left than the current token will do.
			if _, err := b.obtain(ctx, c, key, s.scopes, e.Expiry.Sub(now)+time.Second); err != nil {
				b.log.Debug("refresh ahead failed; the current token is still served",
					zap.String("credential", c.Name), zap.Error(err))
			}
		})
		return true
	})
	wg.Wait()
}

// refreshLoop runs RefreshDue every interval until ctx ends.
func (b *Broker) refreshLoop(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.RefreshDue(ctx)
		}
	}
}
