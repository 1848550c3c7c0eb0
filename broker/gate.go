package broker

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/upstream"
)

// Upstream retry policy, per credential. The first failures back off
// exponentially with full jitter; after breakerAfter consecutive failures the
// breaker opens and lets one probe through per breakerProbe (±10%), so an
// outage of any length costs the bank a trickle of requests. While callers
// wait with no usable token, the next attempt after a transient failure is
// at most the gate's maxWait away (jittered down by up to a fifth), so they
// have a token within seconds of the bank's return. A Retry-After is
// honoured up to maxRetryAfter either way. A refusal of the broker's own
// registration (invalid_client, …) is not retried in a loop: it is probed
// once per rejectedProbe until it succeeds.
const (
	backoffBase   = time.Second
	breakerAfter  = 5
	breakerProbe  = 30 * time.Second
	rejectedProbe = time.Minute
	// DefaultMaxBackoffWithWaiters and DefaultMaxRetryAfter are the gate's
	// limits when Options leave them zero.
	DefaultMaxBackoffWithWaiters = 5 * time.Second
	DefaultMaxRetryAfter         = 10 * time.Minute
	// maxWaitNoDeadline is how long a caller without a deadline waits for a
	// scheduled attempt; a caller with a deadline waits if the attempt is due
	// before it.
	maxWaitNoDeadline = 10 * time.Second
)

// gate decides when the next request for a credential may go to the token endpoint.
type gate struct {
	maxWait       time.Duration // cap on the backoff while callers wait
	maxRetryAfter time.Duration // cap on a Retry-After
	// waiting counts callers waiting for a token of this credential (not
	// the refresher): while there are any, the backoff is capped at maxWait.
	waiting atomic.Int32

	mu          sync.Mutex
	failures    int           // consecutive
	next        time.Time     // no attempt before this
	lastErr     error         // what callers are told while waiting
	reason      string        // failure class of the last attempt
	refused     string        // the OAuth error code while the registration is refused
	description string        // the last error_description, checked (upstream.Error)
	since       time.Time     // start of the current failure run
	probing     bool          // an attempt admitted while failing has not reported yet
	settled     chan struct{} // closed, and replaced, when an attempt reports
	capAt       time.Time     // with callers waiting, the next attempt is no later than this
}

// closedError is what admit returns while the gate holds attempts back. It
// wraps the last failure, so it maps to that failure's status code.
type closedError struct {
	err     error
	wait    time.Duration // until the next attempt may go
	refused bool          // the registration is refused: not worth waiting for
	probing bool          // an attempt is under way: wait is its longest
	settled <-chan struct{}
}

func (e *closedError) Error() string {
	secs := max(int64((e.wait+time.Second-1)/time.Second), 1) // whole seconds, rounded up: never "in 0s"
	return fmt.Sprintf("%v (next attempt in %ds)", e.err, secs)
}

func (e *closedError) Unwrap() error { return e.err }

// admit reports whether an attempt may go now. While failing, it lets one
// attempt through and holds the others for hold (the fetch's duration).
func (g *gate) admit(now time.Time, hold time.Duration) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failures == 0 {
		return nil
	}
	if g.waiting.Load() > 0 && g.refused == "" && !g.probing && g.capAt.Before(g.next) {
		g.next = g.capAt // someone waits: no longer than maxWait after the failure
	}
	if now.Before(g.next) {
		return &closedError{err: g.lastErr, wait: g.next.Sub(now), refused: g.refused != "", probing: g.probing, settled: g.settledLocked()}
	}
	g.next = now.Add(hold) // this caller probes; the others wait for its outcome
	g.probing = true
	return nil
}

func (g *gate) settledLocked() chan struct{} {
	if g.settled == nil {
		g.settled = make(chan struct{})
	}
	return g.settled
}

// report ends an attempt: whoever waits for one wakes.
func (g *gate) reportLocked() {
	g.probing = false
	if g.settled != nil {
		close(g.settled)
		g.settled = nil
	}
}

