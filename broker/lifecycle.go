package broker

import (
	"fmt"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/store"
)

// When tokens are refreshed, and how often the bank is asked.
//
// For a token of lifetime L (what the bank grants, less expiry_margin), the
// largest min_ttl recently asked of its key m and the credential's upstream
// timeout T, the refresh must start by the time the token has m + T left:
// then even a fetch that takes the whole timeout lands before any caller's
// token falls below its min_ttl. It starts earlier by a room for retries and
// for a takeover after a dead lease holder (a quarter of what the token can
// serve, at least the lease, at most RefreshLead and half of it), plus a
// jitter of up to a quarter of that room so that keys do not refresh in
// step. A token is never refreshed before a quarter of its lifetime
// (refreshFloor), so a min_ttl above 3/4·L − T (plannable) is not planned
// for: the refresher ignores it.
//
// A caller asking more than the refresher plans for can make the broker
// fetch ahead of schedule, but only while the newest token of its key is at
// least half a lifetime old (aheadAge): at most two such fetches per
// lifetime, beyond the steady state. Otherwise its call is refused with
// FAILED_PRECONDITION naming its min_ttl and the lifetime.
const (
	// RefreshLead is the most room for retries the refresher leaves before
	// a token must be replaced (long tokens get all of it).
	RefreshLead = 2 * time.Minute
	// DefaultTimeout is the upstream timeout of a Credential that sets none.
	DefaultTimeout = 10 * time.Second
	// LeaseSlack is what a fetch lease outlasts the upstream timeout by:
	// the store round trips around the fetch.
	LeaseSlack = 2 * time.Second
)

// refreshFloor is the part of its lifetime a token lives at least before
// the refresher replaces it: at most 4 refreshes per lifetime.
func refreshFloor(lt time.Duration) time.Duration { return lt / 4 }

// aheadAge is the age the newest token of a key must have before a caller's
// demand may fetch ahead of the refresh schedule.
func aheadAge(lt time.Duration) time.Duration { return lt / 2 }

// defaultMinTTL is the min_ttl of a request that sets none, for tokens of
// lifetime lt: the configured one, capped to a quarter of the lifetime so
// that the defaults work with short tokens. A quarter leaves the rest of the
// lifetime for the refresh (one upstream timeout and retry room) and for
// serving the token; callers that need more ask for it explicitly.
func (c *credential) defaultMinTTL(lt time.Duration) time.Duration {
	capped := lt / 4
	if c.MinTTL <= capped {
		return c.MinTTL
	}
	if !c.capLogged.Load() && !c.capLogged.Swap(true) { // on the hit path: no write once logged
		c.log.Info("the default min_ttl is more than a quarter of the token lifetime the bank grants; requests without min_ttl get a quarter",
			zap.String("credential", c.Name), zap.Duration("min_ttl", c.MinTTL),
			zap.Duration("lifetime", lt), zap.Duration("capped_to", capped))
	}
	return capped
}

// plannable is the largest min_ttl the refresher plans for with tokens of
// lifetime lt: one it can meet while refreshing no sooner than refreshFloor.
func (c *credential) plannable(lt time.Duration) time.Duration {
	return max(lt-refreshFloor(lt)-c.Timeout, 0)
}

// latestRefresh is when the refresh of e must start at the latest for a
// largest min_ttl recently asked of demand.
func (c *credential) latestRefresh(e *store.Entry, demand time.Duration) time.Time {
	lt := e.Lifetime()
	at := e.Expiry.Add(-(min(demand, c.plannable(lt)) + c.Timeout)) // min: the lifetime may have changed
	return maxTime(at, e.IssuedAt.Add(refreshFloor(lt)))
}

// refreshPoint is when the refresher replaces e, for a largest min_ttl
// recently asked of demand and a jitter u in [0, 1) drawn for the token.
// With RefreshAt: after that fraction ±0.1 of the lifetime. Either way
// never after latestRefresh, and never before refreshFloor.
func (c *credential) refreshPoint(e *store.Entry, demand time.Duration, u float64) time.Time {
	lt := e.Lifetime()
	latest := c.latestRefresh(e, demand)
	floor := e.IssuedAt.Add(refreshFloor(lt))
	if c.RefreshAt > 0 {
		f := min(max(c.RefreshAt+u*0.2-0.1, 0.1), 0.95)
		return maxTime(floor, minTime(e.IssuedAt.Add(time.Duration(f*float64(lt))), latest))
	}
	serve := latest.Sub(e.IssuedAt) // what the token serves before it must be replaced
	room := min(RefreshLead, max(serve/4, c.LockTTL), serve/2)
	room += time.Duration(u * float64(room) / 4)
	return maxTime(floor, latest.Add(-room))
}

// demand is the largest min_ttl asked of s recently: for its current token
// or the one before.
func (s *slot) demand() time.Duration {
	return time.Duration(max(s.demandCur.Load(), s.demandPrev.Load()))
}

// want is what a get asks of a token.
type want struct {
	minTTL    time.Duration // as asked, or the credential's default
	defaulted bool          // minTTL is the default: capped to each token's lifetime
	refresh   bool          // the refresher asks for anything newer: never ahead of schedule
}

// of is the min_ttl a token of lifetime lt must have left for w.
func (w want) of(c *credential, lt time.Duration) time.Duration {
	if w.defaulted {
		return min(w.minTTL, c.defaultMinTTL(lt))
	}
	return w.minTTL
}

// aheadOfSchedule reports whether a caller's fetch for key, whose newest
// token is cur, would come before the refresh schedule and too soon after
// the last fetch: cur is live, its refresh is not due, and it is younger
// than half its lifetime. Such a fetch is refused (tooSoon).
func (b *Broker) aheadOfSchedule(c *credential, s *slot, cur *store.Entry, now time.Time) bool {
	if cur == nil || !now.Before(cur.Expiry) || s != nil && s.isRevoked(cur.Fingerprint) {
		return false
	}
	var demand time.Duration
	if s != nil {
		demand = s.demand()
	}
	if !now.Before(c.latestRefresh(cur, demand)) {
		return false // due: this is the refresh
	}
	return now.Sub(cur.IssuedAt) < aheadAge(cur.Lifetime())
}

// tooSoon is the error for a min_ttl the broker cannot meet without asking
// the bank more often than its bound allows.
func tooSoon(c *credential, minTTL, lifetime time.Duration) error {
	return fmt.Errorf("%w: min_ttl %s of credential %q cannot be met within the broker's bound on token requests: tokens last %s (after expiry_margin) and the broker fetches ahead of its refresh schedule only once the newest token is half that old; ask for at most %s",
		ErrFailedPrecondition, minTTL, c.Name, lifetime, c.plannable(lifetime))
}

// jitter draws a token's refresh jitter.
func jitter() float64 { return rand.Float64() }

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
