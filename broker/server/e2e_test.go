package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

func TestGetTokenMintedByAuthorizationServer(t *testing.T) {
	h := newHarness(t, nil)
	tok, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatalf("GetToken: %v", err)
	}
	is, ok := h.as.Lookup(tok.GetAccessToken())
	if !ok {
		t.Fatalf("token was not issued by the authorization server")
	}
	if is.ClientID != "broker" || is.AuthMethod != "client_secret_post" || strings.Join(is.Scopes, " ") != "IDENTITY IDENTITY_READ" {
		t.Errorf("issued = %+v, want client broker, client_secret_post, scopes IDENTITY IDENTITY_READ", is)
	}
	if got, want := tok.GetFingerprint(), broker.Fingerprint(tok.GetAccessToken()); got != want || len(got) != 32 {
		t.Errorf("fingerprint = %q, want %q (32 hex digits)", got, want)
	}
	if tok.GetTokenType() != "Bearer" {
		t.Errorf("token_type = %q, want Bearer", tok.GetTokenType())
	}
	// The broker takes expiry_margin (10s) off the granted lifetime.
	if got, want := tok.GetExpireTime().AsTime(), h.clock.Now().Add(tokenTTL-10*time.Second); got.Sub(want).Abs() > time.Second {
		t.Errorf("expire_time = %v, want %v", got, want)
	}
	if got := h.as.TokenRequests(); got != 1 {
		t.Errorf("token requests = %d, want 1", got)
	}
	// A narrower scope set is a different cache entry and a separate grant.
	tok2, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}})
	if err != nil {
		t.Fatal(err)
	}
	if is, _ := h.as.Lookup(tok2.GetAccessToken()); strings.Join(is.Scopes, " ") != "IDENTITY" {
		t.Errorf("scoped token granted %v, want [IDENTITY]", is.Scopes)
	}
}

