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
	refreshing atomic.Bool
	watchers   atomic.Int32 // open WatchToken streams on this key
	cred       string
	scopes     []string
}

// touch records demand; it writes at most once a second per key, so the hit
// path does not bounce a cache line between cores on every call.
func (s *slot) touch(now time.Time) {
	if sec := now.Unix(); s.lastUsed.Load() != sec {
		s.lastUsed.Store(sec)
	}
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
// schedules its refresh, and wakes whoever waits for a change of key.
func (b *Broker) keep(key string, c *credential, scopes []string, e *store.Entry) {
	s := b.slotFor(key, c, scopes)
	for {
		cur := s.entry.Load()
		if cur != nil && !e.Expiry.After(cur.Expiry) {
			return
		}
		if s.entry.CompareAndSwap(cur, e) {
			s.refreshAt.Store(refreshPoint(e, c.RefreshAt).UnixNano())
			b.waiters.wake(key)
			return
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
	cur := s.entry.Load()
	if cur == nil || cur.Fingerprint != fp || !s.entry.CompareAndSwap(cur, nil) {
		return false
	}
	b.waiters.wake(key)
	return true
}

// refreshPoint is when a token should be replaced: after a fraction of its
// lifetime, jittered by ±0.1 so that replicas and keys do not refresh in step.
func refreshPoint(e *store.Entry, frac float64) time.Time {
	f := min(max(frac+rand.Float64()*0.2-0.1, 0.1), 0.95)
	return e.IssuedAt.Add(time.Duration(f * float64(e.Lifetime())))
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
			b.l1.CompareAndDelete(key, s)
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
