package server

import (
	"context"
	"crypto/tls"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/server/attacktest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// attacker is a target for attacktest on h's broker, with a certificate
// from the trusted CA for ids: without any, one that carries no usable
// identity (no SAN at all).
func (h *harness) attacker(t *testing.T, ids ...string) attacktest.Target {
	t.Helper()
	pair, err := h.ca.Client(time.Hour, ids...)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	return attacktest.Target{Addr: h.srv.GRPCAddr().String(),
		TLS: &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool(), Certificates: []tls.Certificate{cert}}}
}

// TestRapidResetEndsInGoAway: 200,000 HEADERS + RST_STREAM pairs on one
// connection (CVE-2023-44487) at the default limits get GOAWAY
// ENHANCE_YOUR_CALM within a second, the connection is counted as refused,
// and the broker serves other callers meanwhile.
func TestRapidResetEndsInGoAway(t *testing.T) {
	h := newHarness(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := attacktest.RapidReset(ctx, h.attacker(t), 200_000)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rapid reset: %d pairs sent in %v, GOAWAY %+v", res.Pairs, res.Took, res.GoAway)
	if res.GoAway == nil || res.GoAway.Code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("after %d pairs in %v: GOAWAY %+v, want ENHANCE_YOUR_CALM", res.Pairs, res.Took, res.GoAway)
	}
	if res.GoAway.After > time.Second {
		t.Errorf("GOAWAY %v after the first frame, want within a second", res.GoAway.After)
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=stream_resets_per_second"); got != 1 {
		t.Errorf("tokenbroker_connections_refused_total{reason=stream_resets_per_second} = %v, want 1", got)
	}
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("a caller after the attack: %v", err)
	}
}

// TestStreamFloodEndsInGoAway: a connection that opens streams faster than
// limits.new_streams_per_second allows, without cancelling any, is sent
// GOAWAY ENHANCE_YOUR_CALM too.
func TestStreamFloodEndsInGoAway(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Limits = config.Limits{NewStreamsPerSecond: 100, NewStreamsBurst: 100} })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := attacktest.StreamFlood(ctx, h.attacker(t), 100_000)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stream flood: %d streams sent in %v, GOAWAY %+v", res.Pairs, res.Took, res.GoAway)
	if res.GoAway == nil || res.GoAway.Code != http2.ErrCodeEnhanceYourCalm || res.GoAway.After > 5*time.Second {
		t.Fatalf("after %d streams in %v: GOAWAY %+v, want ENHANCE_YOUR_CALM", res.Pairs, res.Took, res.GoAway)
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=new_streams_per_second"); got != 1 {
		t.Errorf("tokenbroker_connections_refused_total{reason=new_streams_per_second} = %v, want 1", got)
	}
}

