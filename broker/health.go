package broker

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/upstream"
)

// DefaultCheckInterval is how often an idle credential's token endpoint is
// checked, by default.
const DefaultCheckInterval = 30 * time.Second

// Checker is implemented by Fetchers that can tell whether the token
// endpoint answers without asking it for a token (*upstream.Client does:
// a TCP connect and TLS handshake, no HTTP request).
type Checker interface {
	Check(ctx context.Context) error
}

// A credential's health is what its last attempt said: a fetch (the gate's
// state), or, when no fetch happened for a while, a connection check. The
// checks run in the background from the start, whether or not callers ask,
// at most once per interval per token URL, and not at all within an interval
// of a successful fetch: they cost the bank a TCP (and TLS) handshake, never
// a token request. A token is fetched in the background only when one is due
// anyway (the refresher). So a broker started with the token endpoint down,
// or one whose token endpoint goes away while it is idle, says so within an
// interval.

// credCheck is the background-check state of one credential.
type credCheck struct {
	lastSuccess atomic.Int64           // broker clock, Unix ns: last fetch or check that succeeded
	lastContact atomic.Int64           // real clock, Unix ns: last success, for the rate limit
	failing     atomic.Pointer[string] // reason of the last check, while it failed
	failedAt    atomic.Int64           // broker clock, Unix ns
	checked     atomic.Bool            // a check or a fetch has reported
}

// noteSuccess records that the token endpoint answered for the credential of st.
func (b *Broker) noteSuccess(st *credStats) {
	cc := &st.check
	cc.lastSuccess.Store(b.now().UnixNano())
	cc.lastContact.Store(time.Now().UnixNano())
	cc.failing.Store(nil)
	cc.checked.Store(true)
}

// health is the gate's view of credential c, completed by the checks.
func (b *Broker) health(c *credential) CredentialHealth {
	h := c.stats.upstreamHealth()
	cc := &c.stats.check
	if ls := cc.lastSuccess.Load(); ls != 0 {
		t := time.Unix(0, ls)
		h.LastSuccess = &t
	}
	if h.State != "ok" {
		return h // what a fetch said is the more precise
	}
	if reason := cc.failing.Load(); reason != nil {
		since := time.Unix(0, cc.failedAt.Load())
		h.State, h.Reason, h.Since = "failing", *reason, &since
	} else if _, can := c.Fetcher.(Checker); can && !cc.checked.Load() {
		h.State = "unknown" // not checked yet: not known to work
	}
	return h
}

// checkLoop checks idle credentials every interval until ctx ends; the
// first round runs at once.
func (b *Broker) checkLoop(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		b.CheckIdle(ctx, interval)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// CheckIdle checks the token endpoint of every credential that has not
// reached it within interval, once per token URL (one goroutine each, not
// one per credential: a goroutine's record outlives it).
func (b *Broker) CheckIdle(ctx context.Context, interval time.Duration) {
	type endpoint struct {
		check Checker
		creds []*credential
	}
	var endpoints []*endpoint
	byURL := map[string]*endpoint{}
	for _, c := range *b.creds.Load() {
		ch, ok := c.Fetcher.(Checker)
		if !ok || time.Since(time.Unix(0, c.stats.check.lastContact.Load())) < interval {
			continue
		}
		e := byURL[c.TokenURL]
		if e == nil || c.TokenURL == "" { // without a token URL, each is checked alone
			e = &endpoint{check: ch}
			byURL[c.TokenURL] = e
			endpoints = append(endpoints, e)
		}
		e.creds = append(e.creds, c)
	}
	var wg sync.WaitGroup
	for _, e := range endpoints {
		wg.Go(func() {
			err := e.check.Check(ctx)
			for _, c := range e.creds {
				b.noteCheck(c, err)
			}
		})
	}
	wg.Wait()
}

// noteCheck records a check's outcome for credential c.
func (b *Broker) noteCheck(c *credential, err error) {
	cc := &c.stats.check
	if err == nil {
		b.noteSuccess(c.stats)
		return
	}
	if errors.Is(err, context.Canceled) {
		return
	}
	reason := "unreachable"
	var ue *upstream.Error
	if errors.As(err, &ue) && ue.Reason != upstream.ReasonNetwork {
		reason = string(ue.Reason)
	}
	if cc.failing.Swap(&reason) == nil {
		cc.failedAt.Store(b.now().UnixNano())
		b.log.Warn("token endpoint does not take connections (background check)", zap.String("credential", c.Name), zap.Error(err))
	}
	cc.checked.Store(true)
}
