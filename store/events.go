package store

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Events on the channel are authenticated, so that only the fleet can make
// replicas drop tokens (each drop costs a token request):
//
//	tb2 US kind US unix-ms US key-id US cache key US fingerprint US mac
//
// (US is the byte 0x1f.) mac is the hex HMAC-SHA256 of the channel name, US
// and everything before the last US, under a key derived from the sealing key
// named by key-id. An event is accepted once, and only within eventWindow of
// the receiver's clock. Messages in another format — including the
// unauthenticated ones of releases before this one — are dropped and counted.
const (
	eventVersion = "tb2"
	eventWindow  = 30 * time.Second
	us           = "\x1f"
)

// Reasons an event is rejected, as counted by EventsRejected.
const (
	RejectMalformed = "malformed" // not an event of this format
	RejectMAC       = "mac"       // no valid MAC under a configured key
	RejectStale     = "stale"     // timestamp outside the window
	RejectReplay    = "replay"    // seen before
)

// RejectReasons lists the reasons an event is rejected.
var RejectReasons = []string{RejectMalformed, RejectMAC, RejectStale, RejectReplay}

// encodeEvent formats and authenticates ev for the channel, at wall time now.
func (r *Redis) encodeEvent(ev Event, now time.Time) string {
	body := eventVersion + us + strconv.Itoa(int(ev.Kind)) + us + strconv.FormatInt(now.UnixMilli(), 10) + us +
		hex.EncodeToString(r.sealer.currentID[:]) + us + ev.Key + us + ev.Fingerprint
	return body + us + hex.EncodeToString(r.eventMAC(r.sealer.macs[r.sealer.currentID], body))
}

func (r *Redis) eventMAC(key []byte, body string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(r.Channel() + us + body))
	return m.Sum(nil)
}

// decodeEvent verifies a message at wall time now; the reason is empty when
// the event is accepted.
func (r *Redis) decodeEvent(msg string, now time.Time) (Event, string) {
	i := strings.LastIndex(msg, us)
	if i < 0 {
		return Event{}, RejectMalformed
	}
	body, macHex := msg[:i], msg[i+1:]
	parts := strings.Split(body, us)
	if len(parts) != 6 || parts[0] != eventVersion {
		return Event{}, RejectMalformed
	}
	mac, err := hex.DecodeString(macHex)
	if err != nil {
		return Event{}, RejectMalformed
	}
	var id [keyIDSize]byte
	if b, err := hex.DecodeString(parts[3]); err != nil || len(b) != keyIDSize {
		return Event{}, RejectMalformed
	} else {
		copy(id[:], b)
	}
	key, ok := r.sealer.macs[id]
	if !ok || !hmac.Equal(mac, r.eventMAC(key, body)) {
		return Event{}, RejectMAC
	}
	k, err1 := strconv.Atoi(parts[1])
	ms, err2 := strconv.ParseInt(parts[2], 10, 64)
	if err1 != nil || err2 != nil || (EventKind(k) != EventPut && EventKind(k) != EventDelete) {
		return Event{}, RejectMalformed
	}
	at := time.UnixMilli(ms)
	if d := now.Sub(at); d > eventWindow || d < -eventWindow {
		return Event{}, RejectStale
	}
	if !r.replays.first(macHex, at, now) {
		return Event{}, RejectReplay
	}
	return Event{Kind: EventKind(k), Key: parts[4], Fingerprint: parts[5]}, ""
}

// replayCache remembers the MACs of the events accepted within the window,
// so that each is acted on once.
type replayCache struct {
	mu   sync.Mutex
	seen map[string]time.Time // MAC → event time
}

// first records mac and reports whether it is new. Entries older than the
// window are dropped as the map grows: older events are refused as stale anyway.
func (c *replayCache) first(mac string, at, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[string]time.Time{}
	}
	if _, dup := c.seen[mac]; dup {
		return false
	}
	if len(c.seen) >= 1024 {
		for m, t := range c.seen {
			if now.Sub(t) > eventWindow {
				delete(c.seen, m)
			}
		}
	}
	c.seen[mac] = at
	return true
}

// publish announces a change. Failures are not returned: a replica that
// misses an announcement (its subscription down) checks what it holds
// against the tombstones when it subscribes again (EventResync), and a
// missed put only delays a waiter until its next read of the store.
func (r *Redis) publish(ctx context.Context, ev Event) {
	if err := r.c.Publish(ctx, r.Channel(), r.encodeEvent(ev, time.Now())).Err(); err != nil {
		r.log.Debug("redis: publish failed")
	}
}

// Subscribe calls fn for every change another replica of the fleet
// announces until ctx ends; messages that are not authenticated events are
// dropped and counted (EventsRejected). The subscription reconnects by
// itself after a Redis outage, or after Redis cut it (a message over its
// pub/sub output limit, CLIENT KILL); each time it is established, fn gets
// EventResync, since what was announced in between is lost.
func (r *Redis) Subscribe(ctx context.Context, fn func(Event)) {
	ps := r.c.Subscribe(ctx, r.Channel())
	go func() {
		defer ps.Close()
		ch := ps.ChannelWithSubscriptions()
		for {
			select {
			case <-ctx.Done():
				return
			case v, ok := <-ch:
				if !ok {
					return
				}
				m, isMsg := v.(*redis.Message)
				if !isMsg {
					if s, ok := v.(*redis.Subscription); ok && s.Kind == "subscribe" {
						fn(Event{Kind: EventResync})
					}
					continue
				}
				ev, reason := r.decodeEvent(m.Payload, time.Now())
				if reason != "" {
					r.stats.rejected(reason)
					continue
				}
				fn(ev)
			}
		}
	}()
}
