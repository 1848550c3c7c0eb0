package store

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// ErrUnavailable is returned, without contacting Redis, while Redis is
// failing. Callers treat it as a miss and carry on without the shared store
// (fail-open) until a background probe finds Redis back.
var ErrUnavailable = errors.New("store: redis unavailable")

// RedisConfig configures a Redis client: one address for a standalone server,
// several for a Cluster, or Sentinel addresses with MasterName.
type RedisConfig struct {
	// Addrs are host:port addresses.
	Addrs []string
	// MasterName selects Sentinel mode: Addrs are the sentinels.
	MasterName string
	// Username and Password authenticate (ACL or requirepass).
	Username, Password string
	// DB is the database number (standalone and Sentinel only).
	DB int
	// TLS, when set, is used for connections to Redis.
	TLS *tls.Config
}

// NewRedisClient returns a client for cfg with short timeouts: the broker
// would rather serve without Redis than wait for it.
func NewRedisClient(cfg RedisConfig) redis.UniversalClient {
	return redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:        cfg.Addrs,
		MasterName:   cfg.MasterName,
		Username:     cfg.Username,
		Password:     cfg.Password,
		DB:           cfg.DB,
		TLSConfig:    cfg.TLS,
		DialTimeout:  time.Second,
		ReadTimeout:  500 * time.Millisecond,
		WriteTimeout: 500 * time.Millisecond,
		PoolTimeout:  time.Second,
		MaxRetries:   1,
	})
}

// RedisOptions configures a Redis store.
type RedisOptions struct {
	// Client is the Redis client; the store closes it.
	Client redis.UniversalClient
	// Prefix starts every key and channel name, e.g. "tokenbroker:".
	Prefix string
	// Sealer seals every value and authenticates every event; required.
	Sealer *Sealer
	// Logger receives state changes (a node lost, a node back, a stale
	// lease broken); nil means none.
	Logger *zap.Logger
	// Now is the clock tokens' expiry is judged by; nil means time.Now.
	Now func() time.Time
	// ProbeInterval is how often every node is pinged, whether or not calls
	// reach the store. Zero means DefaultProbeInterval.
	ProbeInterval time.Duration
}

// Redis is a Store shared by all replicas, built so that what others can
// write into Redis cannot make the broker serve a token it should not, stall
// the fleet, or hide an outage (deploy/docs/security.md states the threat model):
//
//   - Each entry is a hash at "<prefix>{<cache key>}": the sealed record (v),
//     which alone the broker trusts, and plain copies of its fingerprint
//     (fp), expiry and issue time (exp, iat, Unix ms) for operators and
//     older replicas. An entry that does not open, or whose copies disagree
//     with the sealed record, counts as absent and any valid token replaces
//     it. Which token wins is decided on opened records, and written by
//     compare and swap.
//   - An invalidation leaves a sealed tombstone at "<prefix>{<cache key>}:tomb"
//     until the token expires: that token, and any issued before it, is
//     neither served nor stored again.
//   - The lease "<prefix>{<cache key>}:lock" is broken when it has no TTL or
//     one above the lease bound.
//   - Changes are announced on "<prefix>events" with a MAC (see Subscribe).
//   - Health is per node and probed actively (see DefaultProbeInterval).
//
// The braces keep an entry, its tombstone and its lease in one Cluster slot.
type Redis struct {
	c       redis.UniversalClient
	cluster *redis.ClusterClient // nil unless Cluster
	single  string               // the node's name when not a Cluster
	prefix  string
	sealer  *Sealer
	log     *zap.Logger
	now     func() time.Time
	probe   time.Duration

	nodes     nodeSet
	masters   atomic.Pointer[[]string] // a Cluster's masters as last probed
	lastProbe atomic.Int64             // Unix nanoseconds
	replays   replayCache
	stats     redisStats

	closed    chan struct{}
	closeOnce sync.Once
	logOnce   sync.Once
}

// redisStats are the store's counters since start.
type redisStats struct {
	outages      atomic.Int64
	unsealable   atomic.Int64
	tampered     atomic.Int64
	leasesBroken atomic.Int64
	rejects      sync.Map // reason → *atomic.Int64
}

