package broker

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

// fakeClock is a settable clock shared by the broker, its upstream client and oauthtest.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

const testCaller = policy.Identity("spiffe://bank.internal/ns/kyc/sa/worker")

// newTestBroker returns a Broker on st (nil: a memory store) in front of a real
// oauthtest server issuing tokens of lifetime ttl, with no background refresher.
func newTestBroker(t testing.TB, st store.Store, ttl time.Duration) (*Broker, *oauthtest.Server, *fakeClock) {
	t.Helper()
	clock := &fakeClock{t: time.Now()} // real time at first, so a store on the real clock agrees
	as := startOAuth(t, ttl, clock.Now)
	return newReplica(t, st, as, clock), as, clock
}

// startOAuth starts an oauthtest server on loopback issuing tokens of
// lifetime ttl to client "app" (secret "test-secret"), on clock now (nil:
// real time).
func startOAuth(t testing.TB, ttl time.Duration, now func() time.Time) *oauthtest.Server {
	t.Helper()
	as := oauthtest.New(oauthtest.Options{ExpiresIn: ttl, Now: now})
	as.AddClient(oauthtest.Client{ID: "app", Secret: "test-secret", Scopes: []string{"IDENTITY"}})
	if err := as.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = as.Close() })
	return as
}

// newRedisStore returns a Redis store on the server at addr, sealing with
// key (nil: a random one), keys under prefix, on clock now (nil: real time).
func newRedisStore(t testing.TB, addr, prefix string, key []byte, now func() time.Time) *store.Redis {
	t.Helper()
	if key == nil {
		key = make([]byte, store.KeySize)
		_, _ = rand.Read(key)
	}
	sealer, err := store.NewSealer(key)
	if err != nil {
		t.Fatal(err)
	}
	rst, err := store.NewRedis(store.RedisOptions{Client: store.NewRedisClient(store.RedisConfig{Addrs: []string{addr}}),
		Prefix: prefix, Sealer: sealer, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rst.Close() })
	return rst
}

// testClientParts writes oauthtest's client secret ("test-secret") to a
// file and compiles the callers the test credentials allow (testCaller's
// namespace).
func testClientParts(tb testing.TB) (secretFile string, callers *policy.Matcher) {
	tb.Helper()
	secretFile = filepath.Join(tb.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("test-secret"), 0o600); err != nil {
		tb.Fatal(err)
	}
	callers, err := policy.Compile([]string{"spiffe://bank.internal/ns/kyc/*"})
	if err != nil {
		tb.Fatal(err)
	}
	return secretFile, callers
}

// newReplica returns a Broker on st (nil: a memory store) in front of as, on
// clock, with no background refresher: one replica of a deployment.
func newReplica(t testing.TB, st store.Store, as *oauthtest.Server, clock *fakeClock) *Broker {
	t.Helper()
	secretFile, callers := testClientParts(t)
	up, err := upstream.New(upstream.Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if st == nil {
		st = store.NewMemory(clock.Now)
	}
	b, err := New(Options{Store: st, Now: clock.Now, RefreshInterval: -1, Credentials: []Credential{{
		Name: "identity", Scopes: []string{"IDENTITY"}, MinTTL: 30 * time.Second, Callers: callers, Fetcher: up,
		TokenURL: as.TokenURL(), ClientID: "app"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// TestSteadyStateDay: a caller every second for 24 simulated hours, 5-minute
// tokens. Nobody ever gets a token below min_ttl, nobody waits on the bank
// after the first call, and the bank sees one request per refresh interval.
func TestSteadyStateDay(t *testing.T) {
	const ttl = 5 * time.Minute
	b, as, clock := newTestBroker(t, nil, ttl)
	ctx := context.Background()
	req := Request{Credential: "identity", MinTTL: 30 * time.Second, MinTTLSet: true}
	const day = 24 * 60 * 60
	for i := range day {
		b.RefreshDue(ctx) // what the background refresher does each second
		before := as.TokenRequests()
		is, err := b.GetToken(ctx, testCaller, req)
		if err != nil {
			t.Fatalf("second %d: %v", i, err)
		}
		if left := is.Expiry.Sub(clock.Now()); left < req.MinTTL {
			t.Fatalf("second %d: a token with %v left, below min_ttl", i, left)
		}
		if i > 0 && (as.TokenRequests() != before || is.Source != SourceMemory) {
			t.Fatalf("second %d: the caller waited on the token endpoint (source %s)", i, is.Source)
		}
		clock.Add(time.Second)
	}
	// Each 300s token must be replaced by the time it has min_ttl (30s) plus
	// the upstream timeout (10s) left; the refresher starts a room of 65s
	// (a quarter of the 260s it serves) plus up to 16s of jitter earlier:
	// one request per 179s to 196s (the refresher runs once a second).
	n := as.TokenRequests()
	lo, hi := int64(day/196), int64(day/179)+1
	if n < lo || n > hi {
		t.Errorf("token requests over 24h = %d, want between %d and %d", n, lo, hi)
	}
	t.Logf("24h with 5-minute tokens: %d token requests (bounds %d..%d)", n, lo, hi)
}

// TestIdleTokensAreNotRefreshed: a key nobody asks for stops being refreshed
// after the idle timeout, and its slot is forgotten once the token expires.
func TestIdleTokensAreNotRefreshed(t *testing.T) {
	b, as, clock := newTestBroker(t, nil, 5*time.Minute)
	ctx := context.Background()
	if _, err := b.GetToken(ctx, testCaller, Request{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	for range 2 * 60 * 60 { // two hours of silence
		clock.Add(time.Second)
		b.RefreshDue(ctx)
	}
	// Refreshed while asked for within 30 minutes: at most 30m/179s + 1 = 11 requests.
	if n := as.TokenRequests(); n > 11 {
		t.Errorf("token requests for an idle key = %d, want at most 11", n)
	}
	empty := true
	b.l1.Range(func(any, any) bool { empty = false; return false })
	if !empty {
		t.Error("the idle key's slot was not forgotten")
	}
}
