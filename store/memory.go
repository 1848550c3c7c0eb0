package store

import (
	"context"
	"sync"
	"time"
)

// Memory is a Store held in this process: the default backend for a single
// replica. It is safe for concurrent use.
type Memory struct {
	now func() time.Time

	mu      sync.Mutex
	entries map[string]*Entry
	leases  map[string]lease
}

type lease struct {
	owner  string
	expiry time.Time
}

var _ Store = (*Memory)(nil)

// NewMemory returns an empty memory store. now is the clock; nil means time.Now.
func NewMemory(now func() time.Time) *Memory {
	if now == nil {
		now = time.Now
	}
	return &Memory{now: now, entries: map[string]*Entry{}, leases: map[string]lease{}}
}

// Name returns "memory".
func (m *Memory) Name() string { return "memory" }

// Get returns a copy of the live entry under key, or ErrNotFound.
func (m *Memory) Get(_ context.Context, key string) (*Entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.entries[key]
	if !ok {
		return nil, ErrNotFound
	}
	if !m.now().Before(e.Expiry) {
		delete(m.entries, key)
		return nil, ErrNotFound
	}
	c := *e
	return &c, nil
}

// PutIfNewer stores a copy of e unless the current live entry expires no earlier.
func (m *Memory) PutIfNewer(_ context.Context, key string, e *Entry) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur, ok := m.entries[key]; ok && m.now().Before(cur.Expiry) && !e.Expiry.After(cur.Expiry) {
		return false, nil
	}
	c := *e
	m.entries[key] = &c
	return true, nil
}

// DeleteIfCurrent removes the entry under key if it has the given fingerprint.
func (m *Memory) DeleteIfCurrent(_ context.Context, key, fingerprint string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok := m.entries[key]
	if !ok || cur.Fingerprint != fingerprint {
		return false, nil
	}
	delete(m.entries, key)
	return true, nil
}

// Lock takes a lease on key for owner unless another owner holds a live one.
func (m *Memory) Lock(_ context.Context, key, owner string, ttl time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if l, ok := m.leases[key]; ok && l.owner != owner && now.Before(l.expiry) {
		return ErrLocked
	}
	m.leases[key] = lease{owner: owner, expiry: now.Add(ttl)}
	return nil
}

// Unlock releases the lease on key if owner holds it.
func (m *Memory) Unlock(_ context.Context, key, owner string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l, ok := m.leases[key]; ok && l.owner == owner {
		delete(m.leases, key)
	}
	return nil
}

// State is always "ok".
func (m *Memory) State() string { return "ok" }

// Close does nothing; it exists to satisfy Store.
func (m *Memory) Close() error { return nil }
