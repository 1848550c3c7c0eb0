package store_test

import (
	"context"
	"crypto/rand"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/store"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// The tests here write into Redis what someone else with write access could,
// and check that the store neither serves nor keeps what it should not.

const k = "identity:k"

func sharedKey(t *testing.T) []byte {
	t.Helper()
	key := make([]byte, store.KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return key
}

func entryAt(fp string, issued time.Time, ttl time.Duration) *store.Entry {
	return &store.Entry{AccessToken: "token-" + fp, TokenType: "Bearer", Scopes: []string{"IDENTITY"},
		IssuedAt: issued, Expiry: issued.Add(ttl), Fingerprint: fp}
}

// TestRedisPlainFieldsAreNotTrusted: raising the plain exp copy no longer
// blocks a newer token, and an entry whose copies disagree is not served.
func TestRedisPlainFieldsAreNotTrusted(t *testing.T) {
	srv := redistest.Start(t)
	r := newRedisStore(t, srv.Addr())
	c, ctx := srv.Client(), context.Background()
	if ok, err := r.PutIfNewer(ctx, k, entry("a", time.Hour)); !ok || err != nil {
		t.Fatalf("put a = %v, %v", ok, err)
	}
	far := strconv.FormatInt(time.Now().Add(1000*time.Hour).UnixMilli(), 10)
	c.HSet(ctx, "tb-test:{"+k+"}", "exp", far)
	if _, err := r.Get(ctx, k); !errors.Is(err, store.ErrNotFound) || r.Tampered() == 0 {
		t.Errorf("entry with an altered exp copy: Get = %v, tampered = %d; want a miss, counted", err, r.Tampered())
	}
	if ok, err := r.PutIfNewer(ctx, k, entry("b", 2*time.Hour)); !ok || err != nil {
		t.Fatalf("a newer token after exp was raised: put = %v, %v; want stored", ok, err)
	}
	if got, err := r.Get(ctx, k); err != nil || got.Fingerprint != "b" {
		t.Errorf("Get = %v, %v; want b", got, err)
	}
	// The copies are rewritten from the sealed record.
	if got := c.HGet(ctx, "tb-test:{"+k+"}", "exp").Val(); got == far {
		t.Error("the forged exp copy survived the put")
	}
}

// TestRedisRollback: an invalidated token written back into Redis (a copy of
// its sealed value, taken earlier) is not served, and neither it nor an older
// token can be stored again; a newer one can.
func TestRedisRollback(t *testing.T) {
	srv := redistest.Start(t)
	key := sharedKey(t)
	r1, r2 := newRedisStore(t, srv.Addr(), key), newRedisStore(t, srv.Addr(), key)
	c, ctx := srv.Client(), context.Background()
	now := time.Now()
	old := entryAt("old", now.Add(-time.Minute), time.Hour)
	a := entryAt("a", now, time.Hour)
	if ok, _ := r1.PutIfNewer(ctx, k, a); !ok {
		t.Fatal("put a not stored")
	}
	saved := c.HGetAll(ctx, "tb-test:{"+k+"}").Val()
	if ok, err := r1.DeleteIfCurrent(ctx, k, "a"); !ok || err != nil {
		t.Fatalf("invalidate a = %v, %v", ok, err)
	}
	tombTTL := c.PTTL(ctx, "tb-test:{"+k+"}:tomb").Val()
	if tombTTL < 59*time.Minute || tombTTL > time.Hour {
		t.Errorf("tombstone TTL = %v, want the token's remaining life (about 1h)", tombTTL)
	}
	// Someone writes the invalidated token back, with a raised exp copy.
	restored := map[string]any{}
	for f, v := range saved {
		restored[f] = v
	}
	c.HSet(ctx, "tb-test:{"+k+"}", restored)
	c.Persist(ctx, "tb-test:{"+k+"}")
	for i, r := range []*store.Redis{r1, r2} {
		if got, err := r.Get(ctx, k); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("replica %d served the invalidated token written back: %v, %v", i+1, got, err)
		}
	}
	for _, e := range []*store.Entry{a, old} {
		if ok, _ := r2.PutIfNewer(ctx, k, e); ok {
			t.Errorf("token %s (invalidated, or issued before the invalidated one) was stored again", e.Fingerprint)
		}
	}
	b := entryAt("b", now.Add(time.Second), time.Hour)
	if ok, err := r2.PutIfNewer(ctx, k, b); !ok || err != nil {
		t.Fatalf("a newer token after the rollback: put = %v, %v; want stored", ok, err)
	}
	if got, err := r1.Get(ctx, k); err != nil || got.Fingerprint != "b" {
		t.Errorf("Get = %v, %v; want b", got, err)
	}
	// A tombstone someone else wrote is ignored.
	c.Set(ctx, "tb-test:{"+k+"}:tomb", "forged", 0)
	if got, err := r1.Get(ctx, k); err != nil || got.Fingerprint != "b" {
		t.Errorf("with a forged tombstone, Get = %v, %v; want b", got, err)
	}
}

// TestRedisUnopenableValueIsReplaced: a value sealed with a key the fleet
// does not have, expiring later than fresh tokens and without a TTL, is a
// miss and the next valid token replaces it.
func TestRedisUnopenableValueIsReplaced(t *testing.T) {
	srv := redistest.Start(t)
	foreign := newRedisStore(t, srv.Addr())
	r := newRedisStore(t, srv.Addr())
	c, ctx := srv.Client(), context.Background()
	if ok, _ := foreign.PutIfNewer(ctx, k, entry("x", 100*time.Hour)); !ok {
		t.Fatal("foreign put not stored")
	}
	c.Persist(ctx, "tb-test:{"+k+"}")
	if _, err := r.Get(ctx, k); !errors.Is(err, store.ErrNotFound) || r.Unsealable() == 0 {
		t.Fatalf("Get = %v, unsealable = %d; want a counted miss", err, r.Unsealable())
	}
	if ok, err := r.PutIfNewer(ctx, k, entry("a", time.Hour)); !ok || err != nil {
		t.Fatalf("put over an unopenable value = %v, %v; want stored", ok, err)
	}
	if got, err := r.Get(ctx, k); err != nil || got.Fingerprint != "a" {
		t.Errorf("Get = %v, %v; want a", got, err)
	}
	if ttl := c.PTTL(ctx, "tb-test:{"+k+"}").Val(); ttl <= 0 || ttl > time.Hour {
		t.Errorf("TTL after the replacement = %v, want the token's life", ttl)
	}
}

// TestRedisWrongTypesAreAbsent: keys of the wrong type are treated as absent
// and replaced; they do not mark Redis down.
func TestRedisWrongTypesAreAbsent(t *testing.T) {
	srv := redistest.Start(t)
	r := newRedisStore(t, srv.Addr())
	c, ctx := srv.Client(), context.Background()
	c.Set(ctx, "tb-test:{"+k+"}", "junk", 0)
	c.HSet(ctx, "tb-test:{"+k+"}:tomb", "f", "v")
	c.LPush(ctx, "tb-test:{"+k+"}:lock", "x")
	if _, err := r.Get(ctx, k); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get over a string = %v, want ErrNotFound", err)
	}
	if err := r.Lock(ctx, k, "o1", time.Second); err != nil {
		t.Errorf("Lock over a list = %v, want taken", err)
	}
	if ok, err := r.PutIfNewer(ctx, k, entry("a", time.Hour)); !ok || err != nil {
		t.Errorf("put over a string = %v, %v", ok, err)
	}
	if r.State() != "ok" {
		t.Errorf("State = %s after wrong types, want ok", r.State())
	}
}

