package broker

import (
	"context"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

// TestSlowRefreshHoldsBackNoOther: the background refresher replaces a token
// that falls due while another credential's refresh hangs on its token
// endpoint. Before, each round waited for all its refreshes, so one slow
// endpoint (up to its timeout, and lease waits of three lock TTLs) delayed
// every other credential's refresh, on any endpoint.
func TestSlowRefreshHoldsBackNoOther(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{t: time.Now()}
	slow, fast := startOAuth(t, time.Hour, clock.Now), startOAuth(t, time.Hour, clock.Now)
	secretFile, callers := testClientParts(t)
	var creds []Credential
	for name, as := range map[string]*oauthtest.Server{"slow": slow, "fast": fast} {
		up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile, Now: clock.Now})
		if err != nil {
			t.Fatal(err)
		}
		creds = append(creds, Credential{Name: name, Scopes: []string{"IDENTITY"}, MinTTL: 30 * time.Second,
			Callers: callers, Fetcher: up, TokenURL: as.TokenURL(), ClientID: "app", Timeout: 5 * time.Second})
	}
	b, err := New(Options{Store: store.NewMemory(clock.Now), Now: clock.Now, RefreshInterval: 10 * time.Millisecond, CheckInterval: -1, Credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)

	// fast's token is fetched 20 minutes after slow's, so it falls due later.
	issued := map[string]time.Time{}
	for _, name := range []string{"slow", "fast"} {
		for range 2 { // the second call records the callers' min_ttl
			is, err := b.GetToken(ctx, testCaller, Request{Credential: name})
			if err != nil {
				t.Fatal(err)
			}
			issued[name] = is.Entry.IssuedAt
		}
		clock.Add(20 * time.Minute)
	}
	// Callers keep asking (within the idle timeout), slow's endpoint hangs,
	// and slow's token falls due: its refresh starts and hangs.
	slow.SetFaults(oauthtest.Faults{Latency: 4 * time.Second})
	clock.Add(18 * time.Minute)
	for _, name := range []string{"slow", "fast"} {
		if _, err := b.GetToken(ctx, testCaller, Request{Credential: name}); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 2*time.Second, "slow's refresh to start", func() bool { return slow.TokenRequests() == 2 })

	// Now fast's falls due: it is replaced while slow's refresh still hangs.
	clock.Add(20 * time.Minute)
	if _, err := b.GetToken(ctx, testCaller, Request{Credential: "fast", MinTTL: time.Second}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Second, "fast's token replaced while slow's refresh hangs", func() bool {
		is, err := b.GetToken(ctx, testCaller, Request{Credential: "fast", MinTTL: time.Second})
		return err == nil && is.Entry.IssuedAt.After(issued["fast"])
	})
	if n := fast.TokenRequests(); n != 2 {
		t.Errorf("fast's token requests = %d, want 2 (the refresh only)", n)
	}
}

// waitUntil polls cond on the real clock for up to d, failing t with what
// it waited for.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
	}
}
