package broker

import (
	"context"
	"crypto/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/store"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// simulation is a deployment of replicas in front of one authorization server,
// driven by a fake clock: every step each replica runs its refresher and each
// of its callers asks for a token.
type simulation struct {
	as       *oauthtest.Server
	clock    *fakeClock
	replicas []*Broker
}

// newSimulation starts n replicas, sharing one Redis when shared is set, each
// with its own in-process store otherwise.
func newSimulation(t *testing.T, n int, shared bool, ttl time.Duration) *simulation {
	t.Helper()
	clock := &fakeClock{t: time.Now()}
	as := startOAuth(t, ttl, clock.Now)
	sim := &simulation{as: as, clock: clock}
	var addr string
	key := make([]byte, store.KeySize) // one sealing key for every replica
	if shared {
		addr = redistest.Start(t).Addr()
		_, _ = rand.Read(key)
	}
	for range n {
		var st store.Store
		if shared {
			st = newRedisStore(t, addr, "sim:", key, clock.Now)
		}
		sim.replicas = append(sim.replicas, newReplica(t, st, as, clock))
	}
	return sim
}

// run advances the clock by step until d has passed. At each step every
// replica refreshes what is due, then callers concurrent callers on each
// replica ask for a token. It fails the test on any error, on a token below
// min_ttl, or on a caller that waited for the bank after the first step; it
// returns the number of GetToken calls.
func (sim *simulation) run(t *testing.T, d, step time.Duration, callers int) int64 {
	t.Helper()
	ctx := context.Background()
	req := Request{Credential: "identity"}
	var calls, waited atomic.Int64
	for i := 0; time.Duration(i)*step < d; i++ {
		var wg sync.WaitGroup
		for _, r := range sim.replicas {
			wg.Go(func() { r.RefreshDue(ctx) })
		}
		wg.Wait()
		for _, r := range sim.replicas {
			for range callers {
				wg.Go(func() {
					is, err := r.GetToken(ctx, testCaller, req)
					calls.Add(1)
					switch {
					case err != nil:
						t.Errorf("step %d: %v", i, err)
					case is.Expiry.Sub(sim.clock.Now()) < 30*time.Second:
						t.Errorf("step %d: a token below min_ttl", i)
					case i > 0 && is.Source == SourceUpstream:
						waited.Add(1)
					}
				})
			}
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		sim.clock.Add(step)
	}
	if n := waited.Load(); n > 0 {
		t.Errorf("%d calls after the first step waited for the token endpoint; refresh ahead should spare them", n)
	}
	return calls.Load()
}

// TestUpstreamEfficiency: 3 replicas with 100 callers each over 10 token
// lifetimes. Shared through Redis, the bank sees at most one request per
// lifetime plus the first; with per-replica caches alone (no shared store),
// one per lifetime per replica; naively, one per call.
func TestUpstreamEfficiency(t *testing.T) {
	const (
		replicas, callers, lifetimes = 3, 100, 10
		ttl                          = time.Hour
		step                         = 15 * time.Second
	)
	shared := newSimulation(t, replicas, true, ttl)
	calls := shared.run(t, lifetimes*ttl, step, callers)
	fetches := shared.as.TokenRequests()
	if fetches > lifetimes+1 {
		t.Errorf("shared: %d token requests over %d lifetimes, want at most %d", fetches, lifetimes, lifetimes+1)
	}
	// The same deployment without the shared store: each replica fetches
	// for itself. Its count shows what sharing saves, and that the bound
	// above is not met by luck of timing.
	alone := newSimulation(t, replicas, false, ttl)
	alone.run(t, lifetimes*ttl, step, callers)
	perReplica := alone.as.TokenRequests()
	if perReplica < replicas*lifetimes {
		t.Errorf("per-replica caches: %d token requests, want at least %d (one per lifetime per replica)", perReplica, replicas*lifetimes)
	}
	t.Logf("%d replicas x %d callers, %d lifetimes of %v (a call per caller every %v): %d calls; token requests: naive %d, per-replica cache %d, shared %d",
		replicas, callers, lifetimes, ttl, step, calls, calls, perReplica, fetches)
}