// TestHandshakeCaps: connections that never start their TLS handshake are
// held at most limits.handshakes_per_source per source address and
// limits.handshakes_in_progress in all; the rest are closed at once and
// counted by reason; a caller still connects once they are gone.
func TestHandshakeCaps(t *testing.T) {
	const perSource, total = 20, 30
	h := newHarness(t, func(c *config.Config) {
		c.Limits = config.Limits{HandshakesPerSource: perSource, Handshakes: total}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	one := h.attacker(t)
	held1, refused1, err := attacktest.Hold(ctx, one, 200, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	two := one
	two.Source = "127.0.0.2"
	held2, refused2, err := attacktest.Hold(ctx, two, 200, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("source 1: %d held, %d closed; source 2: %d held, %d closed", len(held1), refused1, len(held2), refused2)
	if len(held1) != perSource || len(held2) != total-perSource {
		t.Errorf("held %d from one source and %d from another, want %d and %d", len(held1), len(held2), perSource, total-perSource)
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=handshakes_per_source"); got != 200-perSource {
		t.Errorf("refused for handshakes_per_source: %v, want %d", got, 200-perSource)
	}
	if got := h.metric(t, "tokenbroker_connections_refused_total", "reason=handshakes_in_progress"); got != 200-(total-perSource) {
		t.Errorf("refused for handshakes_in_progress: %v, want %d", got, 200-(total-perSource))
	}
	if got := h.metric(t, "tokenbroker_connections_in_handshake"); got != total {
		t.Errorf("tokenbroker_connections_in_handshake = %v, want %d", got, total)
	}
	for _, c := range append(held1, held2...) {
		_ = c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for h.metric(t, "tokenbroker_connections_in_handshake") != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("a caller once the parked connections are gone: %v", err)
	}
}

// TestSilentStreamsAreCut: streams whose request message never comes are
// reset (RST_STREAM CANCEL, which a gRPC client reports as CANCELLED) after
// limits.first_message_timeout, and counted.
func TestSilentStreamsAreCut(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Limits = config.Limits{FirstMessageTimeout: config.Duration(300 * time.Millisecond)}
	})
	target := h.attacker(t, payments) // an identity: the streams are admitted
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	ends, err := attacktest.SilentStreams(ctx, target, "/tokenbroker.v1.TokenBroker/GetToken", 20)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	for i, e := range ends {
		if e != "rst CANCEL" {
			t.Errorf("stream %d ended %q, want RST_STREAM CANCEL", i, e)
		}
	}
	if took > 5*time.Second {
		t.Errorf("streams cut after %v, want about limits.first_message_timeout (300ms)", took)
	}
	if got := h.metric(t, "tokenbroker_streams_refused_total", "reason=first_message_timeout"); got != 20 {
		t.Errorf("tokenbroker_streams_refused_total{reason=first_message_timeout} = %v, want 20", got)
	}
}

// TestSilentStreamsAmongOrdinaryCalls: on one connection, silent streams
// interleaved with ordinary calls — several streams' frames in one read,
// some headers in CONTINUATION frames — are the ones reset, each once; the
// ordinary calls are answered; and gRPC itself lets the reset streams go:
// with gRPC's cap on concurrent streams at 8, eight more silent streams on
// the same connection after five reset ones are all admitted (and reset),
// none refused.
func TestSilentStreamsAmongOrdinaryCalls(t *testing.T) {
	const concurrent = 8
	h := newHarnessWith(t, func(c *config.Config) {
		c.Limits = config.Limits{FirstMessageTimeout: config.Duration(300 * time.Millisecond)}
	}, func(o *Options) { o.MaxStreamsPerConnection = concurrent })
	target := h.attacker(t, payments)
	req, err := proto.Marshal(&pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	ordinary := attacktest.Call{Request: req}
	first := []attacktest.Call{ // as many as gRPC holds at once
		{Silent: true}, ordinary, {Silent: true, Fragments: 3}, {Request: req, Fragments: 4},
		{Silent: true}, ordinary, {Silent: true, Fragments: 2}, {Silent: true},
	}
	second := make([]attacktest.Call, concurrent)
	for i := range second {
		second[i].Silent = true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ends, err := attacktest.Streams(ctx, target, "/tokenbroker.v1.TokenBroker/GetToken", first, second)
	if err != nil {
		t.Fatal(err)
	}
	silent := 0
	for i, call := range first {
		want := "0"
		if call.Silent {
			want = "rst CANCEL"
			silent++
		}
		if ends[0][i] != want {
			t.Errorf("first batch, stream %d (silent %v): ended %q, want %q", i, call.Silent, ends[0][i], want)
		}
	}
	for i, e := range ends[1] {
		if e != "rst CANCEL" {
			t.Errorf("second batch, silent stream %d: ended %q, want RST_STREAM CANCEL (REFUSED_STREAM: gRPC still held the reset ones)", i, e)
		}
	}
	if got := h.metric(t, "tokenbroker_streams_refused_total", "reason=first_message_timeout"); got != float64(silent+concurrent) {
		t.Errorf("tokenbroker_streams_refused_total{reason=first_message_timeout} = %v, want %d", got, silent+concurrent)
	}
	if got := h.metric(t, "tokenbroker_requests_total", "method=tokenbroker.v1.TokenBroker/GetToken", "code=OK"); got != float64(len(first)-silent) {
		t.Errorf("GetToken calls answered OK: %v, want %d", got, len(first)-silent)
	}
}

// TestOversizedHeadersRefused: a header list over limits.max_header_list_size
// opens no stream.
func TestOversizedHeadersRefused(t *testing.T) {
	h := newHarness(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := attacktest.HeaderFlood(ctx, h.attacker(t), 10, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("header flood: %+v", res)
	if got := h.metric(t, "grpc_server_started_total"); got > 0 {
		t.Errorf("%v calls started from oversized headers, want none", got)
	}
}

// TestStreamsPerConnection: one connection holds at most
// limits.streams_per_connection calls, grpc.health.v1.Health/Watch streams
// included; the next is refused with RESOURCE_EXHAUSTED naming the limit,
// while the same caller on another connection is served.
func TestStreamsPerConnection(t *testing.T) {
	const limit = 5
	h := newHarness(t, func(c *config.Config) { c.Limits = config.Limits{StreamsPerConnection: limit} })
	conn := h.conn(nil, payments)
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range limit {
		w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err == nil {
			_, err = w.Recv()
		}
		if err != nil {
			t.Fatalf("Health/Watch %d: %v", i+1, err)
		}
	}
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err == nil {
		_, err = w.Recv()
	}
	if st := status.Convert(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "limits.streams_per_connection") {
		t.Errorf("Health/Watch %d: %v, want RESOURCE_EXHAUSTED naming limits.streams_per_connection", limit+1, err)
	}
	if _, err := pb.NewTokenBrokerClient(conn).GetToken(ctx, &pb.GetTokenRequest{Credential: "identity"}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("GetToken on the full connection: %v, want RESOURCE_EXHAUSTED", err)
	}
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("the same caller on another connection: %v", err)
	}
	if got := h.metric(t, "tokenbroker_streams_refused_total", "reason=streams_per_connection"); got != 2 {
		t.Errorf("tokenbroker_streams_refused_total{reason=streams_per_connection} = %v, want 2", got)
	}
}

// TestDenialFloodAuditedInAggregate: the audit flood of issue 23. A peer
// without a usable identity makes as many calls as it can for 3 seconds
// (20,000 at most), and so does a caller that no credential allows, with a
// rate limit on. Each is refused before any per-call work; the audit trail
// gets, per (source, outcome), the first denial at once and then one summary
// line per window carrying the count. A new caller's first denial is
// written; issued tokens are each audited.
func TestDenialFloodAuditedInAggregate(t *testing.T) {
	const window = time.Second
	h := newHarnessWith(t, func(c *config.Config) {
		c.RateLimit = &config.RateLimit{RequestsPerSecond: 50, Burst: 50}
	}, func(o *Options) { o.AuditDenialWindow = window })
	anonymous := h.conn(nil, []string{}...) // a certificate of the trusted CA with no SAN
	flood := func(c pb.TokenBrokerClient) (calls, refused int64) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var n, denied atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for ctx.Err() == nil && n.Add(1) <= 20_000 {
					_, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: "identity"})
					if code := status.Code(err); code == codes.Unauthenticated || code == codes.PermissionDenied || code == codes.ResourceExhausted {
						denied.Add(1)
					}
				}
			})
		}
		wg.Wait()
		return min(n.Load(), 20_000), denied.Load()
	}
	start := time.Now()
	calls1, refused1 := flood(pb.NewTokenBrokerClient(anonymous))
	calls2, refused2 := flood(h.client(stranger))
	issued := 0
	for range 3 {
		if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err == nil {
			issued++
		}
	}
	_, _ = h.get(h.client("spiffe://bank.internal/ns/other/sa/newcomer"), &pb.GetTokenRequest{Credential: "identity"})
	elapsed := time.Since(start)
	time.Sleep(window + 1500*time.Millisecond) // the last summaries, then the one-second audit flush
	lines := auditLines(t, h.audit.String())
	t.Logf("no identity: %d calls, %d refused; denied caller: %d calls, %d refused; %d audit lines in all over %v",
		calls1, refused1, calls2, refused2, len(lines), elapsed)
	if refused1 < 100 || refused2 < 100 {
		t.Fatalf("the floods were refused %d and %d times: too few to show anything", refused1, refused2)
	}

	var anonLines, strangerLines, newcomer, issuedLines int
	var anonCount, strangerCount int
	for _, l := range lines {
		switch {
		case l.Event == "token.issued":
			issuedLines++
		case l.Event != "token.denied":
		case l.Caller == "" && l.Peer == "127.0.0.1":
			anonLines++
			anonCount += max(l.Count, 1)
			if l.Outcome != "Unauthenticated" {
				t.Errorf("identity-less denial with outcome %q", l.Outcome)
			}
		case l.Caller == stranger:
			strangerLines++
			strangerCount += max(l.Count, 1)
		case strings.HasSuffix(l.Caller, "newcomer"):
			newcomer++
		}
	}
	// At most: the first line of each outcome, then one per window per outcome.
	maxLines := func(outcomes int) int { return outcomes * (2 + int(elapsed/window)) }
	if anonLines > maxLines(1) {
		t.Errorf("%d audit lines for %d identity-less calls, want at most %d", anonLines, refused1, maxLines(1))
	}
	if strangerLines > maxLines(2) {
		t.Errorf("%d audit lines for %d calls of a caller no credential allows, want at most %d", strangerLines, refused2, maxLines(2))
	}
	// The server refused more than the clients saw refused: calls in flight
	// on a connection sent GOAWAY for its rate end UNAVAILABLE on the client.
	noIdentity := h.metric(t, "tokenbroker_streams_refused_total", "reason=no_identity")
	denials := h.metric(t, "tokenbroker_audit_events_total", "event=token.denied")
	if float64(anonCount) != noIdentity || float64(anonCount+strangerCount+newcomer) != denials {
		t.Errorf("the audit counts %d identity-less denials and %d in all, the server refused %v and %v: aggregation must lose none",
			anonCount, anonCount+strangerCount+newcomer, noIdentity, denials)
	}
	if newcomer != 1 {
		t.Errorf("a new caller's first denial: %d lines, want 1", newcomer)
	}
	if issuedLines != issued {
		t.Errorf("%d token.issued lines for %d tokens issued, want one each", issuedLines, issued)
	}
	if got := h.metric(t, "tokenbroker_requests_total", "code=Unauthenticated"); got > 0 {
		t.Errorf("%v identity-less calls reached the interceptors, want none: refused before any per-call work", got)
	}
	if noIdentity < float64(refused1) {
		t.Errorf("tokenbroker_streams_refused_total{reason=no_identity} = %v, want at least the %d refusals the client saw", noIdentity, refused1)
	}
}
