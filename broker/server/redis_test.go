package server

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// withRedis makes the brokers share Redis at addrs (with masterName: sentinels).
func withRedis(masterName string, addrs ...string) func(*config.Config) {
	return func(c *config.Config) {
		c.Store.Backend = "redis"
		c.Store.Redis.Addrs = addrs
		c.Store.Redis.MasterName = masterName
	}
}

// underLoad is withRedis for a load test: each client connection carries
// ten callers' calls, thousands a second, which is a busy client and not an
// attack, so the per-connection limit on new streams is lifted.
func underLoad(masterName string, addrs ...string) func(*config.Config) {
	return func(c *config.Config) {
		withRedis(masterName, addrs...)(c)
		c.Limits.NewStreamsPerSecond, c.Limits.NewStreamsBurst = 1e9, 1e9
	}
}

// replicas starts n-1 brokers beside h.srv; it returns all n and a client for each.
func replicas(h *harness, n int) ([]*Server, []pb.TokenBrokerClient) {
	srvs := []*Server{h.srv}
	for range n - 1 {
		srv, _ := h.startBroker()
		srvs = append(srvs, srv)
	}
	var clients []pb.TokenBrokerClient
	for _, srv := range srvs {
		clients = append(clients, pb.NewTokenBrokerClient(h.connTo(srv, nil, payments)))
	}
	return srvs, clients
}

// load runs callers concurrent GetTokens on each client and counts the
// results by fingerprint, or by "error: <message>".
func load(h *harness, clients []pb.TokenBrokerClient, callers int, req *pb.GetTokenRequest) map[string]int {
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	for _, c := range clients {
		for range callers {
			wg.Go(func() {
				tok, err := h.get(c, req)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					seen["error: "+status.Convert(err).Message()]++
					return
				}
				seen[tok.GetFingerprint()]++
			})
		}
	}
	wg.Wait()
	return seen
}

// firstKey returns some key of m (the only one, when m has one).
func firstKey(m map[string]int) string {
	for k := range m {
		return k
	}
	return ""
}

func errorsIn(results map[string]int) []string {
	var out []string
	for k := range results {
		if strings.HasPrefix(k, "error: ") {
			out = append(out, k)
		}
	}
	return out
}

// entryKeys lists the token entries in Redis (not lease locks).
func entryKeys(t *testing.T, c *redis.Client) []string {
	t.Helper()
	var out []string
	for _, k := range c.Keys(context.Background(), "tb-test:{*}").Val() {
		if !strings.HasSuffix(k, ":lock") {
			out = append(out, k)
		}
	}
	return out
}

// checkRedisClean scans every key and value for the tokens handed out, the
// client secret and the sealing key, in any of its encodings.
func checkRedisClean(t *testing.T, h *harness, c *redis.Client) {
	t.Helper()
	ctx := context.Background()
	h.mu.Lock()
	needles := []string{h.secret, string(h.storeKey), base64.StdEncoding.EncodeToString(h.storeKey)}
	for tok := range h.tokens {
		needles = append(needles, tok)
	}
	h.mu.Unlock()
	keys := c.Keys(ctx, "*").Val()
	if len(keys) == 0 {
		t.Fatal("Redis is empty: nothing was scanned")
	}
	for _, k := range keys {
		var values []string
		switch c.Type(ctx, k).Val() {
		case "hash":
			for f, v := range c.HGetAll(ctx, k).Val() {
				values = append(values, f, v)
			}
		case "string":
			values = append(values, c.Get(ctx, k).Val())
		}
		for _, v := range append(values, k) {
			for _, n := range needles {
				if n != "" && strings.Contains(v, n) {
					t.Errorf("Redis key %s holds a token, the client secret or the sealing key in plain text", k)
				}
			}
		}
	}
}

type readyzBody struct {
	Status      string            `json:"status"`
	Checks      map[string]string `json:"checks"`
	Store       map[string]any    `json:"store"`
	Credentials map[string]any    `json:"credentials"`
}

