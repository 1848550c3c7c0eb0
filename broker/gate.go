package broker

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/upstream"
)

// Upstream retry policy, per credential. The first failures back off
// exponentially with full jitter; after breakerAfter consecutive failures the
// breaker opens and lets one probe through per breakerProbe (±10%), so an
// outage of any length costs the bank a trickle of requests. A refusal of
// the broker's own registration (invalid_client, …) is not retried in a loop:
// it is probed once per rejectedProbe until it succeeds.
const (
	backoffBase   = time.Second
	breakerAfter  = 5
	breakerProbe  = 30 * time.Second
	rejectedProbe = time.Minute
	maxRetryAfter = 10 * time.Minute // a longer Retry-After is taken as this
)

// gate decides when the next request for a credential may go to the token endpoint.
type gate struct {
	mu       sync.Mutex
	failures int       // consecutive
	next     time.Time // no attempt before this
	lastErr  error     // what callers are told while waiting
	reason   string    // failure class of the last attempt
	refused  string    // the OAuth error code while the registration is refused
	since    time.Time // start of the current failure run
}

// admit reports whether an attempt may go now. While failing, it lets one
// attempt through and holds the others for hold (the fetch's duration).
func (g *gate) admit(now time.Time, hold time.Duration) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failures == 0 {
		return nil
	}
	if now.Before(g.next) {
		return fmt.Errorf("%w (next attempt in %s)", g.lastErr, g.next.Sub(now).Round(time.Second))
	}
	g.next = now.Add(hold) // this caller probes; the others wait for its outcome
	return nil
}

// failed records a failed attempt and schedules the next one.
func (g *gate) failed(now time.Time, err error, ue *upstream.Error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failures == 0 {
		g.since = now
	}
	g.failures++
	g.lastErr = err
	g.refused = ""
	g.reason = "error"
	if ue != nil {
		g.reason = string(ue.Reason)
	}
	var delay time.Duration
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
		delay = max(delay, min(ue.RetryAfter, maxRetryAfter))
	}
	g.next = now.Add(delay)
}

// succeeded clears the failure run.
func (g *gate) succeeded() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failures, g.next, g.lastErr, g.reason, g.refused, g.since = 0, time.Time{}, nil, "", "", time.Time{}
}

// CredentialHealth is the upstream state of one credential.
type CredentialHealth struct {
	// State is "ok", "failing" (transient errors) or "refused" (the token
	// endpoint rejects the broker's registration).
	State string `json:"state"`
	// Reason is the OAuth error code or failure class, when not ok.
	Reason string `json:"reason,omitempty"`
	// Failures counts consecutive failed attempts.
	Failures int `json:"consecutive_failures,omitempty"`
	// Since is when the current failure run began.
	Since *time.Time `json:"since,omitempty"`
	// NextAttempt is the earliest next request to the token endpoint.
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
}

func (g *gate) health() CredentialHealth {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failures == 0 {
		return CredentialHealth{State: "ok"}
	}
	since, next := g.since, g.next
	h := CredentialHealth{State: "failing", Reason: g.reason, Failures: g.failures, Since: &since, NextAttempt: &next}
	if g.refused != "" {
		h.State, h.Reason = "refused", g.refused
	}
	return h
}
