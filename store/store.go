// Package store keeps access tokens shared between broker replicas.
//
// A Store is the second cache level behind each broker's in-process cache.
// It guarantees that a stored token is only ever replaced by one that expires
// later, that an entry is gone once it expires, and that a delete names the
// token it drops (by fingerprint), so a stale report cannot drop a newer token.
// The Redis store keeps these guarantees against others who can write to
// Redis: it acts only on what it sealed itself (see Redis).
// The lease lock lets one replica fetch from the authorization server while the
// others wait for its result.
package store

import (
	"context"
	"errors"
	"time"
)

// ErrNotFound is returned by Get when the key holds no live entry.
var ErrNotFound = errors.New("store: not found")

// ErrLocked is returned by Lock when another owner holds an unexpired lease.
var ErrLocked = errors.New("store: locked")

// Entry is one cached access token.
type Entry struct {
	// AccessToken is the token itself. Stores that leave the process seal it.
	AccessToken string
	// TokenType is the type the authorization server sent, e.g. "Bearer".
	TokenType string
	// Scopes are the scopes granted.
	Scopes []string
	// IssuedAt is when the authorization server's response arrived.
	IssuedAt time.Time
	// Expiry is when the token stops being valid.
	Expiry time.Time
	// Fingerprint identifies the token in logs and audit (see broker.Fingerprint).
	Fingerprint string
	// JKT is the RFC 7638 thumbprint of the DPoP key the token is bound to
	// (RFC 9449); empty for a bearer token. The key itself is never stored.
	JKT string
}

// Lifetime is the lifetime the authorization server granted.
func (e *Entry) Lifetime() time.Duration { return e.Expiry.Sub(e.IssuedAt) }

// Store is a shared token cache. Keys are opaque strings built by the broker.
type Store interface {
	// Name is the store's name as reported in the token source ("memory", "redis").
	Name() string
	// Get returns the entry under key, or ErrNotFound.
	Get(ctx context.Context, key string) (*Entry, error)
	// PutIfNewer stores e under key unless the current entry expires at the same
	// time or later. It reports whether e was stored.
	PutIfNewer(ctx context.Context, key string, e *Entry) (bool, error)
	// DeleteIfCurrent removes the entry under key if its fingerprint is
	// fingerprint, and reports whether it did.
	DeleteIfCurrent(ctx context.Context, key, fingerprint string) (bool, error)
	// Lock takes a lease on key for ttl on behalf of owner, or returns ErrLocked.
	// ttl is also the lease bound: a shared store breaks a lease it finds
	// without an expiry or with more than ttl left, since no replica sets one.
	Lock(ctx context.Context, key, owner string, ttl time.Duration) error
	// Unlock releases the lease on key if owner still holds it.
	Unlock(ctx context.Context, key, owner string) error
	// State is "ok", or a short word saying why the store is not fully working
	// ("degraded" while a shared store is unreachable and the broker fails open).
	State() string
	// Close releases the store's resources.
	Close() error
}

// EventKind is the kind of a change to a shared store.
type EventKind int

// The kinds of change.
const (
	// EventPut: a newer token was stored under Key.
	EventPut EventKind = iota + 1
	// EventDelete: the token with Fingerprint was dropped from Key.
	EventDelete
	// EventResync: the subscription was (re)established; announcements made
	// while it was down are lost, so a replica checks what it holds
	// (Tombstones) instead of waiting for them. Key and Fingerprint are empty.
	EventResync
)

// Event is a change made by some replica.
type Event struct {
	Kind        EventKind
	Key         string
	Fingerprint string
}

// Tombstones is implemented by stores that remember invalidated tokens.
type Tombstones interface {
	// Buried reports whether e, held for key, was invalidated (or was
	// issued before a token that was): it must not be served again.
	Buried(ctx context.Context, key string, e *Entry) (bool, error)
}

// Notifier is implemented by stores shared between replicas, which announce
// every change so that other replicas stop waiting for a fetch in progress
// and drop invalidated tokens from their in-process caches.
type Notifier interface {
	// Subscribe calls fn for each change until ctx ends.
	Subscribe(ctx context.Context, fn func(Event))
}