// TestRedisLeasePoisoning: a lease without a TTL, or with one above the
// bound, is broken and taken (counted); a lease within the bound holds.
func TestRedisLeasePoisoning(t *testing.T) {
	srv := redistest.Start(t)
	r := newRedisStore(t, srv.Addr())
	c, ctx := srv.Client(), context.Background()
	lock := "tb-test:{" + k + "}:lock"
	bound := 5 * time.Second
	for i, poison := range []func(){
		func() { c.Set(ctx, lock, "x", 0) },
		func() { c.Set(ctx, lock, "x", time.Hour) },
	} {
		poison()
		if err := r.Lock(ctx, k, "o1", bound); err != nil {
			t.Errorf("case %d: Lock over a stale lease = %v, want taken", i, err)
		}
		if ttl := c.PTTL(ctx, lock).Val(); ttl <= 0 || ttl > bound {
			t.Errorf("case %d: lease TTL = %v, want within %v", i, ttl, bound)
		}
		if err := r.Unlock(ctx, k, "o1"); err != nil {
			t.Fatal(err)
		}
	}
	if n := r.LeasesBroken(); n != 2 {
		t.Errorf("leases broken = %d, want 2", n)
	}
	c.Set(ctx, lock, "x", bound)
	if err := r.Lock(ctx, k, "o1", bound); !errors.Is(err, store.ErrLocked) {
		t.Errorf("Lock over a lease within the bound = %v, want ErrLocked", err)
	}
}

