package broker

import (
	"context"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/promtext"
)

// expirySeries returns the value of b's tokenbroker_token_expiry_seconds
// series for credential identity, and whether there is one.
func expirySeries(t *testing.T, b *Broker) (float64, bool) {
	t.Helper()
	var w promtext.Writer
	b.WriteCredentialMetrics(&w)
	prefix := expiryFamily + `{credential="identity"} `
	for line := range strings.SplitSeq(string(w.Bytes()), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("bad sample %q", line)
			}
			return f, true
		}
	}
	return 0, false
}

// TestExpirySeriesAtTheRefreshEdge: tokenbroker_token_expiry_seconds has a
// series for a token exactly from its refresh point plus the credential's
// timeout on, while callers ask for it or a WatchToken stream holds it, and
// none for a token nobody asks for, however close to expiry (issue 27).
func TestExpirySeriesAtTheRefreshEdge(t *testing.T) {
	ctx := context.Background()
	b, _, clock := newTestBroker(t, nil, time.Hour)
	// A short idle timeout, so that a token can be idle and still valid.
	cfg := (*b.creds.Load())["identity"].Credential
	cfg.IdleTimeout = 20 * time.Second
	if err := b.SetCredentials([]Credential{cfg}); err != nil {
		t.Fatal(err)
	}
	ask := func() {
		t.Helper()
		if _, err := b.GetToken(ctx, testCaller, Request{Credential: "identity"}); err != nil {
			t.Fatal(err)
		}
	}
	ask()
	ask() // the demand (min_ttl) of a cached token's callers is recorded from its second call
	var s *slot
	b.l1.Range(func(_, v any) bool { s = v.(*slot); return false })
	e := s.entry.Load()
	cred := (*b.creds.Load())["identity"]
	edge := s.refreshPoint(cred, e).Add(cred.Timeout)
	if left := e.Expiry.Sub(edge); left < time.Minute {
		t.Fatalf("the edge is %v before expiry; the test wants a token the caller can still be served", left)
	}

	clock.Add(edge.Sub(clock.Now()) - time.Second)
	ask() // in use, served from memory
	if v, ok := expirySeries(t, b); ok {
		t.Fatalf("a series (%v) a second before the refresh point plus the timeout", v)
	}
	clock.Add(time.Second)
	if v, ok := expirySeries(t, b); !ok || math.Abs(v-e.Expiry.Sub(clock.Now()).Seconds()) > 1e-6 {
		t.Fatalf("at the refresh point plus the timeout: series %v (%v), want %v", v, ok, e.Expiry.Sub(clock.Now()).Seconds())
	}
	if s.entry.Load() != e {
		t.Fatal("the token was replaced; the test wants it overdue")
	}

	clock.Add(cfg.IdleTimeout + time.Second) // nobody asks; still valid
	if v, ok := expirySeries(t, b); ok {
		t.Fatalf("a series (%v) for a token nobody asked for within the idle timeout", v)
	}
	s.watchers.Add(1) // an open WatchToken stream keeps the refresher on it
	if _, ok := expirySeries(t, b); !ok {
		t.Fatal("no series for an overdue token a WatchToken stream holds")
	}
	s.watchers.Add(-1)
}

// sourceTotals returns b's tokenbroker_token_source_total series by source.
func sourceTotals(t *testing.T, b *Broker) map[string]float64 {
	t.Helper()
	var w promtext.Writer
	b.WriteCredentialMetrics(&w)
	out := map[string]float64{}
	for line := range strings.SplitSeq(string(w.Bytes()), "\n") {
		if rest, ok := strings.CutPrefix(line, sourceFamily+`{source="`); ok {
			src, v, _ := strings.Cut(rest, `"} `)
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("bad sample %q", line)
			}
			out[src] = f
		}
	}
	return out
}

// TestTokenSourceNeverGoesDown: tokenbroker_token_source_total is by source
// over all credentials; a credential removed (while callers still ask for
// it, and while /metrics is read) keeps its tokens counted, and one added
// again starts its own count afresh. A counter that went down would read as
// a reset to Prometheus.
func TestTokenSourceNeverGoesDown(t *testing.T) {
	ctx := context.Background()
	b, _, _ := newTestBroker(t, nil, time.Hour)
	identity := (*b.creds.Load())["identity"].Credential
	other := identity
	other.Name = "other"
	with, without := []Credential{identity, other}, []Credential{identity}
	if err := b.SetCredentials(with); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := b.GetToken(ctx, testCaller, Request{Credential: "other"}); err != nil {
			t.Fatal(err)
		}
	}
	before := sourceTotals(t, b)
	if before[SourceUpstream] != 1 || before[SourceMemory] != 2 {
		t.Fatalf("token_source_total = %v, want upstream 1, memory 2", before)
	}
	if err := b.SetCredentials(without); err != nil {
		t.Fatal(err)
	}
	if got := sourceTotals(t, b); got[SourceUpstream] != 1 || got[SourceMemory] != 2 {
		t.Fatalf("token_source_total after other was removed = %v, want it unchanged", got)
	}

	// Reloads that remove and add other again, while callers ask for it and
	// /metrics is read: every read is at least the one before.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
					_, _ = b.GetToken(ctx, testCaller, Request{Credential: "other"}) // refused while other is removed
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 200 {
			cs := with
			if i%2 == 1 {
				cs = without
			}
			if err := b.SetCredentials(cs); err != nil {
				t.Error(err)
			}
			time.Sleep(time.Millisecond) // room for the callers
		}
		close(stop)
	})
	prev := sourceTotals(t, b)
	for done := false; !done; {
		select {
		case <-stop:
			done = true
		default:
		}
		got := sourceTotals(t, b)
		for src, v := range prev {
			if got[src] < v {
				t.Fatalf("token_source_total{source=%q} went down from %v to %v", src, v, got[src])
			}
		}
		prev = got
	}
	wg.Wait()
	if prev[SourceMemory]+prev[SourceUpstream] <= 3 {
		t.Errorf("token_source_total = %v: the callers' tokens during the reloads were not counted", prev)
	}
}
