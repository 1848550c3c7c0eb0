package broker

import (
	"slices"
	"sync/atomic"
)

// Where a token handed to a caller came from, as counted per credential.
const (
	fromMemory = iota
	fromStore
	fromUpstream
	numSources
)

// counts are a credential's counters: its series of
// tokenbroker_tokens_issued_total, tokenbroker_upstream_requests_total,
// tokenbroker_client_secret_used_total and tokenbroker_lease_wait_exceeded_total.
// They are plain integers in the credential's statistics, written out as
// text at scrape time (metrics.go), so that a credential's series cost a few
// words of heap each instead of a client_golang metric each. A series
// appears once its count is above zero, as the client_golang ones did.
// tokenbroker_token_source_total is their sum over credentials, and over
// those removed (Broker.retired).
type counts struct {
	sources  [numSources]atomic.Uint64
	ok       atomic.Uint64 // token requests that succeeded
	overruns atomic.Uint64 // fetches without the lease after its bound
	// rare holds the counts of failed token requests by outcome and of
	// secrets used; token requests are one per token lifetime, so a lock
	// around them costs nothing. Nil until the first failure or rotation.
	rare atomic.Pointer[rareCounts]
}

// rareCounts are the counts that are rarely written, copied on write.
type rareCounts struct {
	failures []outcomeCount // by outcome, in the order first seen
	secrets  []uint64       // by index in client_secret_files
}

type outcomeCount struct {
	outcome string
	n       uint64
}

// source counts a token handed out from source (SourceMemory,
// SourceUpstream or the store's name; an in-process store's name is
// SourceMemory, and its tokens count as the cache's).
func (c *counts) source(source string) {
	switch source {
	case SourceMemory:
		c.sources[fromMemory].Add(1)
	case SourceUpstream:
		c.sources[fromUpstream].Add(1)
	default:
		c.sources[fromStore].Add(1)
	}
}

// issued is the number of tokens handed out, from any source.
func (c *counts) issued() uint64 {
	var n uint64
	for i := range c.sources {
		n += c.sources[i].Load()
	}
	return n
}

// update replaces the rare counts with f applied to a copy of them.
func (c *counts) update(f func(r *rareCounts)) {
	for {
		old := c.rare.Load()
		next := &rareCounts{}
		if old != nil {
			next.failures = slices.Clone(old.failures)
			next.secrets = slices.Clone(old.secrets)
		}
		f(next)
		if c.rare.CompareAndSwap(old, next) {
			return
		}
	}
}

// failed counts a token request that failed with outcome.
func (c *counts) failed(outcome string) {
	c.update(func(r *rareCounts) {
		for i := range r.failures {
			if r.failures[i].outcome == outcome {
				r.failures[i].n++
				return
			}
		}
		r.failures = append(r.failures, outcomeCount{outcome: outcome, n: 1})
	})
}

// secretUsed counts a token request that succeeded with the secret at index i
// of a credential that has more than one; with one secret the count would
// repeat tokenbroker_upstream_requests_total{outcome="ok"}.
func (c *counts) secretUsed(i int) {
	if i < 0 {
		return
	}
	c.update(func(r *rareCounts) {
		for len(r.secrets) <= i {
			r.secrets = append(r.secrets, 0)
		}
		r.secrets[i]++
	})
}
