package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestMemory(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m := NewMemory(func() time.Time { return now })
	ctx := context.Background()
	entry := func(fp string, exp time.Duration) *Entry {
		return &Entry{AccessToken: "t-" + fp, Fingerprint: fp, IssuedAt: now, Expiry: now.Add(exp)}
	}

	if _, err := m.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get on empty = %v, want ErrNotFound", err)
	}
	if ok, _ := m.PutIfNewer(ctx, "k", entry("a", time.Hour)); !ok {
		t.Fatal("first put not stored")
	}
	if ok, _ := m.PutIfNewer(ctx, "k", entry("b", 30*time.Minute)); ok {
		t.Error("an earlier-expiring token replaced a later one")
	}
	if ok, _ := m.PutIfNewer(ctx, "k", entry("c", time.Hour)); ok {
		t.Error("a token expiring at the same time replaced the current one")
	}
	if ok, _ := m.PutIfNewer(ctx, "k", entry("d", 2*time.Hour)); !ok {
		t.Error("a later-expiring token was not stored")
	}
	got, err := m.Get(ctx, "k")
	if err != nil || got.Fingerprint != "d" {
		t.Fatalf("Get = %+v, %v; want d", got, err)
	}
	got.AccessToken = "mutated"
	if again, _ := m.Get(ctx, "k"); again.AccessToken != "t-d" {
		t.Error("Get returned the stored entry itself, not a copy")
	}

	if ok, _ := m.DeleteIfCurrent(ctx, "k", "a"); ok {
		t.Error("a stale fingerprint deleted the current token")
	}
	if ok, _ := m.DeleteIfCurrent(ctx, "k", "d"); !ok {
		t.Error("the current fingerprint did not delete")
	}
	if _, err := m.Get(ctx, "k"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after delete = %v, want ErrNotFound", err)
	}

	// Expired entries are gone, and an expired entry does not block a put.
	_, _ = m.PutIfNewer(ctx, "e", entry("e", time.Minute))
	now = now.Add(time.Minute)
	if _, err := m.Get(ctx, "e"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get at expiry = %v, want ErrNotFound", err)
	}
}

func TestMemoryLock(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m := NewMemory(func() time.Time { return now })
	ctx := context.Background()
	if err := m.Lock(ctx, "k", "r1", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := m.Lock(ctx, "k", "r2", 10*time.Second); !errors.Is(err, ErrLocked) {
		t.Errorf("second owner Lock = %v, want ErrLocked", err)
	}
	_ = m.Unlock(ctx, "k", "r2") // not the owner: no effect
	if err := m.Lock(ctx, "k", "r2", 10*time.Second); !errors.Is(err, ErrLocked) {
		t.Errorf("after a non-owner Unlock = %v, want ErrLocked", err)
	}
	now = now.Add(10 * time.Second) // the lease runs out: a dead holder is replaced
	if err := m.Lock(ctx, "k", "r2", 10*time.Second); err != nil {
		t.Errorf("Lock after lease expiry = %v, want nil", err)
	}
	_ = m.Unlock(ctx, "k", "r2")
	if err := m.Lock(ctx, "k", "r1", time.Second); err != nil {
		t.Errorf("Lock after Unlock = %v, want nil", err)
	}
}
