package server

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// withDefaults gives the credential the configuration defaults of min_ttl,
// expiry_margin and timeout.
func withDefaults(c *config.Config) {
	cr := &c.Credentials[0]
	cr.MinTTL, cr.ExpiryMargin, cr.Timeout = config.Duration(config.DefaultMinTTL), config.Duration(config.DefaultMargin), config.Duration(config.DefaultTimeout)
}

// refreshAll runs every replica's refresher once, as the background loop does.
func refreshAll(srvs []*Server) {
	var wg sync.WaitGroup
	for _, srv := range srvs {
		wg.Go(func() { srv.broker.RefreshDue(context.Background()) })
	}
	wg.Wait()
}

// TestShortTokensWithDefaults: three brokers sharing Redis, 30s and 60s
// tokens, the default min_ttl, margin and timeout, a token endpoint that
// answers in 100ms, callers on every replica every simulated second: after
// the first token no call waits on the bank, and every token has its
// (capped) min_ttl left.
func TestShortTokensWithDefaults(t *testing.T) {
	for _, granted := range []time.Duration{30 * time.Second, 60 * time.Second} {
		t.Run(granted.String(), func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) {
				withRedis("", redistest.Start(t).Addr())(c)
				withDefaults(c)
			})
			h.as.SetExpiresIn(granted)
			h.as.SetFaults(oauthtest.Faults{Latency: 100 * time.Millisecond})
			srvs, clients := replicas(h, 3)
			req := &pb.GetTokenRequest{Credential: "identity"}
			lifetime := granted - min(config.DefaultMargin, granted/2)
			const lifetimes = 5
			var first int64
			for i := range lifetimes * int(granted/time.Second) {
				refreshAll(srvs)
				before := h.as.TokenRequests()
				got := load(h, clients, 1, req)
				if errs := errorsIn(got); len(errs) > 0 {
					t.Fatalf("second %d: %v", i, errs)
				}
				if i == 0 {
					first = h.as.TokenRequests()
				} else if h.as.TokenRequests() != before {
					t.Fatalf("second %d: a call waited on the token endpoint", i)
				}
				tok, err := h.get(clients[i%3], req)
				if err != nil {
					t.Fatal(err)
				}
				if left := tok.GetExpireTime().AsTime().Sub(h.clock.Now()); left < lifetime/4 {
					t.Fatalf("second %d: served a token with %v left, below the capped min_ttl %v", i, left, lifetime/4)
				}
				h.clock.Add(time.Second)
			}
			if first != 1 {
				t.Errorf("first calls cost %d token requests, want 1 for three replicas", first)
			}
			n := h.as.TokenRequests() - first
			t.Logf("%v tokens, defaults, 3 replicas: %d refreshes in %d lifetimes (%.2f per lifetime)", granted, n, lifetimes, float64(n)/lifetimes)
			if !strings.Contains(h.logs.String(), "the default min_ttl is more than a quarter") {
				t.Error("the cap of the default min_ttl was not logged")
			}
		})
	}
}

// TestGreedyMinTTLIsBounded: 200 calls across three replicas asking
// min_ttl = lifetime - 10ms cost at most 2 token requests; every other
// call is FAILED_PRECONDITION naming both durations.
func TestGreedyMinTTLIsBounded(t *testing.T) {
	h := newHarness(t, withRedis("", redistest.Start(t).Addr()))
	_, clients := replicas(h, 3)
	lifetime := tokenTTL - config.DefaultMargin // 59m50s
	req := &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(lifetime - 10*time.Millisecond)}
	var mu sync.Mutex
	var served, refused int
	var wg sync.WaitGroup
	for i := range 200 {
		if i%10 == 0 { // batches of 10 concurrent calls, 10ms apart
			wg.Wait()
			h.clock.Add(10 * time.Millisecond)
		}
		wg.Go(func() {
			_, err := h.get(clients[i%3], req)
			mu.Lock()
			defer mu.Unlock()
			st := status.Convert(err)
			switch {
			case err == nil:
				served++
			case st.Code() == codes.FailedPrecondition && strings.Contains(st.Message(), "59m49.99s") && strings.Contains(st.Message(), "59m50s"):
				refused++
			default:
				t.Errorf("%v %q, want a token or FAILED_PRECONDITION naming both durations", st.Code(), st.Message())
			}
		})
	}
	wg.Wait()
	if n := h.as.TokenRequests(); n > 2 || refused == 0 {
		t.Errorf("200 greedy calls cost %d token requests (%d refused), want at most 2 and refusals", n, refused)
	}
	t.Logf("200 calls asking min_ttl 59m49.99s of 59m50s tokens: %d served, %d refused, %d token requests", served, refused, h.as.TokenRequests())
}