func TestStatusCodes(t *testing.T) {
	h := newHarness(t, nil)
	tests := []struct {
		name       string
		ids        []string
		req        *pb.GetTokenRequest
		expectCode codes.Code
		expectMsg  string
	}{
		{"allowed exact", []string{payments}, &pb.GetTokenRequest{Credential: "identity"}, codes.OK, ""},
		{"allowed prefix", []string{kycWork}, &pb.GetTokenRequest{Credential: "identity"}, codes.OK, ""},
		{"allowed dns", []string{"reporting.internal"}, &pb.GetTokenRequest{Credential: "identity"}, codes.OK, ""},
		{"prefix is segment bound", []string{kycx}, &pb.GetTokenRequest{Credential: "identity"},
			codes.PermissionDenied, `caller ` + kycx + ` may not use credential "identity"`},
		{"identity not allowed", []string{stranger}, &pb.GetTokenRequest{Credential: "identity"},
			codes.PermissionDenied, `caller ` + stranger + ` may not use credential "identity"`},
		{"unknown credential looks the same", []string{payments}, &pb.GetTokenRequest{Credential: "payments-api"},
			codes.PermissionDenied, `caller ` + payments + ` may not use credential "payments-api"`},
		{"two URI SANs", []string{payments, kycWork}, &pb.GetTokenRequest{Credential: "identity"},
			codes.Unauthenticated, "more than one URI SAN"},
		{"scope outside credential", []string{payments}, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY", "ADMIN"}},
			codes.PermissionDenied, `caller ` + payments + ` may not use scope "ADMIN" of credential "identity"`},
		{"empty credential", []string{payments}, &pb.GetTokenRequest{}, codes.InvalidArgument, "credential is required"},
		{"overlong credential", []string{payments}, &pb.GetTokenRequest{Credential: strings.Repeat("a", 129)},
			codes.InvalidArgument, "credential must be 1 to 128 characters"},
		{"bad characters", []string{payments}, &pb.GetTokenRequest{Credential: "id/../x"},
			codes.InvalidArgument, "credential must be 1 to 128 characters"},
		{"negative min_ttl", []string{payments}, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(-time.Second)},
			codes.InvalidArgument, "min_ttl must be between 0s and 24h, got -1s"},
		{"min_ttl over 24h", []string{payments}, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(25 * time.Hour)},
			codes.InvalidArgument, "min_ttl must be between 0s and 24h, got 25h0m0s"},
		{"min_ttl over granted lifetime", []string{payments}, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(2 * time.Hour)},
			codes.FailedPrecondition, `min_ttl 2h0m0s is longer than the 59m50s lifetime the authorization server grants for credential "identity"`},
		{"min_ttl within lifetime", []string{payments}, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(59 * time.Minute)},
			codes.OK, ""},
		{"restricted caller, its scope", []string{readOnly}, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}},
			codes.OK, ""},
		{"restricted caller, default scopes", []string{readOnly}, &pb.GetTokenRequest{Credential: "identity"}, codes.OK, ""},
		{"restricted caller, another scope", []string{readOnly}, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}},
			codes.PermissionDenied, `caller ` + readOnly + ` may not use scope "IDENTITY" of credential "identity"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := h.get(h.client(tt.ids...), tt.req)
			st := status.Convert(err)
			if st.Code() != tt.expectCode {
				t.Fatalf("code = %v (%q), want %v", st.Code(), st.Message(), tt.expectCode)
			}
			if !strings.Contains(st.Message(), tt.expectMsg) {
				t.Errorf("message = %q, want it to contain %q", st.Message(), tt.expectMsg)
			}
			if tt.expectCode == codes.OK && tok.GetAccessToken() == "" {
				t.Errorf("no access token returned")
			}
			if tt.ids[0] == readOnly && tt.expectCode == codes.OK && strings.Join(tok.GetScopes(), " ") != "IDENTITY_READ" {
				t.Errorf("restricted caller got scopes %v, want [IDENTITY_READ]", tok.GetScopes())
			}
		})
	}
}

func TestMinTTLBeyondLifetimeSparesTheBank(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(90 * time.Minute)})
		if status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("code = %v, want FailedPrecondition", status.Code(err))
		}
	}
	if got := h.as.TokenRequests(); got != 1 {
		t.Errorf("token requests = %d, want 1 (the lifetime is known from the cached token)", got)
	}
}

func TestUntrustedClientCertificateFailsHandshake(t *testing.T) {
	h := newHarness(t, nil)
	other, err := devpki.NewCA("another CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]pb.TokenBrokerClient{
		"other CA":       pb.NewTokenBrokerClient(h.conn(other, payments)),
		"no certificate": pb.NewTokenBrokerClient(h.conn(nil)),
	} {
		_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s: code = %v (%v), want Unavailable from a failed handshake", name, status.Code(err), err)
		}
	}
	if got := h.as.TokenRequests(); got != 0 {
		t.Errorf("token requests = %d, want 0", got)
	}
}

func TestConcurrentColdCacheFetchesOnce(t *testing.T) {
	h := newHarness(t, nil)
	// Latency keeps the fetch in flight while every caller arrives.
	h.as.SetFaults(oauthtest.Faults{Latency: 200 * time.Millisecond})
	clients := []pb.TokenBrokerClient{h.client(payments)}
	req := &pb.GetTokenRequest{Credential: "identity"}
	const callers = 256
	first := load(h, clients, callers, req)
	if len(first) != 1 || len(errorsIn(first)) > 0 {
		t.Fatalf("callers got %d distinct results (errors %v), want 1 token for all", len(first), errorsIn(first))
	}
	if got := h.as.TokenRequests(); got != 1 {
		t.Errorf("cold round: token requests = %d, want 1", got)
	}
	second := load(h, clients, callers, req)
	if len(second) != 1 || second[firstKey(first)] != callers {
		t.Errorf("warm round: %d distinct results, want the first token for all %d callers", len(second), callers)
	}
	if got := h.as.TokenRequests(); got != 1 {
		t.Errorf("warm round: token requests = %d, want still 1", got)
	}
}

func TestUpstreamFailures(t *testing.T) {
	tests := []struct {
		name       string
		faults     oauthtest.Faults
		expectCode codes.Code
		expectMsg  string
	}{
		{"500", oauthtest.Faults{Status: 500}, codes.Unavailable, "is failing (server_error)"},
		{"503", oauthtest.Faults{Status: 503, RetryAfter: "5"}, codes.Unavailable, "is failing (server_error)"},
		{"429", oauthtest.Faults{Status: 429, RetryAfter: "30"}, codes.Unavailable, "is failing (throttled)"},
		{"timeout", oauthtest.Faults{Latency: 3 * time.Second}, codes.Unavailable, "is failing (timeout)"},
		{"malformed JSON", oauthtest.Faults{Malformed: true}, codes.Unavailable, "is failing (malformed)"},
		{"no token_type", oauthtest.Faults{TokenType: "-"}, codes.Unavailable, "is failing (malformed)"},
		{"invalid_client", oauthtest.Faults{ErrorCode: "invalid_client"}, codes.FailedPrecondition, `refused credential "identity" (invalid_client)`},
		{"unauthorized_client", oauthtest.Faults{ErrorCode: "unauthorized_client"}, codes.FailedPrecondition, "(unauthorized_client)"},
		{"invalid_scope", oauthtest.Faults{ErrorCode: "invalid_scope"}, codes.FailedPrecondition, "(invalid_scope)"},
		{"invalid_request", oauthtest.Faults{ErrorCode: "invalid_request"}, codes.FailedPrecondition, "(invalid_request)"},
		{"unsupported_grant_type", oauthtest.Faults{ErrorCode: "unsupported_grant_type"}, codes.FailedPrecondition, "(unsupported_grant_type)"},
		{"granted less", oauthtest.Faults{GrantScopes: []string{"IDENTITY"}}, codes.FailedPrecondition, "granted fewer scopes than asked"},
		{"not bearer", oauthtest.Faults{TokenType: "mac"}, codes.FailedPrecondition, "issued a token that is not Bearer"},
		{"lowercase bearer", oauthtest.Faults{TokenType: "bearer"}, codes.OK, ""},
		{"form-encoded body", oauthtest.Faults{FormEncoded: true}, codes.OK, ""},
		{"no expires_in", oauthtest.Faults{OmitExpiresIn: true}, codes.OK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) { c.Credentials[0].Timeout = config.Duration(300 * time.Millisecond) })
			h.as.SetFaults(tt.faults)
			tok, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
			st := status.Convert(err)
			if st.Code() != tt.expectCode {
				t.Fatalf("code = %v (%q), want %v", st.Code(), st.Message(), tt.expectCode)
			}
			if !strings.Contains(st.Message(), tt.expectMsg) {
				t.Errorf("message = %q, want it to contain %q", st.Message(), tt.expectMsg)
			}
			// The upstream body (its error_description, its status text) never reaches the caller.
			for _, body := range []string{"fault injected", "client authentication failed", "Internal Server Error", "Too Many Requests", "truncated"} {
				if strings.Contains(st.Message(), body) {
					t.Errorf("message %q leaks the upstream body (%q)", st.Message(), body)
				}
			}
			if tt.name == "no expires_in" {
				if got, want := tok.GetExpireTime().AsTime(), h.clock.Now().Add(5*time.Minute-10*time.Second); got.Sub(want).Abs() > time.Second {
					t.Errorf("expire_time = %v, want default_ttl 5m less the 10s margin from now (%v)", got, want)
				}
			}
		})
	}
}

func TestServesCachedTokenWhileUpstreamFails(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	first, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	h.as.SetFaults(oauthtest.Faults{Status: 503})
	h.clock.Add(40 * time.Minute) // 20 minutes left on the cached token

	got, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(10 * time.Minute)})
	if err != nil {
		t.Fatalf("GetToken during outage with 20m left and min_ttl 10m: %v", err)
	}
	if got.GetFingerprint() != first.GetFingerprint() {
		t.Errorf("served a different token during the outage")
	}
	if n := h.as.TokenRequests(); n != 1 {
		t.Errorf("token requests = %d, want 1 (the cached token sufficed)", n)
	}
	// Asking for more than is left needs a fresh token, which cannot be had.
	_, err = h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(30 * time.Minute)})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "is failing (server_error) and no cached token has the min_ttl asked for left") {
		t.Errorf("GetToken with min_ttl above what is left = %v %q, want Unavailable naming min_ttl", st.Code(), st.Message())
	}
	// Past expiry the token is never served, even with min_ttl 0.
	h.clock.Add(21 * time.Minute)
	_, err = h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(0)})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("GetToken after expiry during outage = %v, want Unavailable", status.Code(err))
	}
	// Recovery: once the backoff has passed, the next call fetches a fresh token.
	h.as.SetFaults(oauthtest.Faults{})
	h.clock.Add(breakerWait)
	fresh, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil || fresh.GetFingerprint() == first.GetFingerprint() {
		t.Errorf("after recovery: err = %v, same token = %v; want a fresh token", err, fresh.GetFingerprint() == first.GetFingerprint())
	}
}

// breakerWait outlasts any backoff or breaker delay after a transient failure.
const breakerWait = 40 * time.Second

func TestSecretReadAtEachFetch(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}}); err != nil {
		t.Fatal(err)
	}
	// Rotate: the authorization server now knows only the new secret.
	rotated := h.secret + "-rotated"
	h.as.AddClient(oauthtest.Client{ID: "broker", Secret: rotated, Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
	_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("with the old secret on file: code = %v, want FailedPrecondition", status.Code(err))
	}
	h.write("secret", rotated)
	h.secret = rotated       // the log scan now looks for the new one too
	h.clock.Add(time.Minute) // a refused registration is probed once a minute
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}}); err != nil {
		t.Errorf("after writing the new secret to the file: %v", err)
	}
	// A secret file that disappears is the broker's own misconfiguration.
	if err := os.Remove(h.path("secret")); err != nil {
		t.Fatal(err)
	}
	h.clock.Add(2 * time.Hour) // every cached token has expired
	_, err = h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if st := status.Convert(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), `cannot use the client secret or key of credential "identity"`) {
		t.Errorf("with no secret file: %v %q, want FailedPrecondition naming the secret", st.Code(), st.Message())
	}
}

func TestListCredentials(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	resp, err := h.client(kycWork).ListCredentials(ctx, &pb.ListCredentialsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetCredentials()) != 1 || resp.GetCredentials()[0].GetName() != "identity" ||
		strings.Join(resp.GetCredentials()[0].GetScopes(), " ") != "IDENTITY IDENTITY_READ" {
		t.Errorf("ListCredentials = %v, want identity with IDENTITY IDENTITY_READ", resp.GetCredentials())
	}
	resp, err = h.client(readOnly).ListCredentials(ctx, &pb.ListCredentialsRequest{})
	if err != nil || len(resp.GetCredentials()) != 1 || strings.Join(resp.GetCredentials()[0].GetScopes(), " ") != "IDENTITY_READ" {
		t.Errorf("ListCredentials for a restricted caller = %v, %v; want identity with IDENTITY_READ", resp.GetCredentials(), err)
	}
	resp, err = h.client(stranger).ListCredentials(ctx, &pb.ListCredentialsRequest{})
	if err != nil || len(resp.GetCredentials()) != 0 {
		t.Errorf("ListCredentials for a stranger = %v, %v; want none", resp.GetCredentials(), err)
	}
}

func TestInvalidateToken(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	req := &pb.GetTokenRequest{Credential: "identity"}
	first, err := h.get(h.client(payments), req)
	if err != nil {
		t.Fatal(err)
	}

	// 100 callers report the same rejected token at once: one report drops it.
	const reporters = 100
	clients := make([]pb.TokenBrokerClient, reporters)
	for i := range clients {
		clients[i] = h.client(fmt.Sprintf("spiffe://bank.internal/ns/kyc/sa/worker-%d", i))
	}
	var dropped atomic.Int32
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() {
			resp, err := c.InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: first.GetFingerprint()})
			if err != nil {
				t.Errorf("InvalidateToken: %v", err)
				return
			}
			if resp.GetInvalidated() {
				dropped.Add(1)
			}
		})
	}
	wg.Wait()
	if n := dropped.Load(); n != 1 {
		t.Errorf("reports answered invalidated=true: %d, want 1", n)
	}
	// They all fetch again: exactly one request reaches the bank.
	got := load(h, clients, 1, req)
	if len(got) != 1 || firstKey(got) == first.GetFingerprint() {
		t.Errorf("after invalidation callers got %v, want one new token", got)
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2 (the first token and one replacement)", n)
	}

	// A stale report changes nothing and costs no fetch.
	resp, err := h.client(payments).InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: first.GetFingerprint()})
	if err != nil || resp.GetInvalidated() {
		t.Errorf("stale report = %v, %v; want invalidated=false", resp.GetInvalidated(), err)
	}
	if _, err := h.get(h.client(payments), req); err != nil || h.as.TokenRequests() != 2 {
		t.Errorf("after a stale report: %v, token requests %d; want 2", err, h.as.TokenRequests())
	}

	for _, tt := range []struct {
		req  *pb.InvalidateTokenRequest
		code codes.Code
	}{
		{&pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: "nothex"}, codes.InvalidArgument},
		{&pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: strings.ToUpper(first.GetFingerprint())}, codes.InvalidArgument},
		{&pb.InvalidateTokenRequest{Credential: "other", Fingerprint: first.GetFingerprint()}, codes.PermissionDenied},
	} {
		if _, err := h.client(payments).InvalidateToken(ctx, tt.req); status.Code(err) != tt.code {
			t.Errorf("InvalidateToken(%v) = %v, want %v", tt.req, err, tt.code)
		}
	}
}

func TestRateLimitedPerCaller(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.RateLimit = &config.RateLimit{RequestsPerSecond: 5, Burst: 5} })
	noisy, quiet := h.client(payments), h.client(kycWork)
	req := &pb.GetTokenRequest{Credential: "identity"}
	var limited int
	for range 20 {
		_, err := h.get(noisy, req)
		switch st := status.Convert(err); {
		case st.Code() == codes.ResourceExhausted && strings.Contains(st.Message(), "over its rate limit"):
			limited++
		case err != nil:
			t.Fatal(err)
		}
	}
	if limited < 10 {
		t.Errorf("20 quick calls at 5/s (burst 5): %d limited, want at least 10", limited)
	}
	if _, err := h.get(quiet, req); err != nil {
		t.Errorf("another caller was limited too: %v", err)
	}
	// ListCredentials shares the limit: a burst of them is limited too (a
	// loop rather than one call, which a loaded machine's refill may let by).
	listLimited := false
	for range 20 {
		if _, err := noisy.ListCredentials(context.Background(), &pb.ListCredentialsRequest{}); status.Code(err) == codes.ResourceExhausted {
			listLimited = true
			break
		}
	}
	if !listLimited {
		t.Error("20 quick ListCredentials at 5/s: none limited, want ResourceExhausted")
	}
}

func TestInvalidateRateLimitedPerCaller(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	noisy, quiet := h.client(payments), h.client(kycWork)
	stale := &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: strings.Repeat("0", 32)}
	var limited int
	for range 20 {
		if _, err := noisy.InvalidateToken(ctx, stale); status.Code(err) == codes.ResourceExhausted {
			limited++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if limited == 0 {
		t.Error("20 quick invalidations from one caller: none limited")
	}
	if _, err := quiet.InvalidateToken(ctx, stale); err != nil {
		t.Errorf("another caller was limited too: %v", err)
	}
}

func TestHealthAndAdmin(t *testing.T) {
	h := newHarness(t, nil)
	hc := healthpb.NewHealthClient(h.conn(nil, payments))
	for _, svc := range []string{"", "tokenbroker.v1.TokenBroker"} {
		resp, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("Health/Check(%q) = %v, %v; want SERVING", svc, resp.GetStatus(), err)
		}
	}
	base := "http://" + h.srv.AdminAddr().String()
	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/nope": 404} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, want)
		}
		if path == "/readyz" && body["status"] != "ready" {
			t.Errorf("/readyz body = %v, want status ready", body)
		}
	}
}

func TestReflectionOnlyWhenConfigured(t *testing.T) {
	for _, on := range []bool{true, false} {
		h := newHarness(t, func(c *config.Config) { c.Reflection = on })
		stream, err := reflectionpb.NewServerReflectionClient(h.conn(nil, payments)).ServerReflectionInfo(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		err = stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
		// io.EOF: the server already ended the stream (Unimplemented when
		// reflection is off); Recv returns the status.
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if !on {
			if status.Code(err) != codes.Unimplemented {
				t.Errorf("reflection: false: Recv = %v, want Unimplemented", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("reflection: true: %v", err)
		}
		var names []string
		for _, s := range resp.GetListServicesResponse().GetService() {
			names = append(names, s.GetName())
		}
		if !slices.Contains(names, "tokenbroker.v1.TokenBroker") || !slices.Contains(names, "grpc.health.v1.Health") {
			t.Errorf("reflection lists %v, want TokenBroker and Health", names)
		}
	}
}

func TestGracefulShutdown(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetFaults(oauthtest.Faults{Latency: 300 * time.Millisecond})
	c := h.client(payments)
	errc := make(chan error, 1)
	go func() {
		_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
		errc <- err
	}()
	// Wait until the call is in flight at the authorization server, then stop.
	deadline := time.Now().Add(5 * time.Second)
	for h.as.TokenRequests() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := h.stop(); err != nil {
		t.Errorf("Serve returned %v, want nil after a graceful stop", err)
	}
	if err := <-errc; err != nil {
		t.Errorf("in-flight call during shutdown: %v, want it to complete", err)
	}
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/readyz")
	if err == nil {
		resp.Body.Close()
		t.Errorf("admin still answering after shutdown: %d", resp.StatusCode)
	}
}

// TestSecretRotationWithTwoFiles: during a rotation the broker holds [new, old].
// Before the bank accepts the new secret the old one works; after, the new one
// does; no GetToken fails in either phase.
func TestSecretRotationWithTwoFiles(t *testing.T) {
	var newFile string
	h := newHarness(t, func(c *config.Config) {
		newFile = filepath.Join(filepath.Dir(c.Credentials[0].ClientSecretFile), "secret-new")
		c.Credentials[0].ClientSecretFiles = []string{newFile, c.Credentials[0].ClientSecretFile}
		c.Credentials[0].ClientSecretFile = ""
	})
	newSecret := h.secret + "-new"
	h.write("secret-new", newSecret)
	c := h.client(payments)

	// Phase 1: the bank knows only the old secret.
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}}); err != nil {
		t.Fatalf("phase 1: %v", err)
	}
	if got := h.metric(t, "tokenbroker_client_secret_used_total", "credential=identity", "secret=1"); got != 1 {
		t.Errorf("phase 1: old-secret uses = %v, want 1", got)
	}
	if !strings.Contains(h.logs.String(), "an older client secret worked") {
		t.Error("phase 1: no log line saying the old secret worked")
	}

	// Phase 2: the bank switches to the new secret.
	h.as.AddClient(oauthtest.Client{ID: "broker", Secret: newSecret, Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}}); err != nil {
		t.Fatalf("phase 2: %v", err)
	}
	if got := h.metric(t, "tokenbroker_client_secret_used_total", "credential=identity", "secret=0"); got != 1 {
		t.Errorf("phase 2: new-secret uses = %v, want 1", got)
	}
	if strings.Contains(h.logs.String()+h.audit.String(), newSecret) {
		t.Error("the new secret appears in the logs")
	}
}

// TestReadyzFailsWhenThisProcessCannotServe: /readyz turns 503 as soon as the
// server drains (while an in-flight call still holds it open), and a gRPC
// listener that fails stops the server with an error, admin endpoint included.
func TestReadyzFailsWhenThisProcessCannotServe(t *testing.T) {
	h := newHarness(t, nil)
	readyz := func(srv *Server) (int, string, error) {
		resp, err := http.Get("http://" + srv.AdminAddr().String() + "/readyz")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), nil
	}

	// Draining: an in-flight call keeps the server up; readiness is already gone.
	srv, stop := h.startBroker()
	if code, _, err := readyz(srv); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz before draining = %d, %v; want 200", code, err)
	}
	h.as.SetFaults(oauthtest.Faults{Latency: time.Second})
	errc := make(chan error, 1)
	go func() {
		_, err := h.get(pb.NewTokenBrokerClient(h.connTo(srv, nil, payments)), &pb.GetTokenRequest{Credential: "identity"})
		errc <- err
	}()
	for deadline := time.Now().Add(5 * time.Second); h.as.TokenRequests() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the call never reached the token endpoint")
		}
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	var code int
	var body string
	for deadline := time.Now().Add(5 * time.Second); code != http.StatusServiceUnavailable; time.Sleep(5 * time.Millisecond) {
		var err error
		if code, body, err = readyz(srv); err != nil || time.Now().After(deadline) {
			t.Fatalf("/readyz while draining = %d %s, %v; want 503 before the admin server closes", code, body, err)
		}
	}
	if !strings.Contains(body, `"grpc_listener":"not serving"`) {
		t.Errorf("/readyz body while draining = %s, want grpc_listener not serving", body)
	}
	if err := <-errc; err != nil {
		t.Errorf("in-flight call: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("graceful stop: %v", err)
	}

	// The gRPC listener fails: Serve returns the error and the admin endpoint goes too.
	srv, stop = h.startBroker()
	if err := srv.grpcLn.Close(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, _, err := readyz(srv); err != nil {
			break // the admin endpoint is gone: the probe fails
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz still answers 5s after the gRPC listener failed")
		}
	}
	if err := stop(); err == nil || !strings.Contains(err.Error(), "serve:") {
		t.Errorf("Serve after its listener failed = %v, want a serve error", err)
	}
}