// TestRedisEventsAuthenticated: only events with a valid MAC under the
// fleet's key, fresh and not seen before, reach the subscriber.
func TestRedisEventsAuthenticated(t *testing.T) {
	srv := redistest.Start(t)
	key := sharedKey(t)
	a, b := newRedisStore(t, srv.Addr(), key), newRedisStore(t, srv.Addr(), key)
	other := newRedisStore(t, srv.Addr()) // another fleet's key
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	evs := make(chan store.Event, 64)
	b.Subscribe(ctx, func(ev store.Event) {
		if ev.Kind != store.EventResync { // the subscription established
			evs <- ev
		}
	})
	c := srv.Client()

	// Wait for the subscription: ever-later puts until b hears one.
	var heard string
	deadline := time.Now().Add(5 * time.Second)
	for i := 1; heard == ""; i++ {
		if time.Now().After(deadline) {
			t.Fatal("no event received")
		}
		_, _ = a.PutIfNewer(ctx, k, entry("a", time.Duration(i)*time.Minute))
		select {
		case ev := <-evs:
			heard = ev.Fingerprint
		case <-time.After(50 * time.Millisecond):
		}
	}
	var captured string
	sub := c.Subscribe(ctx, a.Channel())
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.PutIfNewer(ctx, k, entry("a2", 10*time.Hour)); err != nil {
		t.Fatal(err)
	}
	m, err := sub.ReceiveMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	captured = m.Payload
	drain(evs)
	before := b.EventsRejected()

	// 20 forged deletes in the old format, a genuine event of another fleet
	// (another key), 5 replays of a genuine event, one altered, one stale.
	for range 20 {
		c.Publish(ctx, a.Channel(), "2\x1f"+k+"\x1fa2")
	}
	if ok, _ := other.PutIfNewer(ctx, "identity:other", entry("o", time.Hour)); !ok {
		t.Fatal("other fleet's put not stored")
	}
	for range 5 {
		c.Publish(ctx, a.Channel(), captured)
	}
	altered := []byte(captured)
	altered[len("tb2\x1f1\x1f")] ^= 1 // the timestamp
	c.Publish(ctx, a.Channel(), string(altered))
	c.Publish(ctx, a.Channel(), "tb2\x1f2\x1f"+strconv.FormatInt(time.Now().Add(-time.Hour).UnixMilli(), 10)+"\x1f0000000000000000\x1f"+k+"\x1fa2\x1f00")

	// A genuine delete still arrives.
	if ok, err := a.DeleteIfCurrent(ctx, k, "a2"); !ok || err != nil {
		t.Fatalf("delete = %v, %v", ok, err)
	}
	var got []store.Event
	timeout := time.After(5 * time.Second)
	for len(got) == 0 || got[len(got)-1].Kind != store.EventDelete {
		select {
		case ev := <-evs:
			got = append(got, ev)
		case <-timeout:
			t.Fatalf("genuine delete not received; got %v", got)
		}
	}
	if len(got) != 1 || got[0].Fingerprint != "a2" {
		t.Errorf("events delivered = %+v, want only the genuine delete of a2", got)
	}
	after := b.EventsRejected()
	want := map[string]int64{store.RejectMalformed: 20, store.RejectReplay: 5, store.RejectMAC: 3}
	for reason, n := range want {
		if d := after[reason] - before[reason]; d != n {
			t.Errorf("rejected %s = %d, want %d (all: %v)", reason, d, n, after)
		}
	}
}

func drain(ch chan store.Event) {
	for {
		select {
		case <-ch:
		case <-time.After(100 * time.Millisecond):
			return
		}
	}
}

// TestRedisProbe: the store's state follows Redis without any traffic:
// degraded from the start when Redis is down, within 5s of Redis being
// killed or hanging (SIGSTOP), and ok again when it answers.
func TestRedisProbe(t *testing.T) {
	srv := redistest.Start(t)
	dead := redistest.FreePort(t)
	down := newRedisStoreProbe(t, "127.0.0.1:"+strconv.Itoa(dead), 200*time.Millisecond)
	if st := down.State(); st != "degraded" {
		t.Errorf("started with Redis down: State = %s, want degraded at once", st)
	}
	r := newRedisStoreProbe(t, srv.Addr(), 200*time.Millisecond)
	if st := r.State(); st != "ok" {
		t.Fatalf("State = %s, want ok", st)
	}
	waitState := func(want string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		for r.State() != want {
			if time.Since(start) > within {
				t.Fatalf("State = %s after %v, want %s", r.State(), within, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return time.Since(start)
	}
	srv.Pause()
	t.Logf("hung (SIGSTOP): degraded after %v", waitState("degraded", 5*time.Second))
	srv.Resume()
	t.Logf("resumed: ok after %v", waitState("ok", 5*time.Second))
	srv.Kill()
	t.Logf("killed: degraded after %v", waitState("degraded", 5*time.Second))
	srv.Restart()
	t.Logf("restarted: ok after %v", waitState("ok", 5*time.Second))
}

func newRedisStoreProbe(t *testing.T, addr string, every time.Duration) *store.Redis {
	t.Helper()
	sealer, err := store.NewSealer(sharedKey(t))
	if err != nil {
		t.Fatal(err)
	}
	r, err := store.NewRedis(store.RedisOptions{
		Client: store.NewRedisClient(store.RedisConfig{Addrs: []string{addr}}),
		Prefix: "tb-test:", Sealer: sealer, ProbeInterval: every,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}
