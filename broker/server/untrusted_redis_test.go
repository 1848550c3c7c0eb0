package server

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// The tests here reproduce what someone with write access to a shared Redis
// (or a fault in it) did to three brokers in issue 24, and check the fixed
// behaviour with the counts the issue names: token requests, failed calls,
// and seconds until /readyz and tokenbroker_store_up change.

// metricAt reads one sample from srv's /metrics (-1 when absent).
func metricAt(t *testing.T, srv *Server, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + srv.AdminAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			match = match && strings.Contains(line, k+`="`+v+`"`)
		}
		if match {
			f, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			if err != nil {
				t.Fatalf("bad sample %q", line)
			}
			return f
		}
	}
	return -1
}

// readyzAt reads srv's /readyz body.
func readyzAt(t *testing.T, srv *Server) (int, map[string]any) {
	t.Helper()
	resp, err := http.Get("http://" + srv.AdminAddr().String() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&b); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func storeState(b map[string]any) string {
	s, _ := b["store"].(map[string]any)
	st, _ := s["state"].(string)
	return st
}

// callAll makes n calls on each client in turn and returns the failures.
func callAll(h *harness, clients []pb.TokenBrokerClient, n int, req *pb.GetTokenRequest) (fps map[string]int, failed int) {
	fps = map[string]int{}
	for range n {
		for _, c := range clients {
			tok, err := h.get(c, req)
			if err != nil {
				failed++
				continue
			}
			fps[tok.GetFingerprint()]++
		}
	}
	return fps, failed
}

func evictAll(srvs []*Server) {
	for _, s := range srvs {
		s.broker.EvictLocal()
	}
}

// onlyEntry returns the one token entry's Redis key.
func onlyEntry(t *testing.T, c *redis.Client) string {
	t.Helper()
	keys := entryKeys(t, c)
	if len(keys) != 1 {
		t.Fatalf("entries in Redis = %v, want 1", keys)
	}
	return keys[0]
}

// TestLeasePoisoning: a lease key without a TTL (or with one above the
// bound) is broken; one rewritten within the bound is waited out for one
// lease bound, then each replica fetches itself. Before: 42 of 42 calls failed.
func TestLeasePoisoning(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if _, failed := callAll(h, clients[:1], 1, req); failed > 0 {
		t.Fatal("first call failed")
	}
	c, ctx := rs.Client(), context.Background()
	entry := onlyEntry(t, c)

	for _, poison := range []struct {
		name string
		ttl  time.Duration
	}{{"no TTL", 0}, {"TTL of a day", 24 * time.Hour}} {
		before := h.as.TokenRequests()
		c.Del(ctx, entry)
		c.Set(ctx, entry+":lock", "x", poison.ttl)
		evictAll(srvs)
		fps, failed := callAll(h, clients, 14, req)
		if failed > 0 || len(fps) != 1 {
			t.Errorf("%s: %d of 42 calls failed, %d distinct tokens; want none failed, one token", poison.name, failed, len(fps))
		}
		if n := h.as.TokenRequests() - before; n != 1 {
			t.Errorf("%s: token requests = %d, want 1", poison.name, n)
		}
	}
	var broken float64
	for _, s := range srvs {
		broken += metricAt(t, s, "tokenbroker_store_leases_broken_total")
	}
	if broken != 2 {
		t.Errorf("leases broken = %v, want 2", broken)
	}

	// A lease rewritten within the bound (4s: timeout 2s + 2s) as fast as it
	// expires: every replica waits two bounds, then fetches itself unless a
	// peer's token is in the store by then.
	before := h.as.TokenRequests()
	c.Del(ctx, entry)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; i < 1000; i++ {
			c.Set(ctx, entry+":lock", "x", 4*time.Second)
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	evictAll(srvs)
	start := time.Now()
	var mu sync.Mutex
	failed := 0
	var cw sync.WaitGroup
	for _, cl := range clients {
		cw.Go(func() {
			if _, err := h.get(cl, req); err != nil {
				mu.Lock()
				failed++
				mu.Unlock()
			}
		})
	}
	cw.Wait()
	close(stop)
	wg.Wait()
	took := time.Since(start)
	var overruns float64
	for _, s := range srvs {
		overruns += max(metricAt(t, s, "tokenbroker_lease_wait_exceeded_total", "credential=identity"), 0) // -1: no series
	}
	requests := h.as.TokenRequests() - before
	t.Logf("lease rewritten within its bound: %d calls failed, %d token requests, %v, overruns %v",
		failed, requests, took.Round(time.Millisecond), overruns)
	// Each replica that overruns fetches itself; one that finds an
	// overrunning peer's token in the store first needs none.
	if failed > 0 || requests < 1 || requests > 3 || overruns != float64(requests) {
		t.Errorf("failed = %d, overruns = %v, token requests = %d; want 0 failed, 1 to 3 requests, one overrun per request",
			failed, overruns, requests)
	}
}

// TestRollbackRefused: the invalidated token, written back into Redis with a
// raised exp copy, is served by no replica, and the newer token is stored.
func TestRollbackRefused(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	a, err := h.get(clients[0], req)
	if err != nil {
		t.Fatal(err)
	}
	c, ctx := rs.Client(), context.Background()
	entry := onlyEntry(t, c)
	saved := c.HGetAll(ctx, entry).Val()
	resp, err := clients[0].InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: a.GetFingerprint()})
	if err != nil || !resp.GetInvalidated() {
		t.Fatalf("InvalidateToken = %v, %v", resp.GetInvalidated(), err)
	}
	h.clock.Add(time.Second)
	// Someone writes A back, with an exp copy far in the future, before any
	// replica fetched the replacement.
	restored := map[string]any{}
	for f, v := range saved {
		restored[f] = v
	}
	restored["exp"] = strconv.FormatInt(h.clock.Now().Add(1000*time.Hour).UnixMilli(), 10)
	c.HSet(ctx, entry, restored)
	c.Persist(ctx, entry)
	evictAll(srvs)
	before := h.as.TokenRequests()
	fps, failed := callAll(h, clients, 5, req)
	if failed > 0 || fps[a.GetFingerprint()] > 0 || len(fps) != 1 {
		t.Fatalf("after the rollback: %d failed, served %v; want one new token, never %s", failed, fps, a.GetFingerprint())
	}
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("token requests after the rollback = %d, want 1", n)
	}
	if got := c.HGet(ctx, entry, "fp").Val(); got != firstKey(fps) {
		t.Errorf("Redis holds %s, want the newer token %s", got, firstKey(fps))
	}
}

