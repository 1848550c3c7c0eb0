package store

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// DefaultProbeInterval is how often every Redis node is pinged.
const DefaultProbeInterval = 2 * time.Second

// Health is kept per node (per master in a Cluster): a node is down from the
// first command that fails to reach it, or the first probe it does not
// answer in time, until its own probe answers again. Keys whose node is down
// fail fast with ErrUnavailable (fail-open); keys on the other nodes of a
// Cluster keep using Redis. The probe runs from the start, whether or not
// calls reach the store, so the state is true without traffic.

// node is the health of one Redis node.
type node struct {
	up    atomic.Bool
	since atomic.Int64 // Unix nanoseconds of the last change
}

// nodeSet holds the health of every node the probe knows.
type nodeSet struct {
	mu    sync.Mutex
	nodes map[string]*node // addr →
}

func (s *nodeSet) get(addr string) *node {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nodes == nil {
		s.nodes = map[string]*node{}
	}
	n := s.nodes[addr]
	if n == nil {
		n = &node{}
		n.up.Store(true) // until a command or the probe says otherwise
		n.since.Store(time.Now().UnixNano())
		s.nodes[addr] = n
	}
	return n
}

// keep forgets the nodes not in addrs (a Cluster's membership changed).
func (s *nodeSet) keep(addrs []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for a := range s.nodes {
		if !slices.Contains(addrs, a) {
			delete(s.nodes, a)
		}
	}
}

// snapshot returns each node's state ("ok" or "down").
func (s *nodeSet) snapshot() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]string, len(s.nodes))
	for a, n := range s.nodes {
		out[a] = "ok"
		if !n.up.Load() {
			out[a] = "down"
		}
	}
	return out
}

// nodeFor returns the address of the node that holds key: the master of its
// slot in a Cluster, else the one server (or Sentinel's current master).
func (r *Redis) nodeFor(ctx context.Context, key string) (string, error) {
	if r.cluster == nil {
		return r.single, nil
	}
	c, err := r.cluster.MasterForKey(ctx, r.key(key))
	if err != nil {
		return "", err
	}
	return c.Options().Addr, nil
}

// guard returns the node holding key, or ErrUnavailable without contacting
// Redis while that node is down.
func (r *Redis) guard(ctx context.Context, key string) (string, error) {
	addr, err := r.nodeFor(ctx, key)
	if err != nil {
		return "", r.observe("", err)
	}
	if !r.nodes.get(addr).up.Load() {
		return "", ErrUnavailable
	}
	return addr, nil
}

// unavailable reports whether err says the node cannot serve, as opposed to
// a refusal of one command (a wrong type, a script error) or the caller's
// own context ending: only the former marks a node down.
func unavailable(err error) bool {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var rerr redis.Error
	if errors.As(err, &rerr) {
		for _, p := range []string{"CLUSTERDOWN", "LOADING", "MASTERDOWN", "TRYAGAIN", "READONLY", "BUSY"} {
			if strings.HasPrefix(rerr.Error(), p) {
				return true
			}
		}
		return false
	}
	return true // connection refused or reset, read timeout, pool timeout
}

// observe records the outcome of a command on node addr ("" when no node
// could be found: all of them). It wraps err.
func (r *Redis) observe(addr string, err error) error {
	if err == nil || errors.Is(err, redis.Nil) {
		return err
	}
	if unavailable(err) {
		if addr == "" {
			for a := range r.nodes.snapshot() {
				r.setNode(a, err)
			}
		} else {
			r.setNode(addr, err)
		}
	}
	return errors.Join(errRedis, err)
}

var errRedis = errors.New("redis")

// setNode records a node's state from the outcome of a command or probe and
// logs each change once.
func (r *Redis) setNode(addr string, err error) {
	n := r.nodes.get(addr)
	up := err == nil
	if n.up.CompareAndSwap(!up, up) {
		was := time.Duration(time.Now().UnixNano() - n.since.Swap(time.Now().UnixNano()))
		if up {
			r.log.Info("redis node is back; sharing tokens on it again", zap.String("node", addr), zap.Duration("down_for", was))
		} else {
			r.stats.outages.Add(1)
			r.log.Warn("redis node unavailable; keys on it are served from memory and the token endpoint until it returns",
				zap.String("node", addr), zap.Error(err))
		}
	}
}

// probeLoop pings every node each probe interval until the store is closed.
func (r *Redis) probeLoop() {
	t := time.NewTicker(r.probe)
	defer t.Stop()
	for {
		select {
		case <-r.closed:
			return
		case <-t.C:
			r.probeOnce()
		}
	}
}

// probeOnce pings every node, each within the probe timeout, and records
// their states. A node that hangs (SIGSTOP) is down after probeTimeout.
func (r *Redis) probeOnce() {
	ctx, cancel := context.WithTimeout(context.Background(), r.probeTimeout())
	defer cancel()
	defer r.lastProbe.Store(time.Now().UnixNano())
	if r.cluster == nil {
		r.setNode(r.single, r.c.Ping(ctx).Err())
		return
	}
	var mu sync.Mutex
	var seen []string
	anyDown := false
	err := r.cluster.ForEachShard(ctx, func(ctx context.Context, c *redis.Client) error {
		err := c.Ping(ctx).Err()
		addr := c.Options().Addr
		r.setNode(addr, err)
		mu.Lock()
		seen = append(seen, addr)
		anyDown = anyDown || err != nil
		mu.Unlock()
		return nil
	})
	if err != nil { // no cluster state at all: every node known is down
		for a := range r.nodes.snapshot() {
			r.setNode(a, err)
		}
		r.masters.Store(&[]string{})
		return
	}
	r.nodes.keep(seen)
	var masters []string
	_ = r.cluster.ForEachMaster(ctx, func(_ context.Context, c *redis.Client) error {
		mu.Lock()
		masters = append(masters, c.Options().Addr)
		mu.Unlock()
		return nil
	})
	r.masters.Store(&masters)
	if anyDown {
		r.cluster.ReloadState(ctx) // follow a failover as soon as the cluster has one
	}
}

func (r *Redis) probeTimeout() time.Duration { return min(r.probe, time.Second) }