// mayWait reports whether a caller with ctx should wait for the attempt ce
// announces rather than be told to come back: when that attempt is due
// before the caller's deadline, or is under way.
func mayWait(ctx context.Context, ce *closedError) bool {
	if ce.refused {
		return false // probed once a minute; the answer will not change sooner
	}
	if ce.probing {
		return true // bounded by the caller's context and the attempt's timeout
	}
	dl, ok := ctx.Deadline()
	if !ok {
		return ce.wait <= maxWaitNoDeadline
	}
	return time.Until(dl) > ce.wait
}

// await waits until the attempt ce announced may go, or until another attempt
// reports. The wait is timed on the real clock: when it ends, the gate opens
// at now() even if the broker's clock (a test's) has not moved, so that the
// waiting callers' flight is the scheduled attempt.
func (g *gate) await(ctx context.Context, ce *closedError, now func() time.Time) error {
	t := time.NewTimer(ce.wait)
	defer t.Stop()
	select {
	case <-ce.settled:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	}
	g.mu.Lock()
	if g.settled != ce.settled || g.failures == 0 {
		g.mu.Unlock()
		return nil // reported meanwhile
	}
	if !g.probing {
		g.next = now()
		g.mu.Unlock()
		return nil
	}
	g.mu.Unlock()
	select { // someone else's attempt is under way: share its outcome
	case <-ce.settled:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// failed records a failed attempt and schedules the next one.
func (g *gate) failed(now time.Time, err error, ue *upstream.Error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reportLocked()
	if g.failures == 0 {
		g.since = now
	}
	g.failures++
	g.lastErr = err
	g.refused = ""
	g.reason, g.description = "error", ""
	if ue != nil {
		g.reason, g.description = string(ue.Reason), ue.Description
	}
	var delay, floor time.Duration // floor: a Retry-After, which waiting callers do not shorten
	switch {
	case ue != nil && !ue.Temporary:
		g.refused = ue.Code
		if g.refused == "" {
			g.refused = string(ue.Reason)
		}
		delay = rejectedProbe
	case g.failures > breakerAfter:
		delay = breakerProbe - breakerProbe/10 + rand.N(breakerProbe/5)
	default:
		delay = rand.N(backoffBase << (g.failures - 1)) // full jitter: [0, base·2^(n-1))
	}
	if ue != nil && ue.RetryAfter > 0 {
		floor = min(ue.RetryAfter, g.maxRetryAfter)
		delay = max(delay, floor)
	}
	g.next = now.Add(delay)
	capWait := g.maxWait
	if j := g.maxWait / 5; j > 0 {
		capWait -= rand.N(j)
	}
	g.capAt = now.Add(max(capWait, floor))
	if g.waiting.Load() > 0 && g.refused == "" && g.capAt.Before(g.next) {
		g.next = g.capAt
	}
}

// succeeded clears the failure run.
func (g *gate) succeeded() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reportLocked()
	g.failures, g.next, g.lastErr, g.reason, g.refused, g.since, g.description = 0, time.Time{}, nil, "", "", time.Time{}, ""
}

// CredentialHealth is the upstream state of one credential.
type CredentialHealth struct {
	// State is "ok", "failing" (transient errors, or the background check
	// cannot connect), "refused" (the token endpoint rejects the broker's
	// registration) or "unknown" (not checked yet).
	State string `json:"state"`
	// Reason is the OAuth error code or failure class, when not ok.
	Reason string `json:"reason,omitempty"`
	// Description is the token endpoint's error_description, when it sent
	// one (checked and capped; see upstream.Error). For operators only.
	Description string `json:"description,omitempty"`
	// Failures counts consecutive failed attempts.
	Failures int `json:"consecutive_failures,omitempty"`
	// Since is when the current failure run began.
	Since *time.Time `json:"since,omitempty"`
	// NextAttempt is the earliest next request to the token endpoint.
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
	// LastSuccess is when the token endpoint last answered: a token fetched
	// or a background check passed (see health.go); nil before the first.
	LastSuccess *time.Time `json:"last_success,omitempty"`
}

func (g *gate) health() CredentialHealth {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failures == 0 {
		return CredentialHealth{State: "ok"}
	}
	since, next := g.since, g.next
	h := CredentialHealth{State: "failing", Reason: g.reason, Description: g.description, Failures: g.failures, Since: &since, NextAttempt: &next}
	if g.refused != "" {
		h.State, h.Reason = "refused", g.refused
	}
	return h
}
