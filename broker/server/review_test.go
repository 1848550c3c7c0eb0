package server

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// TestReviewMalformedMinTTLFloodAuditedInAggregate: a caller with an
// identity that no credential allows, rate limited, sends GetToken and
// WatchToken with a min_ttl that is not a valid protobuf Duration (nanos out
// of range). Such a call must cost what any other refused call costs: the
// rate limit and the caller's access are checked first, and its denials are
// audited in aggregate, not one line each.
func TestReviewMalformedMinTTLFloodAuditedInAggregate(t *testing.T) {
	const window = time.Second
	h := newHarnessWith(t, func(c *config.Config) {
		c.RateLimit = &config.RateLimit{RequestsPerSecond: 50, Burst: 50}
	}, func(o *Options) { o.AuditDenialWindow = window })
	c := h.client(stranger)
	bad := &durationpb.Duration{Seconds: 1, Nanos: 2_000_000_000} // CheckValid fails
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var calls atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i := range 4 {
		wg.Go(func() {
			for ctx.Err() == nil && calls.Add(1) <= 2_000 {
				if i == 0 {
					w, err := c.WatchToken(ctx, &pb.WatchTokenRequest{Credential: "identity", MinTtl: bad})
					if err == nil {
						_, _ = w.Recv()
					}
					continue
				}
				_, _ = c.GetToken(ctx, &pb.GetTokenRequest{Credential: "identity", MinTtl: bad})
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	time.Sleep(window + 1500*time.Millisecond) // the last summaries, then the audit flush
	n := min(calls.Load(), 2_000)
	var lines int
	for _, l := range auditLines(t, h.audit.String()) {
		if l.Caller == stranger {
			lines++
		}
	}
	t.Logf("%d malformed calls in %v: %d audit lines for the caller", n, elapsed, lines)
	if n < 200 {
		t.Fatalf("only %d calls made: too few to show anything", n)
	}
	// The first denial of each outcome at once, then one summary per window.
	if maxLines := 2 * (2 + int(elapsed/window)); lines > maxLines {
		t.Errorf("%d audit lines for %d calls of a caller no credential allows, want at most %d", lines, n, maxLines)
	}

	// A caller that may use the credential still hears what was wrong.
	_, err := h.client(payments).GetToken(context.Background(), &pb.GetTokenRequest{Credential: "identity", MinTtl: bad})
	if st := status.Convert(err); st.Code() != codes.InvalidArgument || st.Message() == "" {
		t.Errorf("a malformed min_ttl from an allowed caller: %v, want INVALID_ARGUMENT", err)
	}
}

// TestReviewOversizedValueIsAbsent: someone with write access to Redis puts
// a huge value (tens of MB) in the field v of a token's entry hash. The
// broker must treat it as it treats any value that does not open: absent,
// replaced by the next valid token, costing one token request, without
// marking Redis down for every key.
func TestReviewOversizedValueIsAbsent(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	srvs, clients := replicas(h, 2)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if _, failed := callAll(h, clients[:1], 1, req); failed > 0 {
		t.Fatal("first call failed")
	}
	c, ctx := rs.Client(), context.Background()
	entry := onlyEntry(t, c)
	huge := strings.Repeat("x", reviewHugeValue)
	if err := c.HSet(ctx, entry, "v", huge).Err(); err != nil {
		t.Fatal(err)
	}
	huge = ""
	before := h.as.TokenRequests()
	outages := 0.0
	start := time.Now()
	for round := range 6 {
		evictAll(srvs)
		if _, failed := callAll(h, clients, 1, req); failed > 0 {
			t.Fatalf("round %d: %d calls failed", round, failed)
		}
		for _, s := range srvs {
			if up := metricAt(t, s, "tokenbroker_store_up"); up != 1 {
				outages++
			}
		}
		time.Sleep(300 * time.Millisecond)
	}
	n := h.as.TokenRequests() - before
	size := c.HStrLen(ctx, entry, "v").Val()
	t.Logf("6 rounds in %v: %d token requests, store_up 0 seen %v times, stored v now %d bytes", time.Since(start), n, outages, size)
	if n > 1 {
		t.Errorf("token requests after the oversized value = %d, want 1 (it is replaced once)", n)
	}
	if outages > 0 {
		t.Errorf("tokenbroker_store_up went to 0 %v times: one oversized value marked Redis down for every key", outages)
	}
	if size >= reviewHugeValue {
		t.Errorf("the oversized value is still stored (%d bytes)", size)
	}
}

// reviewHugeValue is the size of the value TestReviewOversizedValueIsAbsent plants.
const reviewHugeValue = 64 << 20

// TestReviewRefusedInvalidationsAudited: InvalidateToken from a caller that
// may not use the credential, and from an allowed caller over its
// invalidation limit, is a decision like any other and must leave an audit
// event — aggregated, so that a flood of them stays a few lines.
func TestReviewRefusedInvalidationsAudited(t *testing.T) {
	const window = time.Second
	h := newHarnessWith(t, nil, func(o *Options) { o.AuditDenialWindow = window })
	fp := strings.Repeat("0", 32)
	req := &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: fp}
	strangerC, paymentsC := h.client(stranger), h.client(payments)
	var denied, limited int
	start := time.Now()
	for range 300 {
		if _, err := strangerC.InvalidateToken(context.Background(), req); status.Code(err) == codes.PermissionDenied {
			denied++
		}
		if _, err := paymentsC.InvalidateToken(context.Background(), req); status.Code(err) == codes.ResourceExhausted {
			limited++
		}
	}
	elapsed := time.Since(start)
	time.Sleep(window + 1500*time.Millisecond) // the last summaries, then the audit flush
	counted := map[string]int{}
	lines := map[string]int{}
	for _, l := range auditLines(t, h.audit.String()) {
		if l.Event != "token.invalidated" || l.Outcome == "invalidated" || l.Outcome == "not_current" {
			continue
		}
		lines[l.Caller+" "+l.Outcome]++
		counted[l.Caller+" "+l.Outcome] += max(l.Count, 1)
	}
	t.Logf("%d refused as PERMISSION_DENIED, %d as RESOURCE_EXHAUSTED in %v; audit lines %v, counting %v", denied, limited, elapsed, lines, counted)
	if denied != 300 || limited < 250 {
		t.Fatalf("refusals: %d and %d, want 300 and at least 250", denied, limited)
	}
	for key, want := range map[string]int{stranger + " PermissionDenied": denied, payments + " ResourceExhausted": limited} {
		if counted[key] != want {
			t.Errorf("audit counts %d refusals for %q, want %d", counted[key], key, want)
		}
		if maxLines := 2 + int(elapsed/window); lines[key] > maxLines {
			t.Errorf("%d audit lines for %q, want at most %d (aggregated)", lines[key], key, maxLines)
		}
	}
}

// TestReviewLostEventLeavesInvalidatedToken: a replica's subscription to
// the events channel is cut (a network blip, a Redis failover, CLIENT KILL,
// or a message over the pub/sub output limit) just while another replica
// invalidates a token. store.publish says a lost announcement "only delays
// other replicas until their next poll"; the invalidated token must not be
// served by them for long.
func TestReviewLostEventLeavesInvalidatedToken(t *testing.T) {
	rs := redistest.Start(t)
	h := newHarness(t, withRedis("", rs.Addr()))
	_, clients := replicas(h, 2)
	req := &pb.GetTokenRequest{Credential: "identity"}
	fps, failed := callAll(h, clients, 1, req)
	if len(fps) != 1 || failed > 0 {
		t.Fatalf("warm-up: %v, %d failed", fps, failed)
	}
	fp := firstKey(fps)
	c, ctx := rs.Client(), context.Background()
	stop := make(chan struct{})
	killed := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				killed <- n
				return
			default:
			}
			n += int(c.ClientKillByFilter(ctx, "TYPE", "pubsub").Val())
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	if _, err := clients[0].InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: fp}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	n := <-killed
	var still int
	for range 10 {
		time.Sleep(500 * time.Millisecond)
		if tok, err := h.get(clients[1], req); err == nil && tok.GetFingerprint() == fp {
			still++
		}
	}
	t.Logf("%d subscriptions cut around the invalidation; replica 2 served the invalidated token in %d of 10 calls over the next 5s", n, still)
	if still > 0 {
		t.Errorf("replica 2 served the invalidated token %s %d times over 5s after its subscription came back", fp, still)
	}
}
