package broker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

// lifetimeSetup is a credential's token lifetime and timing keys.
type lifetimeSetup struct {
	granted, margin, timeout, minTTL time.Duration
}

// newLifetimeBroker returns a Broker with a memory store on a fake clock in
// front of a real oauthtest server granting s.granted, with s's margin,
// upstream timeout and default min_ttl, and no background refresher.
func newLifetimeBroker(t testing.TB, s lifetimeSetup, log *zap.Logger) (*Broker, *oauthtest.Server, *fakeClock) {
	t.Helper()
	clock := &fakeClock{t: time.Now()}
	as := startOAuth(t, s.granted, clock.Now)
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("test-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile,
		ExpiryMargin: s.margin, Timeout: s.timeout, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	callers, err := policy.Compile([]string{"spiffe://bank.internal/ns/kyc/*"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Store: store.NewMemory(clock.Now), Now: clock.Now, RefreshInterval: -1, Logger: log,
		Credentials: []Credential{{Name: "identity", Scopes: []string{"IDENTITY"}, MinTTL: s.minTTL, Timeout: s.timeout,
			Callers: callers, Fetcher: up, TokenURL: as.TokenURL(), ClientID: "app"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b, as, clock
}

// TestRequestsPerLifetime: with the default min_ttl (30s), expiry_margin
// (10s) and timeout (10s), a caller every second and the refresher every
// second, over several lifetimes: every call but the first is served from
// memory with at least its min_ttl left, and the bank sees the number of
// requests per lifetime that README's Token lifecycle table gives.
func TestRequestsPerLifetime(t *testing.T) {
	const s, m = time.Second, time.Minute
	tests := []struct {
		setup     lifetimeSetup
		lifetimes int
		every     [2]float64 // seconds between refreshes, least and most (before the refresher's 1s tick)
	}{
		// 20s after the margin; min_ttl capped to 5s; due at 5s+10s left, which
		// is the earliest (a quarter of the lifetime): every 5s.
		{lifetimeSetup{30 * s, 10 * s, 10 * s, 30 * s}, 20, [2]float64{5, 5}},
		// 50s; min_ttl capped to 12.5s; due at 22.5s left, 12s of room
		// and up to 3s of jitter before: every 12.5 to 15.5s.
		{lifetimeSetup{60 * s, 10 * s, 10 * s, 30 * s}, 20, [2]float64{12.5, 15.5}},
		// With a 2s timeout: due at 14.5s left, 8.9s of room, up to 2.2s jitter: every 24.4 to 26.6s.
		{lifetimeSetup{60 * s, 10 * s, 2 * s, 30 * s}, 20, [2]float64{24.4, 26.6}},
		// 290s; due at 40s left, 62.5s of room, up to 15.6s jitter: every 171.9 to 187.5s.
		{lifetimeSetup{5 * m, 10 * s, 10 * s, 30 * s}, 20, [2]float64{171.9, 187.5}},
		// 3590s; due at 40s left, 120s of room, up to 30s jitter: every 3400 to 3430s.
		{lifetimeSetup{time.Hour, 10 * s, 10 * s, 30 * s}, 20, [2]float64{3400, 3430}},
		// An explicit min_ttl of 5 minutes with 1h tokens: due at 310s left: every 3130 to 3160s.
		{lifetimeSetup{time.Hour, 10 * s, 10 * s, 5 * m}, 20, [2]float64{3130, 3160}},
	}
	for _, tt := range tests {
		name := fmt.Sprintf("%v tokens, margin %v, timeout %v, min_ttl %v", tt.setup.granted, tt.setup.margin, tt.setup.timeout, tt.setup.minTTL)
		t.Run(name, func(t *testing.T) {
			b, as, clock := newLifetimeBroker(t, tt.setup, nil)
			ctx := context.Background()
			req := Request{Credential: "identity"} // the default min_ttl
			if tt.setup.minTTL != 30*time.Second {
				req = Request{Credential: "identity", MinTTL: tt.setup.minTTL, MinTTLSet: true}
			}
			steps := tt.lifetimes * int(tt.setup.granted/time.Second)
			var first int64
			for i := range steps {
				b.RefreshDue(ctx) // what the background refresher does each second
				before := as.TokenRequests()
				is, err := b.GetToken(ctx, testCaller, req)
				if err != nil {
					t.Fatalf("second %d: %v", i, err)
				}
				lt := is.Lifetime()
				if left := is.Expiry.Sub(clock.Now()); left < min(tt.setup.minTTL, lt/4) {
					t.Fatalf("second %d: a token with %v left, below the (capped) min_ttl", i, left)
				}
				if i == 0 {
					first = as.TokenRequests()
				} else if as.TokenRequests() != before || is.Source != SourceMemory {
					t.Fatalf("second %d: the caller waited on the token endpoint (source %s)", i, is.Source)
				}
				clock.Add(time.Second)
			}
			n := as.TokenRequests() - first // the refreshes
			per := float64(n) / float64(tt.lifetimes)
			t.Logf("%s: %d refreshes in %d lifetimes: %.2f token requests per lifetime", name, n, tt.lifetimes, per)
			lo, hi := int64(float64(steps)/(tt.every[1]+1))-1, int64(float64(steps)/tt.every[0])+1
			if n < lo || n > hi {
				t.Errorf("%d refreshes, want between %d and %d", n, lo, hi)
			}
		})
	}
}

// TestDefaultMinTTLCapped: with 30s tokens (20s after the margin) the
// default min_ttl of 30s is served as 5s, logged once; an explicit 30s is
// FAILED_PRECONDITION naming both durations.
func TestDefaultMinTTLCapped(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	b, as, _ := newLifetimeBroker(t, lifetimeSetup{30 * time.Second, 10 * time.Second, 2 * time.Second, 30 * time.Second}, zap.New(core))
	ctx := context.Background()
	for range 3 {
		if _, err := b.GetToken(ctx, testCaller, Request{Credential: "identity"}); err != nil {
			t.Fatalf("default min_ttl with 30s tokens: %v", err)
		}
	}
	if n := logs.FilterMessageSnippet("default min_ttl").Len(); n != 1 {
		t.Errorf("the cap was logged %d times, want once", n)
	}
	_, err := b.GetToken(ctx, testCaller, Request{Credential: "identity", MinTTL: 30 * time.Second, MinTTLSet: true})
	if !errors.Is(err, ErrFailedPrecondition) || !strings.Contains(err.Error(), "30s") || !strings.Contains(err.Error(), "20s") {
		t.Errorf("explicit min_ttl 30s of 20s tokens: %v, want FAILED_PRECONDITION naming 30s and 20s", err)
	}
	if n := as.TokenRequests(); n != 1 {
		t.Errorf("token requests = %d, want 1", n)
	}
}

// TestMinTTLCannotHammer: callers asking min_ttl = lifetime - 10ms, over
// three lifetimes with the refresher running: the bank sees at most two
// requests per lifetime beyond the steady state, and the refused calls are
// FAILED_PRECONDITION naming the min_ttl and the lifetime.
func TestMinTTLCannotHammer(t *testing.T) {
	const lifetime = time.Hour - 10*time.Second
	b, as, clock := newLifetimeBroker(t, lifetimeSetup{time.Hour, 10 * time.Second, 10 * time.Second, 30 * time.Second}, nil)
	ctx := context.Background()
	greedy := Request{Credential: "identity", MinTTL: lifetime - 10*time.Millisecond, MinTTLSet: true}
	var served, refused int
	for i := range 3 * 3600 {
		b.RefreshDue(ctx)
		if _, err := b.GetToken(ctx, testCaller, Request{Credential: "identity"}); err != nil {
			t.Fatalf("second %d: a default caller: %v", i, err)
		}
		for range 10 {
			_, err := b.GetToken(ctx, testCaller, greedy)
			switch {
			case err == nil:
				served++
			case errors.Is(err, ErrFailedPrecondition) && strings.Contains(err.Error(), "59m49.99s") && strings.Contains(err.Error(), "59m50s"):
				refused++
			default:
				t.Fatalf("second %d: %v, want a token or FAILED_PRECONDITION naming both durations", i, err)
			}
			clock.Add(time.Millisecond)
		}
		if i == 0 && as.TokenRequests() > 2 {
			t.Fatalf("the first 10 greedy calls cost %d token requests, want at most 2", as.TokenRequests())
		}
		clock.Add(time.Second - 10*time.Millisecond)
	}
	// Steady state: one refresh per lifetime, plus the first token; beyond
	// it at most two a lifetime.
	if n := as.TokenRequests(); n > 1+3+3*2 {
		t.Errorf("token requests in 3 lifetimes = %d, want at most %d", n, 1+3+3*2)
	}
	t.Logf("3 lifetimes, 10 greedy calls a second: %d token requests, %d calls served, %d refused", as.TokenRequests(), served, refused)
}

// TestBackoffWithWaiters: after a transient failure the next attempt is at
// most maxWait (less up to a fifth) away while callers wait, whatever the
// failure count; with nobody waiting the breaker's delay stands; a
// Retry-After is honoured either way, up to maxRetryAfter.
func TestBackoffWithWaiters(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	fail := &upstream.Error{Reason: upstream.ReasonServerError, Temporary: true}
	newGate := func() *gate { return &gate{maxWait: 5 * time.Second, maxRetryAfter: time.Minute} }

	idle := newGate()
	for range breakerAfter + 1 {
		idle.failed(now, errors.New("down"), fail)
	}
	if d := idle.next.Sub(now); d < 27*time.Second {
		t.Errorf("breaker open, nobody waiting: next attempt in %v, want 27-33s", d)
	}
	idle.waiting.Add(1) // a caller arrives
	err := idle.admit(now, time.Second)
	var ce *closedError
	if !errors.As(err, &ce) || ce.wait > 5*time.Second || ce.wait < 4*time.Second {
		t.Errorf("a caller arrives: %v, want the next attempt 4-5s after the failure", err)
	}

	busy := newGate()
	busy.waiting.Add(1)
	for i := range 10 {
		busy.failed(now, errors.New("down"), fail)
		if d := busy.next.Sub(now); d > 5*time.Second {
			t.Fatalf("failure %d with a caller waiting: next attempt in %v, want at most 5s", i+1, d)
		}
	}
	busy.failed(now, errors.New("throttled"), &upstream.Error{Reason: upstream.ReasonThrottled, Temporary: true, RetryAfter: 20 * time.Second})
	if d := busy.next.Sub(now); d != 20*time.Second {
		t.Errorf("Retry-After 20s with a caller waiting: next attempt in %v, want 20s", d)
	}
	busy.failed(now, errors.New("throttled"), &upstream.Error{Reason: upstream.ReasonThrottled, Temporary: true, RetryAfter: time.Hour})
	if d := busy.next.Sub(now); d != time.Minute {
		t.Errorf("Retry-After 1h, max_retry_after 1m: next attempt in %v, want 1m", d)
	}
}
