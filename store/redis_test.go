package store_test

import (
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/store"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

func newRedisStore(t *testing.T, addr string, keys ...[]byte) *store.Redis {
	t.Helper()
	if len(keys) == 0 {
		k := make([]byte, store.KeySize)
		_, _ = rand.Read(k)
		keys = [][]byte{k}
	}
	sealer, err := store.NewSealer(keys[0], keys[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	r, err := store.NewRedis(store.RedisOptions{
		Client: store.NewRedisClient(store.RedisConfig{Addrs: []string{addr}}),
		Prefix: "tb-test:", Sealer: sealer, ProbeInterval: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

func entry(fp string, ttl time.Duration) *store.Entry {
	now := time.Now()
	return &store.Entry{AccessToken: "token-" + fp, TokenType: "Bearer", Scopes: []string{"IDENTITY"},
		IssuedAt: now, Expiry: now.Add(ttl), Fingerprint: fp}
}

func TestRedisStore(t *testing.T) {
	srv := redistest.Start(t)
	r := newRedisStore(t, srv.Addr())
	ctx := context.Background()

	if _, err := r.Get(ctx, "identity:k"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get on empty = %v, want ErrNotFound", err)
	}
	if ok, err := r.PutIfNewer(ctx, "identity:k", entry("a", time.Hour)); !ok || err != nil {
		t.Fatalf("first put = %v, %v", ok, err)
	}
	if ok, _ := r.PutIfNewer(ctx, "identity:k", entry("b", 30*time.Minute)); ok {
		t.Error("an earlier-expiring token replaced a later one")
	}
	got, err := r.Get(ctx, "identity:k")
	if err != nil || got.Fingerprint != "a" || got.AccessToken != "token-a" || got.TokenType != "Bearer" ||
		strings.Join(got.Scopes, " ") != "IDENTITY" {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	// Redis TTL follows the token's expiry.
	ttl := srv.Client().PTTL(ctx, "tb-test:{identity:k}").Val()
	if ttl < 59*time.Minute || ttl > time.Hour {
		t.Errorf("Redis TTL = %v, want about 1h", ttl)
	}

	// Nothing in Redis is the token in plain text; a value moved to another key does not open.
	c := srv.Client()
	for _, k := range c.Keys(ctx, "*").Val() {
		for f, v := range c.HGetAll(ctx, k).Val() {
			if strings.Contains(v, "token-") {
				t.Errorf("%s field %s holds the token in plain text", k, f)
			}
		}
	}
	if err := c.Copy(ctx, "tb-test:{identity:k}", "tb-test:{identity:moved}", 0, false).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(ctx, "identity:moved"); !errors.Is(err, store.ErrNotFound) || r.Unsealable() != 1 {
		t.Errorf("moved value: Get = %v, unsealable = %d; want a miss counted once", err, r.Unsealable())
	}

	if ok, _ := r.DeleteIfCurrent(ctx, "identity:k", "zzz"); ok {
		t.Error("a stale fingerprint deleted the current token")
	}
	if ok, _ := r.DeleteIfCurrent(ctx, "identity:k", "a"); !ok {
		t.Error("the current fingerprint did not delete")
	}

	if err := r.Lock(ctx, "identity:k", "o1", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := r.Lock(ctx, "identity:k", "o2", time.Second); !errors.Is(err, store.ErrLocked) {
		t.Errorf("second Lock = %v, want ErrLocked", err)
	}
	_ = r.Unlock(ctx, "identity:k", "o2") // not the owner
	if err := r.Lock(ctx, "identity:k", "o2", time.Second); !errors.Is(err, store.ErrLocked) {
		t.Errorf("a non-owner released the lock: %v", err)
	}
	_ = r.Unlock(ctx, "identity:k", "o1")
	if err := r.Lock(ctx, "identity:k", "o2", time.Second); err != nil {
		t.Errorf("Lock after the owner's Unlock = %v", err)
	}
}

func TestRedisKeyRotation(t *testing.T) {
	srv := redistest.Start(t)
	oldKey, newKey := make([]byte, store.KeySize), make([]byte, store.KeySize)
	_, _ = rand.Read(oldKey)
	_, _ = rand.Read(newKey)
	ctx := context.Background()
	before := newRedisStore(t, srv.Addr(), oldKey)
	if _, err := before.PutIfNewer(ctx, "identity:k", entry("a", time.Hour)); err != nil {
		t.Fatal(err)
	}
	after := newRedisStore(t, srv.Addr(), newKey, oldKey)
	if got, err := after.Get(ctx, "identity:k"); err != nil || got.Fingerprint != "a" {
		t.Errorf("after rotation, Get = %v, %v; want the entry sealed with the previous key", got, err)
	}
	without := newRedisStore(t, srv.Addr(), newKey)
	if _, err := without.Get(ctx, "identity:k"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("without the previous key, Get = %v, want a miss", err)
	}
}

func TestRedisFailOpenAndRecovery(t *testing.T) {
	srv := redistest.Start(t)
	r := newRedisStore(t, srv.Addr())
	ctx := context.Background()
	if _, err := r.PutIfNewer(ctx, "identity:k", entry("a", time.Hour)); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	_, err := r.Get(ctx, "identity:k")
	if err == nil || errors.Is(err, store.ErrNotFound) || r.State() != "degraded" {
		t.Fatalf("with Redis down: Get = %v, State = %s; want an error and degraded", err, r.State())
	}
	// While down, calls fail fast without touching Redis.
	if _, err := r.Get(ctx, "identity:k"); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("second Get while down = %v, want ErrUnavailable", err)
	}
	srv.Restart()
	// The store finds Redis back by itself, without traffic.
	deadline := time.Now().Add(5 * time.Second)
	for r.State() != "ok" {
		if time.Now().After(deadline) {
			t.Fatal("store did not recover within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := r.PutIfNewer(ctx, "identity:k", entry("b", time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got, err := r.Get(ctx, "identity:k"); err != nil || got.Fingerprint != "b" {
		t.Errorf("after recovery Get = %v, %v", got, err)
	}
}

func TestRedisEvents(t *testing.T) {
	srv := redistest.Start(t)
	key := make([]byte, store.KeySize)
	_, _ = rand.Read(key)
	a, b := newRedisStore(t, srv.Addr(), key), newRedisStore(t, srv.Addr(), key)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	evs := make(chan store.Event, 64)
	b.Subscribe(ctx, func(ev store.Event) {
		if ev.Kind != store.EventResync { // the subscription established
			evs <- ev
		}
	})

	// The subscription starts asynchronously: store ever-later tokens until b hears one.
	deadline := time.After(5 * time.Second)
	for i := 1; ; i++ {
		if _, err := a.PutIfNewer(ctx, "identity:k", entry("a", time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
		select {
		case ev := <-evs:
			if ev.Kind != store.EventPut || ev.Key != "identity:k" || ev.Fingerprint != "a" {
				t.Fatalf("put event = %+v", ev)
			}
		case <-time.After(50 * time.Millisecond):
			continue
		case <-deadline:
			t.Fatal("no put event received")
		}
		break
	}
	if _, err := a.DeleteIfCurrent(ctx, "identity:k", "a"); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case ev := <-evs:
			if ev.Kind != store.EventDelete {
				continue // a late put announcement from the loop above
			}
			if ev.Key != "identity:k" || ev.Fingerprint != "a" {
				t.Errorf("delete event = %+v", ev)
			}
			return
		case <-deadline:
			t.Fatal("no delete event received")
		}
	}
}
