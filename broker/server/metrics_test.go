package server

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// metric returns the value of the sample of name whose labels include every
// label given as "key=value", or -1 when there is none.
func (h *harness) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return metricAt(t, h.srv, name, labels...)
}

func TestMetricsMatchTheCalls(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	fetched := h.clock.Now()
	for range 3 {
		if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
			t.Fatal(err)
		}
	}
	_, _ = h.get(h.client(stranger), &pb.GetTokenRequest{Credential: "identity"})

	for _, m := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tokenbroker_token_source_total", []string{"source=upstream"}, 1},
		{"tokenbroker_token_source_total", []string{"source=memory"}, 2},
		{"tokenbroker_tokens_issued_total", []string{"credential=identity"}, 3},
		{"tokenbroker_upstream_requests_total", []string{"credential=identity", "outcome=ok"}, 1},
		{"tokenbroker_requests_total", []string{"method=tokenbroker.v1.TokenBroker/GetToken", "code=OK"}, 3},
		{"tokenbroker_requests_total", []string{"method=tokenbroker.v1.TokenBroker/GetToken", "code=PermissionDenied"}, 1},
		{"tokenbroker_credentials", []string{"state=ok"}, 1},
		{"tokenbroker_credentials", []string{"state=failing"}, 0},
		{"tokenbroker_credential_healthy", []string{"credential=identity"}, -1},                        // ok: no series of its own
		{"tokenbroker_credential_last_success_timestamp_seconds", []string{"credential=identity"}, -1}, // the same
		{"tokenbroker_token_expiry_seconds", []string{"credential=identity"}, -1},                      // not overdue for refresh
		{"tokenbroker_upstream_duration_seconds_count", []string{"endpoint=" + strings.Split(h.as.TokenURL(), "/")[2]}, 1},
		{"tokenbroker_audit_events_total", []string{"event=token.issued"}, 3},
		{"tokenbroker_audit_events_total", []string{"event=token.denied"}, 1},
		{"tokenbroker_audit_events_total", []string{"event=upstream.fetch"}, 1},
		{"tokenbroker_audit_events_total", []string{"event=token.invalidated"}, 0}, // present from the start, at zero
		{"tokenbroker_store_errors_total", []string{"op=get"}, 0},                  // present from the start, at zero
		{"tokenbroker_lock_wait_seconds_count", nil, 0},
		{"grpc_server_handled_total", []string{"grpc_method=GetToken", "grpc_code=OK"}, 3},
		{"grpc_server_handled_total", []string{"grpc_method=GetToken", "grpc_code=PermissionDenied"}, 1},
		{"grpc_server_handling_seconds_count", []string{"grpc_method=GetToken"}, 4},
		{"grpc_server_handled_total", []string{"grpc_method=InvalidateToken", "grpc_code=OK"}, 0},
	} {
		if got := h.metric(t, m.name, m.labels...); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
	// The bank refuses the registration: counted by outcome, and the credential turns unhealthy.
	h.as.SetFaults(oauthtest.Faults{ErrorCode: "invalid_client"})
	_, _ = h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}, MinTtl: durationpb.New(time.Minute)})
	if got := h.metric(t, "tokenbroker_upstream_requests_total", "credential=identity", "outcome=rejected"); got != 1 {
		t.Errorf("rejected upstream requests = %v, want 1", got)
	}
	if got := h.metric(t, "tokenbroker_credential_healthy", "credential=identity"); got != 0 {
		t.Errorf("tokenbroker_credential_healthy after invalid_client = %v, want 0", got)
	}
	if got, want := h.metric(t, "tokenbroker_credential_last_success_timestamp_seconds", "credential=identity"), float64(fetched.UnixNano())/1e9; got < want-1 || got > want+1 {
		t.Errorf("last success of the refused credential = %v, want its fetch's time %v", got, want)
	}
	if got := h.metric(t, "tokenbroker_credentials", "state=refused"); got != 1 {
		t.Errorf("tokenbroker_credentials{state=refused} = %v, want 1", got)
	}
	if got := h.metric(t, "go_goroutines"); got <= 0 {
		t.Errorf("Go runtime metrics missing")
	}
}

// TestTokenExpiryOnlyWhenOverdue: tokenbroker_token_expiry_seconds has a
// series for a credential only while a token callers ask for is past the
// point by which its refresh should have succeeded — what the alert
// TokenbrokerTokenNearExpiry reads — not for every cached token (issue 27:
// ten thousand credentials made ten thousand series that said nothing).
func TestTokenExpiryOnlyWhenOverdue(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	if v := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); v != -1 {
		t.Fatalf("expiry series %v for a token just fetched", v)
	}
	h.overdueToken(t, c, "identity", tok)
	if left := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); left < 29 || left > 31 {
		t.Fatalf("tokenbroker_token_expiry_seconds = %v for a token in use 30s before expiry, want 30", left)
	}

	// Nobody asks for it any more: an idle token runs down harmlessly.
	h.clock.Add(20 * time.Second)
	if v := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); v < 9 || v > 11 {
		t.Fatalf("expiry series %v 20s later, within the idle timeout: want 10", v)
	}
	h.clock.Add(h.cfg.Credentials[0].IdleTimeout.D())
	if v := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); v != -1 {
		t.Errorf("expiry series %v for a token nobody asked for within the idle timeout", v)
	}

	// The bank answers again and a caller gets a fresh token: the series goes.
	h.as.SetFaults(oauthtest.Faults{})
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	if v := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); v != -1 {
		t.Errorf("expiry series %v after a fresh token", v)
	}
}

// overdueToken makes tok, the cached token of credential cred, overdue for
// refresh: the bank fails every token request from now on (503), the clock
// moves to 30s before the token's expiry (the tests run no refresher, and a
// refresh would fail anyway), and a caller asks for it with a min_ttl of 1s,
// so it is in use.
func (h *harness) overdueToken(t *testing.T, c pb.TokenBrokerClient, cred string, tok *pb.Token) {
	t.Helper()
	h.as.SetFaults(oauthtest.Faults{Status: http.StatusServiceUnavailable})
	h.clock.Add(tok.GetExpireTime().AsTime().Sub(h.clock.Now()) - 30*time.Second)
	again, err := h.get(c, &pb.GetTokenRequest{Credential: cred, MinTtl: durationpb.New(time.Second)})
	if err != nil || again.GetFingerprint() != tok.GetFingerprint() {
		t.Fatalf("the cached token was not served again: %v, %v", again, err)
	}
}

func TestPprofOnlyWhenEnabled(t *testing.T) {
	for _, on := range []bool{false, true} {
		h := newHarness(t, func(c *config.Config) { c.Pprof = on })
		resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/debug/pprof/goroutine?debug=1")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		want := http.StatusNotFound
		if on {
			want = http.StatusOK
		}
		if resp.StatusCode != want {
			t.Errorf("pprof: %v: status %d, want %d", on, resp.StatusCode, want)
		}
		if on && !strings.Contains(string(body), "goroutine profile") {
			t.Errorf("pprof on: body is not a goroutine profile: %.100s", body)
		}
	}
}
