package broker

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/store"
)

// Watch sends the current token for req, then each replacement, always before
// the previous one falls below req's min_ttl. Replacements come from the
// refresher (or another replica, through the store); if none has come when the
// previous token nears min_ttl, Watch asks for a newer one itself. Upstream
// failures do not end the watch while the last token sent is still good; then
// the failure is returned. Watch returns when ctx ends or send fails.
//
// Every change of the credentials or the policy (SetCredentials) authorizes
// the stream again, before anything more is fetched or sent for it: a caller
// that lost access (the caller, a scope or the credential removed) ends with
// ErrPermissionDenied.
func (b *Broker) Watch(ctx context.Context, caller policy.Identity, req Request, send func(*store.Entry) error) error {
	policyChanged := b.policyChanges()
	p, err := b.prepare(caller, req)
	if err != nil {
		return err
	}
	if !b.streams.acquire(caller) {
		return fmt.Errorf("%w: caller %s has %d WatchToken streams open, the most rate_limit.watch_streams allows; close some, or share one per process",
			ErrResourceExhausted, caller, b.streams.limit)
	}
	defer b.streams.release(caller)
	// Every get is preceded by registering for the key's next change, so a
	// change that lands while it runs or before the next wait (a replacement
	// or an InvalidateToken dropping the token) wakes that wait. A change the
	// get itself made costs one extra in-process lookup.
	changed := b.waiters.wait(p.key)
	is, err := b.get(ctx, p, b.now())
	if err != nil {
		return err
	}
	select {
	case <-policyChanged: // changed since prepare: still allowed?
		if _, err := b.admit(caller, req); err != nil {
			return revoked(err)
		}
	default:
	}
	if err := send(is.Entry); err != nil {
		return err
	}
	p.c.stats.use().noteIssued(caller, b.now())
	last := is.Entry
	if p.defaulted { // from now on, the default as this credential's tokens cap it
		p.minTTL = p.want().of(p.c, last.Lifetime())
		p.demand, p.defaulted = p.minTTL, false
	}
	s := b.slotFor(p.key, p.c, p.scopes)
	s.watchers.Add(1) // a watched key is never idle
	defer func() { s.watchers.Add(-1) }()
	// reauthorize admits the stream again after a change of the credentials
	// or the policy; the request may now resolve to another key (a changed
	// registration), whose token is then sent even if it expires sooner.
	moved := false
	reauthorize := func() error {
		policyChanged = b.policyChanges()
		np, err := b.admit(caller, req)
		if err != nil {
			return revoked(err)
		}
		if np.key != p.key {
			s.watchers.Add(-1)
			s = b.slotFor(np.key, np.c, np.scopes)
			s.watchers.Add(1)
			changed, moved = b.waiters.wait(np.key), true
		}
		p = np
		return nil
	}
	// policyMoved authorizes the stream again if the policy changed, and
	// says whether it did.
	policyMoved := func() (bool, error) {
		select {
		case <-policyChanged:
			return true, reauthorize()
		default:
			return false, nil
		}
	}

	retry := time.Second // after a failed attempt, the next is not sooner
	var failedAt time.Time
	for {
		// At the latest, replace last when it has min_ttl plus a lead left.
		lead := min(last.Lifetime()/10, 30*time.Second)
		due := last.Expiry.Add(-p.minTTL - lead)
		wait := due.Sub(b.now())
		if !failedAt.IsZero() {
			wait = max(wait, failedAt.Add(retry).Sub(b.now()))
		}
		if moved && failedAt.IsZero() {
			wait = 0
		}
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-policyChanged:
			t.Stop()
			if err := reauthorize(); err != nil {
				return err
			}
			continue
		case <-changed:
		case <-t.C:
		}
		t.Stop()
		// Ready together with changed or the timer, a policy change goes first.
		if again, err := policyMoved(); err != nil {
			return err
		} else if again {
			continue
		}

		changed = b.waiters.wait(p.key)
		q := p
		if moved {
			q.minTTL = p.minTTL
		} else if now := b.now(); !now.Before(due) {
			// Anything with more time left than last will do.
			q.minTTL = max(p.minTTL, last.Expiry.Sub(now)+time.Second)
		}
		is, err := b.get(ctx, q, b.now())
		if err != nil {
			if left := last.Expiry.Sub(b.now()); left > 0 && left >= p.minTTL {
				failedAt, retry = b.now(), min(2*retry, 30*time.Second)
				continue // a blip: last is still good
			}
			return err
		}
		failedAt, retry = time.Time{}, time.Second
		// Changed while the token was got: judge again before sending.
		if again, err := policyMoved(); err != nil {
			return err
		} else if again {
			continue
		}
		wasMoved := moved
		moved = false
		if newer(is.Entry, last) || wasMoved && is.Entry.Fingerprint != last.Fingerprint {
			if err := send(is.Entry); err != nil {
				return err
			}
			p.c.stats.use().noteIssued(caller, b.now())
			last = is.Entry
		}
	}
}

// revoked is the end of a stream whose caller lost access: why, under
// PERMISSION_DENIED whatever the reason (so that it tells nothing more than
// a new call would).
func revoked(err error) error {
	why := err.Error()
	for _, sentinel := range []error{ErrPermissionDenied, ErrInvalidArgument} {
		why = strings.TrimPrefix(why, sentinel.Error()+": ")
	}
	return fmt.Errorf("%w: %w: %s", ErrPermissionDenied, ErrStreamRevoked, why)
}

// newer reports whether e replaces last.
func newer(e, last *store.Entry) bool {
	return e != nil && e.Fingerprint != last.Fingerprint && e.Expiry.After(last.Expiry)
}
