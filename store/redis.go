package store

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
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
	// Sealer seals every value; required.
	Sealer *Sealer
	// Logger receives state changes (Redis lost, Redis back); nil means none.
	Logger *zap.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// ProbeInterval is how often Redis is pinged while it fails; meanwhile
	// every operation fails fast with ErrUnavailable. Zero means one second.
	ProbeInterval time.Duration
}

// Redis is a Store shared by all replicas. Each entry is a hash holding the
// sealed token (v), its fingerprint (fp) and its expiry in Unix milliseconds
// (exp), with a Redis TTL equal to the token's remaining lifetime. The key is
// "<prefix>{<cache key>}"; its lease lock "<prefix>{<cache key>}:lock" hashes
// to the same Cluster slot. Changes are announced on "<prefix>events".
type Redis struct {
	c      redis.UniversalClient
	prefix string
	sealer *Sealer
	log    *zap.Logger
	now    func() time.Time
	probe  time.Duration

	healthy   atomic.Bool
	downSince atomic.Int64 // Unix nanoseconds
	closed    chan struct{}
	closeOnce sync.Once

	outages        atomic.Int64
	unsealable     atomic.Int64
	unsealableOnce sync.Once
}

var _ Store = (*Redis)(nil)

// NewRedis returns a Redis store. It does not contact Redis: a broker started
// while Redis is down serves without it and starts sharing when it returns.
func NewRedis(o RedisOptions) (*Redis, error) {
	if o.Client == nil || o.Sealer == nil {
		return nil, errors.New("store: Redis needs a Client and a Sealer")
	}
	r := &Redis{c: o.Client, prefix: o.Prefix, sealer: o.Sealer, log: o.Logger, now: o.Now, probe: o.ProbeInterval,
		closed: make(chan struct{})}
	if r.log == nil {
		r.log = zap.NewNop()
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.probe <= 0 {
		r.probe = time.Second
	}
	r.healthy.Store(true)
	return r, nil
}

// Name returns "redis".
func (r *Redis) Name() string { return "redis" }

func (r *Redis) key(k string) string     { return r.prefix + "{" + k + "}" }
func (r *Redis) lockKey(k string) string { return r.prefix + "{" + k + "}:lock" }

// Channel is the pub/sub channel of change events.
func (r *Redis) Channel() string { return r.prefix + "events" }

// guard fails fast while Redis is down; the prober brings the store back.
func (r *Redis) guard() error {
	if r.healthy.Load() {
		return nil
	}
	return ErrUnavailable
}

// observe records the outcome of a Redis command and logs each change of state once.
func (r *Redis) observe(err error) error {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) {
		return err
	}
	if r.healthy.CompareAndSwap(true, false) {
		r.outages.Add(1)
		r.downSince.Store(time.Now().UnixNano())
		r.log.Warn("redis unavailable; serving from memory and the token endpoint until it returns", zap.Error(err))
		go r.probeUntilBack()
	}
	return fmt.Errorf("redis: %w", err)
}

// probeUntilBack pings Redis every probe interval until it answers or the
// store is closed, so recovery does not depend on traffic reaching the store.
func (r *Redis) probeUntilBack() {
	t := time.NewTicker(r.probe)
	defer t.Stop()
	for {
		select {
		case <-r.closed:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.probe)
		err := r.c.Ping(ctx).Err()
		cancel()
		if err == nil {
			r.healthy.Store(true)
			r.log.Info("redis is back; sharing tokens again",
				zap.Duration("down_for", time.Duration(time.Now().UnixNano()-r.downSince.Load())))
			return
		}
	}
}

// State is "ok", or "degraded" while Redis is failing.
func (r *Redis) State() string {
	if r.healthy.Load() {
		return "ok"
	}
	return "degraded"
}

// Outages counts the times Redis became unreachable since start.
func (r *Redis) Outages() int64 { return r.outages.Load() }

// Unsealable counts values that failed to open since start.
func (r *Redis) Unsealable() int64 { return r.unsealable.Load() }

// sealed is the plaintext of a stored value.
type sealed struct {
	Token    string   `json:"t"`
	Type     string   `json:"y"`
	Scopes   []string `json:"s"`
	IssuedAt int64    `json:"i"` // Unix nanoseconds
	Expiry   int64    `json:"e"` // Unix nanoseconds
	FP       string   `json:"f"`
}

// Get returns the entry under key. A value that does not open is a miss.
func (r *Redis) Get(ctx context.Context, key string) (*Entry, error) {
	if err := r.guard(); err != nil {
		return nil, err
	}
	v, err := r.c.HGet(ctx, r.key(key), "v").Bytes()
	if err := r.observe(err); err != nil {
		if errors.Is(err, redis.Nil) {
			return nil, ErrNotFound
		}
		return nil, err
	}
	pt, err := r.sealer.Open(key, v)
	if err != nil {
		r.unsealable.Add(1)
		r.unsealableOnce.Do(func() {
			r.log.Warn("a stored token does not open (other key, moved or altered); treated as a miss",
				zap.String("key", key), zap.Error(err))
		})
		return nil, ErrNotFound
	}
	var s sealed
	if err := json.Unmarshal(pt, &s); err != nil {
		return nil, fmt.Errorf("redis: decode entry: %w", err)
	}
	e := &Entry{AccessToken: s.Token, TokenType: s.Type, Scopes: s.Scopes,
		IssuedAt: time.Unix(0, s.IssuedAt), Expiry: time.Unix(0, s.Expiry), Fingerprint: s.FP}
	if !r.now().Before(e.Expiry) {
		return nil, ErrNotFound
	}
	return e, nil
}

var putScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'exp')
if cur and tonumber(cur) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'fp', ARGV[2], 'exp', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1`)

// PutIfNewer seals e and stores it unless the stored entry expires no
// earlier, atomically; on success it announces the change.
func (r *Redis) PutIfNewer(ctx context.Context, key string, e *Entry) (bool, error) {
	ttl := e.Expiry.Sub(r.now())
	if ttl <= 0 {
		return false, nil
	}
	if err := r.guard(); err != nil {
		return false, err
	}
	pt, err := json.Marshal(sealed{Token: e.AccessToken, Type: e.TokenType, Scopes: e.Scopes,
		IssuedAt: e.IssuedAt.UnixNano(), Expiry: e.Expiry.UnixNano(), FP: e.Fingerprint})
	if err != nil {
		return false, fmt.Errorf("redis: encode entry: %w", err)
	}
	v, err := r.sealer.Seal(key, pt)
	if err != nil {
		return false, err
	}
	n, err := putScript.Run(ctx, r.c, []string{r.key(key)},
		v, e.Fingerprint, e.Expiry.UnixMilli(), max(ttl.Milliseconds(), 1)).Int()
	if err := r.observe(err); err != nil {
		return false, err
	}
	if n == 1 {
		r.publish(ctx, Event{Kind: EventPut, Key: key, Fingerprint: e.Fingerprint})
	}
	return n == 1, nil
}

var deleteScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0`)

// DeleteIfCurrent removes the entry if it has fingerprint, atomically, and
// announces the deletion so every replica drops its in-process copy.
func (r *Redis) DeleteIfCurrent(ctx context.Context, key, fingerprint string) (bool, error) {
	if err := r.guard(); err != nil {
		return false, err
	}
	n, err := deleteScript.Run(ctx, r.c, []string{r.key(key)}, fingerprint).Int()
	if err := r.observe(err); err != nil {
		return false, err
	}
	if n == 1 {
		r.publish(ctx, Event{Kind: EventDelete, Key: key, Fingerprint: fingerprint})
	}
	return n == 1, nil
}

// Lock takes the lease on key with SET NX PX, or returns ErrLocked.
func (r *Redis) Lock(ctx context.Context, key, owner string, ttl time.Duration) error {
	if err := r.guard(); err != nil {
		return err
	}
	ok, err := r.c.SetNX(ctx, r.lockKey(key), owner, ttl).Result()
	if err := r.observe(err); err != nil {
		return err
	}
	if !ok {
		return ErrLocked
	}
	return nil
}

var unlockScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// Unlock releases the lease if owner still holds it (compare and delete).
func (r *Redis) Unlock(ctx context.Context, key, owner string) error {
	if err := r.guard(); err != nil {
		return err
	}
	return r.observe(unlockScript.Run(ctx, r.c, []string{r.lockKey(key)}, owner).Err())
}

// Close stops the prober and closes the client.
func (r *Redis) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return r.c.Close()
}

// publish announces a change; a lost announcement only delays other
// replicas until their next poll, so failures are not returned.
func (r *Redis) publish(ctx context.Context, ev Event) {
	_ = r.observe(r.c.Publish(ctx, r.Channel(), ev.encode()).Err())
}

// Subscribe calls fn for every change any replica announces until ctx ends.
// The subscription reconnects by itself after a Redis outage.
func (r *Redis) Subscribe(ctx context.Context, fn func(Event)) {
	ps := r.c.Subscribe(ctx, r.Channel())
	go func() {
		defer ps.Close()
		ch := ps.Channel()
		for {
			select {
			case <-ctx.Done():
				return
			case m, ok := <-ch:
				if !ok {
					return
				}
				if ev, ok := decodeEvent(m.Payload); ok {
					fn(ev)
				}
			}
		}
	}()
}

func (ev Event) encode() string {
	return strconv.Itoa(int(ev.Kind)) + "\x1f" + ev.Key + "\x1f" + ev.Fingerprint
}

func decodeEvent(s string) (Event, bool) {
	parts := strings.Split(s, "\x1f")
	if len(parts) != 3 {
		return Event{}, false
	}
	k, err := strconv.Atoi(parts[0])
	if err != nil || (EventKind(k) != EventPut && EventKind(k) != EventDelete) {
		return Event{}, false
	}
	return Event{Kind: EventKind(k), Key: parts[1], Fingerprint: parts[2]}, true
}