func (h *harness) readyz(t *testing.T) (int, readyzBody) {
	t.Helper()
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b readyzBody
	if err := json.NewDecoder(resp.Body).Decode(&b); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func TestReplicasShareOneFetch(t *testing.T) {
	setups := []struct {
		name  string
		start func(t *testing.T) func(*config.Config)
	}{
		{"standalone", func(t *testing.T) func(*config.Config) { return withRedis("", redistest.Start(t).Addr()) }},
		{"cluster", func(t *testing.T) func(*config.Config) {
			return withRedis("", redistest.StartCluster(t, 3).Addrs()...)
		}},
		{"sentinel", func(t *testing.T) func(*config.Config) {
			g := redistest.StartSentinel(t)
			return withRedis(g.MasterName, g.Sentinel.Addr())
		}},
	}
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			h := newHarness(t, s.start(t))
			h.as.SetFaults(oauthtest.Faults{Latency: 200 * time.Millisecond})
			_, clients := replicas(h, 3)
			got := load(h, clients, 200, &pb.GetTokenRequest{Credential: "identity"})
			if len(got) != 1 || len(errorsIn(got)) > 0 {
				t.Fatalf("3x200 callers got %d distinct results (errors: %v), want one token for all", len(got), errorsIn(got))
			}
			if n := h.as.TokenRequests(); n != 1 {
				t.Errorf("token requests = %d, want 1 across 3 replicas", n)
			}
		})
	}
}

// TestOneReplicaRefreshes: three replicas past the refresh point refresh
// together; the bank sees one request, and all three serve the new token.
func TestOneReplicaRefreshes(t *testing.T) {
	h := newHarness(t, withRedis("", redistest.Start(t).Addr()))
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if got := load(h, clients, 1, req); len(got) != 1 {
		t.Fatalf("before: %v", got)
	}
	// Past every jittered refresh point of a 1h token (59m50s after the
	// margin; min_ttl 30s plus the 2s timeout, plus 2 to 2.5 minutes of
	// room: the refresh starts 152 to 182s before expiry), with more than
	// min_ttl left.
	h.clock.Add(57*time.Minute + 30*time.Second)
	// Still in use on every replica (else idle_timeout would stop refreshing).
	if got := load(h, clients, 1, req); len(got) != 1 || h.as.TokenRequests() != 1 {
		t.Fatalf("cache hits at 57.5 minutes: %v, %d requests", got, h.as.TokenRequests())
	}
	var wg sync.WaitGroup
	for _, srv := range srvs {
		wg.Go(func() { srv.broker.RefreshDue(context.Background()) })
	}
	wg.Wait()
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2: one replica refreshed for all", n)
	}
	if got := load(h, clients, 1, req); len(got) != 1 || h.as.TokenRequests() != 2 {
		t.Errorf("after the refresh the replicas serve %d tokens with %d requests; want 1 and 2", len(got), h.as.TokenRequests())
	}
}

func TestRestartedBrokersReadFromRedis(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	first, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	// New brokers, with empty in-process caches, on the same Redis.
	for i := range 2 {
		srv, _ := h.startBroker()
		tok, err := h.get(pb.NewTokenBrokerClient(h.connTo(srv, nil, payments)), &pb.GetTokenRequest{Credential: "identity"})
		if err != nil || tok.GetFingerprint() != first.GetFingerprint() {
			t.Errorf("restarted broker %d: err %v, same token %v; want the stored token", i, err, tok.GetFingerprint() == first.GetFingerprint())
		}
	}
	if n := h.as.TokenRequests(); n != 1 {
		t.Errorf("token requests = %d, want 1: restarted brokers read Redis", n)
	}
	checkRedisClean(t, h, rs.Client())
}