// TestForgedEventsIgnored: forged delete messages naming the current
// fingerprint cost no token request. Before: 20 forged messages, 20 requests.
func TestForgedEventsIgnored(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	fps, _ := callAll(h, clients, 1, req)
	if len(fps) != 1 {
		t.Fatalf("warm-up: %v", fps)
	}
	fp := firstKey(fps)
	c, ctx := rs.Client(), context.Background()
	key := strings.TrimSuffix(strings.TrimPrefix(onlyEntry(t, c), "tb-test:{"), "}")
	before := h.as.TokenRequests()
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	for i := range 20 {
		msg := "2\x1f" + key + "\x1f" + fp // the format before this release
		if i%2 == 1 {
			msg = "tb2\x1f2\x1f" + now + "\x1f0011223344556677\x1f" + key + "\x1f" + fp + "\x1f" + strings.Repeat("00", 32)
		}
		c.Publish(ctx, "tb-test:events", msg)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, s := range srvs {
		for metricAt(t, s, "tokenbroker_store_events_rejected_total", "reason=malformed")+
			metricAt(t, s, "tokenbroker_store_events_rejected_total", "reason=mac") < 20 {
			if time.Now().After(deadline) {
				t.Fatal("the forged events were not all rejected within 5s")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	got, failed := callAll(h, clients, 5, req)
	if failed > 0 || len(got) != 1 || got[fp] != 15 {
		t.Errorf("after 20 forged deletes: %d failed, served %v; want the same token everywhere", failed, got)
	}
	if n := h.as.TokenRequests() - before; n != 0 {
		t.Errorf("token requests after 20 forged deletes = %d, want 0", n)
	}
}

// TestUnopenableValueReplaced: a value sealed with a key the fleet does not
// have, expiring long after fresh tokens and without a TTL, is replaced by
// the first fetch. Before: 12 token requests where 4 were due, and the value
// stayed.
func TestUnopenableValueReplaced(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 3)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if _, failed := callAll(h, clients[:1], 1, req); failed > 0 {
		t.Fatal("first call failed")
	}
	c, ctx := rs.Client(), context.Background()
	entry := onlyEntry(t, c)
	key := strings.TrimSuffix(strings.TrimPrefix(entry, "tb-test:{"), "}")
	foreignKey := make([]byte, store.KeySize)
	_, _ = rand.Read(foreignKey)
	sealer, _ := store.NewSealer(foreignKey)
	foreign, err := store.NewRedis(store.RedisOptions{Client: store.NewRedisClient(store.RedisConfig{Addrs: []string{rs.Addr()}}),
		Prefix: "tb-test:", Sealer: sealer, Now: h.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	c.Del(ctx, entry)
	now := h.clock.Now()
	if ok, err := foreign.PutIfNewer(ctx, key, &store.Entry{AccessToken: "foreign", TokenType: "Bearer", IssuedAt: now,
		Expiry: now.Add(100 * time.Hour), Fingerprint: strings.Repeat("ab", 16)}); !ok || err != nil {
		t.Fatalf("foreign put = %v, %v", ok, err)
	}
	c.Persist(ctx, entry)

	// Four lifetimes: each is one token request, whatever the foreign value says.
	before := h.as.TokenRequests()
	for round := range 4 {
		evictAll(srvs)
		if _, failed := callAll(h, clients, 3, req); failed > 0 {
			t.Fatalf("round %d: %d calls failed", round, failed)
		}
		h.clock.Add(tokenTTL)
	}
	if n := h.as.TokenRequests() - before; n != 4 {
		t.Errorf("token requests over 4 lifetimes = %d, want 4", n)
	}
	if ttl := c.PTTL(ctx, entry).Val(); ttl <= 0 || ttl > tokenTTL {
		t.Errorf("the entry's TTL = %v; want the replacement's life (the foreign value gone)", ttl)
	}
	var unsealable float64
	for _, s := range srvs {
		unsealable += metricAt(t, s, "tokenbroker_store_values_refused_total", "reason=unsealable")
	}
	if unsealable < 1 {
		t.Errorf("unsealable values counted = %v, want at least 1", unsealable)
	}
}

// TestStoreHealthWithoutTraffic: with no calls at all, tokenbroker_store_up
// and the /readyz store detail follow Redis within 5s of it dying (SIGKILL)
// or hanging (SIGSTOP), at the default probe interval. Before: 14s and 15s
// (and only thanks to traffic).
func TestStoreHealthWithoutTraffic(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	if _, body := readyzAt(t, h.srv); storeState(body) != "ok" || body["state"] != "ok" && body["state"] != "degraded" {
		t.Fatalf("/readyz at start = %v", body)
	}
	waitDown := func(what string) {
		t.Helper()
		start := time.Now()
		var readyAt, upAt time.Duration
		for readyAt == 0 || upAt == 0 {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s: /readyz store detail or store_up unchanged after 5s (readyz at %v, store_up at %v)", what, readyAt, upAt)
			}
			if _, body := readyzAt(t, h.srv); readyAt == 0 && storeState(body) == "degraded" && body["state"] == "degraded" {
				readyAt = time.Since(start)
			}
			if upAt == 0 && metricAt(t, h.srv, "tokenbroker_store_up", "backend=redis") == 0 {
				upAt = time.Since(start)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("%s: /readyz degraded after %.1fs, tokenbroker_store_up 0 after %.1fs", what, readyAt.Seconds(), upAt.Seconds())
	}
	waitUp := func(what string) {
		t.Helper()
		start := time.Now()
		for storeState(must(readyzAt(t, h.srv))) != "ok" || metricAt(t, h.srv, "tokenbroker_store_up", "backend=redis") != 1 {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s: not ok within 5s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("%s: ok after %.1fs", what, time.Since(start).Seconds())
	}
	rs.Pause()
	waitDown("SIGSTOP")
	rs.Resume()
	waitUp("SIGCONT")
	rs.Kill()
	waitDown("SIGKILL")
	rs.Restart()
	waitUp("restarted")
}

func must(_ int, b map[string]any) map[string]any { return b }

// TestStartDegraded: a broker started with Redis down, or with the token
// endpoint down, says degraded from its first /readyz, without any call.
// Before: "ok" for as long as anyone watched.
func TestStartDegraded(t *testing.T) {
	t.Run("redis down", func(t *testing.T) {
		h := newHarness(t, withRedis("", "127.0.0.1:"+strconv.Itoa(redistest.FreePort(t))))
		code, body := readyzAt(t, h.srv)
		if code != http.StatusOK || storeState(body) != "degraded" || body["state"] != "degraded" {
			t.Errorf("first /readyz = %d %v; want 200, store and state degraded", code, body)
		}
		if up := metricAt(t, h.srv, "tokenbroker_store_up", "backend=redis"); up != 0 {
			t.Errorf("tokenbroker_store_up = %v, want 0", up)
		}
	})
	t.Run("token endpoint down", func(t *testing.T) {
		dead := "http://127.0.0.1:" + strconv.Itoa(redistest.FreePort(t)) + oauthtest.TokenPath
		h := newHarness(t, func(c *config.Config) { c.Credentials[0].TokenURL = dead })
		code, body := readyzAt(t, h.srv)
		cred, _ := body["credentials"].(map[string]any)["identity"].(map[string]any)
		if code != http.StatusOK || body["state"] != "degraded" || cred["state"] == "ok" {
			t.Errorf("first /readyz = %d %v; want 200, degraded, the credential not ok", code, body)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, body = readyzAt(t, h.srv)
			cred, _ = body["credentials"].(map[string]any)["identity"].(map[string]any)
			if cred["state"] == "failing" && cred["reason"] == "unreachable" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("credential = %v after 5s; want failing (unreachable)", cred)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if v := metricAt(t, h.srv, "tokenbroker_credential_healthy", "credential=identity"); v != 0 {
			t.Errorf("tokenbroker_credential_healthy = %v, want 0", v)
		}
		if h.as.TokenRequests() != 0 {
			t.Errorf("token requests = %d; the check must not ask for tokens", h.as.TokenRequests())
		}
	})
}

// TestIdleCredentialHealth: the bank goes away while nobody calls; the
// background check (every 1s here) says so, and the last success stays.
// Before: credential_healthy stayed 1 for 16s (until a call).
func TestIdleCredentialHealth(t *testing.T) {
	h := newHarnessWith(t, nil, func(o *Options) { o.CheckInterval = time.Second })
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	fetched := float64(h.clock.Now().UnixNano()) / 1e9
	// While it is ok, the credential has no per-credential health series
	// (issue 27): it is counted among the ok.
	if v := metricAt(t, h.srv, "tokenbroker_credential_healthy", "credential=identity"); v != -1 {
		t.Fatalf("tokenbroker_credential_healthy = %v while ok, want no series", v)
	}
	if v := metricAt(t, h.srv, "tokenbroker_credentials", "state=ok"); v != 1 {
		t.Fatalf("tokenbroker_credentials{state=ok} = %v, want 1", v)
	}
	requests := h.as.TokenRequests()
	_ = h.as.Close()
	start := time.Now()
	for metricAt(t, h.srv, "tokenbroker_credential_healthy", "credential=identity") != 0 {
		if time.Since(start) > 5*time.Second {
			t.Fatal("tokenbroker_credential_healthy not 0 5s after the bank went away")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("bank gone while idle: credential_healthy 0 after %.1fs", time.Since(start).Seconds())
	if got := metricAt(t, h.srv, "tokenbroker_credential_last_success_timestamp_seconds", "credential=identity"); got < fetched-1 || got > fetched+1 {
		t.Errorf("last success = %v, want the fetch's time %v", got, fetched)
	}
	if v := metricAt(t, h.srv, "tokenbroker_credentials", "state=failing"); v != 1 {
		t.Errorf("tokenbroker_credentials{state=failing} = %v, want 1", v)
	}
	_, body := readyzAt(t, h.srv)
	cred, _ := body["credentials"].(map[string]any)["identity"].(map[string]any)
	if cred["state"] != "failing" || cred["last_success"] == nil || body["state"] != "degraded" {
		t.Errorf("/readyz = %v; want the credential failing with its last success, and degraded", body)
	}
	if h.as.TokenRequests() != requests {
		t.Errorf("the checks made token requests: %d, want %d", h.as.TokenRequests(), requests)
	}
}
