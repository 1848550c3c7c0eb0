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
// what callers ask of it, and when a caller last asked for it.
type slot struct {
	entry      atomic.Pointer[store.Entry] // nil after an invalidation
	jitter     atomic.Uint32               // the current token's refresh jitter, a fraction of 2³²
	lastUsed   atomic.Int64                // Unix seconds
	demandCur  atomic.Int64                // the largest min_ttl asked of the current token, in nanoseconds
	demandPrev atomic.Int64                // the same for the token before it
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
		cur := s.demandCur.Load()
		if int64(minTTL) <= cur || s.demandCur.CompareAndSwap(cur, int64(minTTL)) {
			return
		}
	}
}

// idle reports whether the refresher leaves s alone at now: no open
// WatchToken stream and no caller asked for it within its credential c's
// idle timeout (or c is gone).
func (s *slot) idle(c *credential, now time.Time) bool {
	return c == nil || s.watchers.Load() == 0 && now.Sub(time.Unix(s.lastUsed.Load(), 0)) > c.IdleTimeout
}

// refreshPoint is when the refresher replaces e, the token of s of
// credential c: for the demand recorded on s and the jitter drawn for e.
func (s *slot) refreshPoint(c *credential, e *store.Entry) time.Time {
	return c.refreshPoint(e, s.demand(), float64(s.jitter.Load())/(1<<32))
}

// isRevoked reports whether fp is the token last invalidated on s.
func (s *slot) isRevoked(fp string) bool {
	r := s.revoked.Load()
	return r != nil && *r == fp
}

// lookup returns the slot for p's key, if there is one. A credential's
// default scope set (nearly every call) is found through its hint.
func (b *Broker) lookup(p prepared) *slot {
	k := p.c.keys()
	isDefault := p.key == k.defaultKey
	if isDefault {
		if s := k.hint.Load(); s != nil && !s.gone.Load() {
			return s
		}
	}
	v, ok := b.l1.Load(p.key)
	if !ok {
		return nil
	}
	s := v.(*slot)
	if isDefault {
		k.hint.Store(s)
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
// draws its refresh jitter, starts a new period of demand (the largest
// min_ttl asked counts for this token and the next), and wakes whoever waits
// for a change of key. It
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
			s.jitter.Store(rand.Uint32())
			s.demandPrev.Store(s.demandCur.Swap(0))
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

// RefreshDue replaces every cached token past its refresh point whose key a
// caller asked for within its credential's idle timeout, and waits for the
// replacements. Tokens nobody asks for are left to expire, and their slots
// are forgotten. With a shared store only one replica fetches: the others
// find the newer token there.
func (b *Broker) RefreshDue(ctx context.Context) {
	b.refreshDue(ctx).Wait()
}

// refreshDue starts the refreshes RefreshDue makes and returns what to wait
// on for them. A key whose refresh still runs is left to it.
func (b *Broker) refreshDue(ctx context.Context) *sync.WaitGroup {
	now := b.now()
	creds := *b.creds.Load()
	var wg sync.WaitGroup
	b.l1.Range(func(k, v any) bool {
		key, s := k.(string), v.(*slot)
		c := creds[s.cred]
		e := s.entry.Load()
		idle := s.idle(c, now)
		switch {
		case idle && (e == nil || !now.Before(e.Expiry)):
			b.forget(key, s)
			return true
		case idle, e == nil, now.Before(s.refreshPoint(c, e)):
			return true
		case !s.refreshing.CompareAndSwap(false, true):
			return true // the previous refresh of this key is still running
		}
		wg.Go(func() {
			defer s.refreshing.Store(false)
			// Anything with more time left than the current token will do.
			if _, err := b.obtain(ctx, c, key, s.scopes, want{minTTL: e.Expiry.Sub(now) + time.Second, refresh: true}); err != nil {
				b.log.Debug("refresh ahead failed; the current token is still served",
					zap.String("credential", c.Name), zap.Error(err))
			}
		})
		return true
	})
	return &wg
}

// refreshLoop starts the due refreshes every interval until ctx ends,
// without waiting for them: a refresh that hangs on its token endpoint (up
// to its timeout, or on another replica's lease) holds back no other key's.
func (b *Broker) refreshLoop(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.refreshDue(ctx)
		}
	}
}