func TestEvictLocalReadsRedis(t *testing.T) {
	h := newHarness(t, withRedis("", redistest.Start(t).Addr()))
	c := h.client(payments)
	first, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(h.logs.String(), `"source":"redis"`) {
		t.Fatal("a token was served from Redis before any eviction")
	}
	h.srv.broker.EvictLocal()
	again, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil || again.GetFingerprint() != first.GetFingerprint() || h.as.TokenRequests() != 1 {
		t.Fatalf("after EvictLocal: %v, same %v, requests %d; want the stored token, no fetch",
			err, again.GetFingerprint() == first.GetFingerprint(), h.as.TokenRequests())
	}
	if !strings.Contains(h.logs.String(), `"source":"redis"`) {
		t.Error("after EvictLocal the token was not served from Redis")
	}
}

func TestRedisOutageFailsOpen(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 2)
	if got := load(h, clients, 20, &pb.GetTokenRequest{Credential: "identity"}); len(got) != 1 {
		t.Fatalf("before the outage: %d distinct results, errors %v", len(got), errorsIn(got))
	}
	rs.Kill()
	// Cache hits, and misses that must fetch (a scope set not cached yet), succeed.
	for _, req := range []*pb.GetTokenRequest{
		{Credential: "identity"},
		{Credential: "identity", Scopes: []string{"IDENTITY"}},
	} {
		if errs := errorsIn(load(h, clients, 20, req)); len(errs) > 0 {
			t.Errorf("during the outage, calls for %v failed: %v", req.GetScopes(), errs)
		}
	}
	if code, body := h.readyz(t); code != http.StatusOK || body.Store["state"] != "degraded" || body.Store["backend"] != "redis" ||
		body.Store["outages"] != float64(1) {
		t.Errorf("/readyz during the outage = %d %+v, want 200 with the redis store degraded after 1 outage", code, body)
	}
	if n := h.metric(t, "tokenbroker_store_errors_total", "op=get"); n < 1 {
		t.Errorf("store errors (get) during the outage = %v, want some", n)
	}
	if up := h.metric(t, "tokenbroker_store_up", "backend=redis"); up != 0 {
		t.Errorf("tokenbroker_store_up during the outage = %v, want 0", up)
	}

	rs.Restart()
	deadline := time.Now().Add(10 * time.Second)
	for srvs[0].store.State() != "ok" || srvs[1].store.State() != "ok" {
		if time.Now().After(deadline) {
			t.Fatal("the replicas did not find Redis back within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if up := h.metric(t, "tokenbroker_store_up", "backend=redis"); up != 1 {
		t.Errorf("tokenbroker_store_up after recovery = %v, want 1", up)
	}
	// Sharing resumes: a token fetched by one replica is read by the other.
	before := h.as.TokenRequests()
	req := &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}}
	a, errA := h.get(clients[0], req)
	b, errB := h.get(clients[1], req)
	if errA != nil || errB != nil || a.GetFingerprint() != b.GetFingerprint() {
		t.Errorf("after recovery: %v, %v, same token %v; want the second replica to read the first's", errA, errB, a.GetFingerprint() == b.GetFingerprint())
	}
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("after recovery, token requests = %d, want 1", n)
	}
	if code, body := h.readyz(t); code != http.StatusOK || body.Store["state"] != "ok" {
		t.Errorf("/readyz after recovery = %d %+v", code, body)
	}
}

func TestStartWithRedisDown(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(redistest.FreePort(t)) // nothing listens there
	h := newHarness(t, withRedis("", addr))
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("GetToken with Redis down since start: %v", err)
	}
}