func (s *redisStats) rejected(reason string) {
	v, _ := s.rejects.LoadOrStore(reason, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

var _ Store = (*Redis)(nil)

// NewRedis returns a Redis store and starts its probe. It pings Redis once,
// briefly, so that its state is true from the start; it never fails for
// Redis being down: a broker started without Redis serves without it and
// starts sharing when Redis answers.
func NewRedis(o RedisOptions) (*Redis, error) {
	if o.Client == nil || o.Sealer == nil {
		return nil, errors.New("store: Redis needs a Client and a Sealer")
	}
	r := &Redis{c: o.Client, prefix: o.Prefix, sealer: o.Sealer, log: o.Logger, now: o.Now, probe: o.ProbeInterval,
		closed: make(chan struct{}), single: "redis"}
	if r.log == nil {
		r.log = zap.NewNop()
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.probe <= 0 {
		r.probe = DefaultProbeInterval
	}
	switch c := o.Client.(type) {
	case *redis.ClusterClient:
		r.cluster = c
	case *redis.Client:
		r.single = c.Options().Addr
	}
	if r.cluster == nil {
		r.nodes.get(r.single)
	}
	r.probeOnce()
	go r.probeLoop()
	return r, nil
}

// Name returns "redis".
func (r *Redis) Name() string { return "redis" }

func (r *Redis) key(k string) string     { return r.prefix + "{" + k + "}" }
func (r *Redis) lockKey(k string) string { return r.prefix + "{" + k + "}:lock" }
func (r *Redis) tombKey(k string) string { return r.prefix + "{" + k + "}:tomb" }

// Channel is the pub/sub channel of change events.
func (r *Redis) Channel() string { return r.prefix + "events" }

// State is "ok" while every node that holds keys answers, "degraded" while
// one does not (the keys on it are served without Redis). In a Cluster,
// those are the masters; a replica that is down shows in Nodes only.
func (r *Redis) State() string {
	nodes := r.nodes.snapshot()
	holders := []string{r.single}
	if r.cluster != nil {
		holders = nil
		if m := r.masters.Load(); m != nil {
			holders = *m
		}
		if len(holders) == 0 {
			return "degraded" // a Cluster none of whose masters could be found
		}
	}
	for _, a := range holders {
		if st, ok := nodes[a]; ok && st != "ok" {
			return "degraded"
		}
	}
	return "ok"
}

// Nodes returns each known node's state, "ok" or "down", by address.
func (r *Redis) Nodes() map[string]string { return r.nodes.snapshot() }

// LastProbe is when the probe last finished.
func (r *Redis) LastProbe() time.Time { return time.Unix(0, r.lastProbe.Load()) }

// Outages counts the times a node became unreachable since start.
func (r *Redis) Outages() int64 { return r.stats.outages.Load() }

// Unsealable counts stored values that did not open since start.
func (r *Redis) Unsealable() int64 { return r.stats.unsealable.Load() }

// Tampered counts entries that opened but whose plain fields disagreed with
// their sealed ones, since start.
func (r *Redis) Tampered() int64 { return r.stats.tampered.Load() }

// LeasesBroken counts stale leases (no TTL, a TTL above the lease bound, or
// not a lease at all) broken since start.
func (r *Redis) LeasesBroken() int64 { return r.stats.leasesBroken.Load() }

// EventsRejected counts the pub/sub messages dropped since start, by reason
// (see RejectReasons).
func (r *Redis) EventsRejected() map[string]int64 {
	out := map[string]int64{}
	for _, reason := range RejectReasons {
		out[reason] = 0
	}
	r.stats.rejects.Range(func(k, v any) bool {
		out[k.(string)] = v.(*atomic.Int64).Load()
		return true
	})
	return out
}

// read returns what Redis holds for key, unverified.
func (r *Redis) read(ctx context.Context, addr, key string) (stored, error) {
	vals, err := readScript.Run(ctx, r.c, []string{r.key(key), r.tombKey(key)}).StringSlice()
	if err := r.observe(addr, err); err != nil {
		return stored{}, err
	}
	if len(vals) != 5 {
		return stored{}, fmt.Errorf("redis: read: %d values, want 5", len(vals))
	}
	return stored{v: vals[0], fp: vals[1], exp: vals[2], iat: vals[3], tomb: vals[4]}, nil
}

// current opens what read returned: the live entry it can trust, if any.
func (r *Redis) current(key string, s stored) (*Entry, *tombstone) {
	e, why := r.openEntry(key, s)
	switch why {
	case unsealable:
		r.stats.unsealable.Add(1)
	case tampered:
		r.stats.tampered.Add(1)
	}
	if why == unsealable || why == tampered {
		r.logOnce.Do(func() {
			r.log.Warn("a stored token does not open or its plain fields were altered (another key, moved, or written by someone else); treated as absent",
				zap.String("key", key))
		})
	}
	t := r.openTombstone(key, s)
	if e == nil || !r.now().Before(e.Expiry) || t.buries(e) {
		return nil, t
	}
	return e, t
}

// Get returns the entry under key. A value that does not open, disagrees
// with its plain fields, or is buried by a tombstone is a miss.
func (r *Redis) Get(ctx context.Context, key string) (*Entry, error) {
	addr, err := r.guard(ctx, key)
	if err != nil {
		return nil, err
	}
	s, err := r.read(ctx, addr, key)
	if err != nil {
		return nil, err
	}
	if e, _ := r.current(key, s); e != nil {
		return e, nil
	}
	return nil, ErrNotFound
}

// Buried reports whether a tombstone under key forbids e (it is the token
// invalidated, or was issued before it). A tombstone that does not open is
// ignored, as everywhere.
func (r *Redis) Buried(ctx context.Context, key string, e *Entry) (bool, error) {
	addr, err := r.guard(ctx, key)
	if err != nil {
		return false, err
	}
	s, err := r.read(ctx, addr, key)
	if err != nil {
		return false, err
	}
	return r.openTombstone(key, s).buries(e), nil
}

var _ Tombstones = (*Redis)(nil)

// casRetries bounds the compare-and-swap attempts of one write: another
// writer (a replica, or someone else) changed the key in between each time.
const casRetries = 4

func digest(s string) string {
	if s == "" {
		return ""
	}
	h := sha1.Sum([]byte(s))
	return hex.EncodeToString(h[:])
}

// PutIfNewer seals e and stores it unless the trusted entry stored expires
// no earlier, or a tombstone forbids e; on success it announces the change.
func (r *Redis) PutIfNewer(ctx context.Context, key string, e *Entry) (bool, error) {
	ttl := e.Expiry.Sub(r.now())
	if ttl <= 0 {
		return false, nil
	}
	addr, err := r.guard(ctx, key)
	if err != nil {
		return false, err
	}
	v, err := r.sealEntry(key, e)
	if err != nil {
		return false, err
	}
	for range casRetries {
		s, err := r.read(ctx, addr, key)
		if err != nil {
			return false, err
		}
		cur, tomb := r.current(key, s)
		if tomb.buries(e) || cur != nil && !e.Expiry.After(cur.Expiry) {
			return false, nil
		}
		n, err := swapScript.Run(ctx, r.c, []string{r.key(key), r.tombKey(key)}, digest(s.v), digest(s.tomb),
			v, e.Fingerprint, e.Expiry.UnixMilli(), e.IssuedAt.UnixMilli(), max(ttl.Milliseconds(), 1)).Int()
		if err := r.observe(addr, err); err != nil {
			return false, err
		}
		if n == 1 {
			r.publish(ctx, Event{Kind: EventPut, Key: key, Fingerprint: e.Fingerprint})
			return true, nil
		}
	}
	return false, fmt.Errorf("redis: put: key kept changing (%d attempts)", casRetries)
}

// DeleteIfCurrent removes the entry if it is the token with fingerprint, and
// leaves a tombstone until that token expires, atomically; it announces the
// deletion so every replica drops its in-process copy.
func (r *Redis) DeleteIfCurrent(ctx context.Context, key, fingerprint string) (bool, error) {
	addr, err := r.guard(ctx, key)
	if err != nil {
		return false, err
	}
	for range casRetries {
		s, err := r.read(ctx, addr, key)
		if err != nil {
			return false, err
		}
		cur, tomb := r.current(key, s)
		if cur == nil || cur.Fingerprint != fingerprint {
			return false, nil
		}
		var newTomb []byte
		ttl := cur.Expiry.Sub(r.now())
		if tomb == nil || cur.IssuedAt.UnixNano() >= tomb.IssuedAt {
			if newTomb, err = r.sealTombstone(key, cur); err != nil {
				return false, err
			}
		}
		n, err := buryScript.Run(ctx, r.c, []string{r.key(key), r.tombKey(key)}, digest(s.v), digest(s.tomb),
			newTomb, max(ttl.Milliseconds(), 1)).Int()
		if err := r.observe(addr, err); err != nil {
			return false, err
		}
		if n == 1 {
			r.publish(ctx, Event{Kind: EventDelete, Key: key, Fingerprint: fingerprint})
			return true, nil
		}
	}
	return false, fmt.Errorf("redis: delete: key kept changing (%d attempts)", casRetries)
}

// Lock takes the lease on key for ttl, the lease bound, or returns
// ErrLocked. A stale lease (no TTL, a TTL above ttl, or not a lease) is
// broken and taken: no replica leaves one, and it would stall every replica.
func (r *Redis) Lock(ctx context.Context, key, owner string, ttl time.Duration) error {
	addr, err := r.guard(ctx, key)
	if err != nil {
		return err
	}
	n, err := lockScript.Run(ctx, r.c, []string{r.lockKey(key)}, owner, max(ttl.Milliseconds(), 1)).Int()
	if err := r.observe(addr, err); err != nil {
		return err
	}
	switch n {
	case 0:
		return ErrLocked
	case 2:
		r.stats.leasesBroken.Add(1)
		r.log.Warn("broke a stale lease (no TTL, a TTL above the lease bound, or not a lease); someone else wrote it",
			zap.String("key", key), zap.Duration("lease_bound", ttl))
	}
	return nil
}

// Unlock releases the lease if owner still holds it (compare and delete).
func (r *Redis) Unlock(ctx context.Context, key, owner string) error {
	addr, err := r.guard(ctx, key)
	if err != nil {
		return err
	}
	return r.observe(addr, unlockScript.Run(ctx, r.c, []string{r.lockKey(key)}, owner).Err())
}

// Close stops the probe and closes the client.
func (r *Redis) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return r.c.Close()
}