// plantLease leaves a lease on the one token key in Redis, as a replica
// killed in the middle of its fetch leaves it: held for ttl, never released.
func plantLease(t *testing.T, rs *redistest.Server, ttl time.Duration) {
	t.Helper()
	keys := entryKeys(t, rs.Client())
	if len(keys) != 1 {
		t.Fatalf("token keys in Redis: %v, want one", keys)
	}
	if err := rs.Client().Set(context.Background(), keys[0]+":lock", "a-dead-replica", ttl).Err(); err != nil {
		t.Fatal(err)
	}
}

// TestDeadLeaseHolder: the replica holding the fetch lease is stopped in
// the middle of its fetch (its lease stays in Redis, unreleased, until its
// TTL: the 2s timeout plus 2s). With tokens still valid, no call fails or
// takes as long as the token endpoint (500ms) while the other replicas take
// over; with none valid, the waiting callers have a token within the lease
// TTL and one fetch.
func TestDeadLeaseHolder(t *testing.T) {
	const latency = 500 * time.Millisecond
	lease := 2*time.Second + 2*time.Second // the harness's timeout plus broker.LeaseSlack
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	h.as.SetFaults(oauthtest.Faults{Latency: latency})
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if got := load(h, clients, 1, req); len(got) != 1 {
		t.Fatalf("first: %v", got)
	}

	t.Run("tokens still valid", func(t *testing.T) {
		// Past every replica's refresh point; replica 0 took the lease and dies.
		h.clock.Add(57*time.Minute + 30*time.Second)
		if got := load(h, clients, 1, req); len(got) != 1 || h.as.TokenRequests() != 1 { // in use, so not idle
			t.Fatalf("at 57.5 minutes: %v, %d token requests", got, h.as.TokenRequests())
		}
		plantLease(t, rs, lease)
		if err := h.stop(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		done := make(chan time.Duration)
		go func() { refreshAll(srvs[1:]); done <- time.Since(start) }()
		var slowest time.Duration
		calls := 0
		for took := time.Duration(0); took == 0; calls++ {
			select {
			case took = <-done:
				t.Logf("the other replicas took over and refreshed in %v (lease %v, fetch %v)", took, lease, latency)
				if took > lease+latency+time.Second {
					t.Errorf("refresh after a dead holder took %v, want within the lease TTL plus one fetch", took)
				}
			case <-time.After(20 * time.Millisecond):
			}
			t0 := time.Now()
			if _, err := h.get(clients[1+calls%2], req); err != nil {
				t.Fatalf("call %d while the lease holder is dead: %v", calls, err)
			}
			slowest = max(slowest, time.Since(t0))
			if calls > 1000 {
				t.Fatal("the refresh did not finish")
			}
		}
		t.Logf("%d calls while the others took over, the slowest %v", calls, slowest)
		if slowest >= latency {
			t.Errorf("a call took %v, as long as the token endpoint (%v)", slowest, latency)
		}
		if n := h.as.TokenRequests(); n != 2 {
			t.Errorf("token requests = %d, want 2: one replica took over", n)
		}
	})

	t.Run("no token valid", func(t *testing.T) {
		h.clock.Add(2 * time.Hour) // every token has expired
		plantLease(t, rs, lease)
		before := h.as.TokenRequests()
		start := time.Now()
		got := load(h, clients[1:], 20, req)
		took := time.Since(start)
		if len(got) != 1 || len(errorsIn(got)) > 0 {
			t.Fatalf("waiters got %v, want one token for all", got)
		}
		t.Logf("40 waiting callers had a token %v after the holder died (lease %v, fetch %v)", took, lease, latency)
		if took > lease+latency+time.Second {
			t.Errorf("waiters took %v, want within the lease TTL (%v) plus one fetch", took, lease)
		}
		if n := h.as.TokenRequests() - before; n != 1 {
			t.Errorf("token requests = %d, want 1", n)
		}
	})
}

// TestBackAsSoonAsTheBank: three replicas, no token, a token endpoint that
// fails long enough to open the breaker while callers wait: the next attempt
// is never more than retry.max_backoff_with_waiters (5s) after a failure, so
// the callers have a token within 5s of the bank's return. A caller waits for
// an in-flight fetch of a hanging bank only until its own deadline.
func TestBackAsSoonAsTheBank(t *testing.T) {
	h := newHarness(t, withRedis("", redistest.Start(t).Addr()))
	_, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}

	h.as.SetFaults(oauthtest.Faults{Latency: 10 * time.Second})
	t0 := time.Now()
	_, err := h.getWithin(clients[0], req, 300*time.Millisecond)
	if took := time.Since(t0); err == nil || took > time.Second {
		t.Fatalf("a hanging bank: %v after %v, want an error at the caller's 300ms deadline", err, took)
	}

	h.as.SetFaults(oauthtest.Faults{Status: 503})
	var healed time.Time
	var mu sync.Mutex
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	recovered := make([]time.Duration, 3)
	for i, c := range clients {
		wg.Go(func() {
			for ctx.Err() == nil {
				if _, err := h.getWithin(c, req, 8*time.Second); err == nil {
					mu.Lock()
					recovered[i] = time.Since(healed)
					mu.Unlock()
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
	// Fail until the breaker would be open (more than 5 failures per replica
	// would be 6+; the replicas share one lease, so count all of them).
	for h.as.TokenRequests() < 12 && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	healed = time.Now()
	mu.Unlock()
	h.as.SetFaults(oauthtest.Faults{})
	wg.Wait()
	outage := healed.Sub(t0)
	t.Logf("%d attempts in a %v outage; callers had a token %v after the bank's return", h.as.TokenRequests(), outage.Round(time.Millisecond), recovered)
	for i, d := range recovered {
		if d <= 0 || d > 5*time.Second+time.Second {
			t.Errorf("replica %d's callers had a token %v after the bank's return, want within 5s", i, d)
		}
	}
}

// TestGoClientWithShortTokens: the Go library without WithMinTTL leaves
// min_ttl to the broker, whose default fits 30s tokens, and caches them.
func TestGoClientWithShortTokens(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetExpiresIn(30 * time.Second)
	ts := client.TokenSource(h.conn(nil, payments), "identity")
	first, err := ts.Token()
	if err != nil {
		t.Fatalf("Token with 30s tokens: %v", err)
	}
	for range 20 {
		tok, err := ts.Token()
		if err != nil {
			t.Fatal(err)
		}
		if tok.AccessToken != first.AccessToken {
			t.Fatal("a fresh 30s token was not cached by the client")
		}
	}
	// An explicit min_ttl the lifetime cannot give is still refused.
	if _, err := client.TokenSource(h.conn(nil, payments), "identity", client.WithMinTTL(time.Minute)).Token(); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("WithMinTTL(1m) against 30s tokens: %v, want FAILED_PRECONDITION", err)
	}
}