func TestDeadLockHolderIsReplaced(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	_, clients := replicas(h, 2)
	if _, err := h.get(clients[0], &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	keys := entryKeys(t, rs.Client())
	if len(keys) != 1 {
		t.Fatalf("entries in Redis = %v, want 1", keys)
	}
	// A replica took the lease and died mid-fetch: the entry is gone and the
	// lease stays until it runs out.
	c := rs.Client()
	ctx := context.Background()
	if err := c.Del(ctx, keys[0]).Err(); err != nil {
		t.Fatal(err)
	}
	if err := c.Set(ctx, keys[0]+":lock", "a-replica-that-died", 1500*time.Millisecond).Err(); err != nil {
		t.Fatal(err)
	}
	// The second replica, which has no token in memory, waits out the lease and fetches.
	tok, err := h.get(clients[1], &pb.GetTokenRequest{Credential: "identity"})
	if err != nil || tok.GetAccessToken() == "" {
		t.Fatalf("GetToken behind a dead lease holder: %v", err)
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2 (the first fetch and the takeover)", n)
	}
}

func TestInvalidationReachesEveryReplica(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	_, clients := replicas(h, 2)
	req := &pb.GetTokenRequest{Credential: "identity"}
	a, err := h.get(clients[0], req)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := h.get(clients[1], req); err != nil || b.GetFingerprint() != a.GetFingerprint() {
		t.Fatalf("second replica: %v, same token %v", err, b.GetFingerprint() == a.GetFingerprint())
	}
	// A caller reports the token to the first replica; the second hears it on pub/sub.
	resp, err := clients[0].InvalidateToken(context.Background(), &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: a.GetFingerprint()})
	if err != nil || !resp.GetInvalidated() {
		t.Fatalf("InvalidateToken = %v, %v", resp.GetInvalidated(), err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for i, c := range clients {
		for {
			tok, err := h.get(c, req)
			if err != nil {
				t.Fatal(err)
			}
			if tok.GetFingerprint() != a.GetFingerprint() {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("replica %d still serves the dropped token after 5s", i)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2 (one replacement shared by both replicas)", n)
	}
	checkRedisClean(t, h, rs.Client())
}

// churn runs 10 callers per client for d while every token expires every
// 250ms (fake clock), so tokens keep being fetched through the store; during
// runs meanwhile. It reports calls served and failures by kind: errors that
// are not retryable, tokens below min_ttl, and (tolerated) UNAVAILABLE.
func churn(t *testing.T, h *harness, clients []pb.TokenBrokerClient, d time.Duration, during func()) (served int, failures map[string]int) {
	t.Helper()
	const minTTL = 30 * time.Second // the credential's default min_ttl
	var mu sync.Mutex
	jumped := 0
	failures = map[string]int{}
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for _, c := range clients {
		for range 10 {
			wg.Go(func() {
				for i := 0; i < 2000 && time.Now().Before(end); i++ {
					before := h.clock.Now()
					tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
					mu.Lock()
					switch {
					case err != nil && status.Code(err) != codes.Unavailable:
						failures["not retryable: "+status.Convert(err).Message()]++
					case err != nil && h.clock.Now().Sub(before) >= 2*61*time.Minute:
						// The fake clock jumped past two lifetimes during the call: a
						// token got for it expired before it was served, twice, so
						// "no token with min_ttl left could be had; retry" is right.
						// (A loaded machine delays calls across the 250ms ticks.)
						jumped++
					case err != nil:
						failures["unavailable: "+status.Convert(err).Message()]++
					case tok.GetExpireTime().AsTime().Before(before.Add(minTTL)):
						failures["served below min_ttl"]++
					default:
						served++
					}
					mu.Unlock()
				}
			})
		}
	}
	go during()
	for time.Now().Before(end) {
		time.Sleep(250 * time.Millisecond)
		h.clock.Add(61 * time.Minute)
	}
	wg.Wait()
	if served == 0 {
		t.Fatal("no call was served")
	}
	t.Logf("served %d, failures %v, token requests %d, calls the clock outran %d", served, failures, h.as.TokenRequests(), jumped)
	return served, failures
}

func TestSentinelFailoverDuringLoad(t *testing.T) {
	g := redistest.StartSentinel(t)
	h := newHarness(t, underLoad(g.MasterName, g.Sentinel.Addr()))
	_, clients := replicas(h, 3)
	ctx := context.Background()
	sentinel := g.Sentinel.Client()
	masterAddr := func() string {
		a, err := sentinel.Do(ctx, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", g.MasterName).StringSlice()
		if err != nil || len(a) != 2 {
			return ""
		}
		return a[0] + ":" + a[1]
	}
	if got := masterAddr(); got != g.Master.Addr() {
		t.Fatalf("sentinel reports master %q, want %s", got, g.Master.Addr())
	}
	_, failures := churn(t, h, clients, 4*time.Second, func() {
		time.Sleep(500 * time.Millisecond)
		if err := sentinel.Do(ctx, "SENTINEL", "FAILOVER", g.MasterName).Err(); err != nil {
			t.Errorf("SENTINEL FAILOVER: %v", err)
		}
	})
	for what, n := range failures {
		if what != "unavailable" {
			t.Errorf("%d calls: %s", n, what)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for masterAddr() != g.Replica.Addr() {
		if time.Now().After(deadline) {
			t.Fatalf("no failover happened: master is still %s", masterAddr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRedisKilledDuringLoad(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, underLoad("", rs.Addr()))
	_, clients := replicas(h, 3)
	_, failures := churn(t, h, clients, 3*time.Second, func() {
		time.Sleep(time.Second)
		rs.Kill()
	})
	// Fail-open: with a healthy token endpoint, no call fails at all.
	if len(failures) > 0 {
		t.Errorf("calls failed while Redis died: %v", failures)
	}
}

func TestRedisACLUserAndDB(t *testing.T) {
	rs := redistest.StartWith(t, redistest.Options{Args: []string{"--user", "broker", "on", ">broker-pw", "~*", "&*", "+@all"}})
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte("broker-pw"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		withRedis("", rs.Addr())(c)
		c.Store.Redis.Username = "broker"
		c.Store.Redis.PasswordFile = pwFile
		c.Store.Redis.DB = 3
	})
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	db3 := redis.NewClient(&redis.Options{Addr: rs.Addr(), DB: 3})
	defer db3.Close()
	ctx := context.Background()
	if n := len(db3.Keys(ctx, "tb-test:*").Val()); n != 1 || len(rs.Client().Keys(ctx, "*").Val()) != 0 {
		t.Errorf("keys in db 3 = %d (want 1), in db 0 = %v (want none)", n, rs.Client().Keys(ctx, "*").Val())
	}
	if who := rs.Client().Do(ctx, "CLIENT", "LIST").String(); !strings.Contains(who, "user=broker") {
		t.Errorf("no connection as ACL user broker: %s", who)
	}
}

func TestRedisOverTLSWithPassword(t *testing.T) {
	dir := t.TempDir()
	ca, err := devpki.NewCA("redis CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := ca.Server(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := filepath.Join(dir, "redis.pem"), filepath.Join(dir, "redis-key.pem"), filepath.Join(dir, "ca.pem")
	if err := pair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteCertFile(caFile); err != nil {
		t.Fatal(err)
	}
	const password = "redis-pw-3f9a"
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rs := redistest.StartWith(t, redistest.Options{Password: password, CertFile: certFile, KeyFile: keyFile,
		ClientTLS: &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}})

	h := newHarness(t, func(c *config.Config) {
		withRedis("", rs.Addr())(c)
		c.Store.Redis.PasswordFile = pwFile
		c.Store.Redis.TLS.CAFile = caFile
	})
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	if keys := entryKeys(t, rs.Client()); len(keys) != 1 {
		t.Errorf("entries stored over TLS = %v, want 1", keys)
	}
	if h.srv.store.State() != "ok" {
		t.Errorf("store state = %s, want ok", h.srv.store.State())
	}
	if strings.Contains(h.logs.String(), password) {
		t.Error("the Redis password appears in the log")
	}
}
