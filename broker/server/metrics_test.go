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
		{"tokenbroker_token_source_total", []string{"credential=identity", "source=upstream"}, 1},
		{"tokenbroker_token_source_total", []string{"credential=identity", "source=memory"}, 2},
		{"tokenbroker_upstream_requests_total", []string{"credential=identity", "outcome=ok"}, 1},
		{"tokenbroker_requests_total", []string{"method=tokenbroker.v1.TokenBroker/GetToken", "code=OK"}, 3},
		{"tokenbroker_requests_total", []string{"method=tokenbroker.v1.TokenBroker/GetToken", "code=PermissionDenied"}, 1},
		{"tokenbroker_credential_healthy", []string{"credential=identity"}, 1},
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
	if left := h.metric(t, "tokenbroker_token_expiry_seconds", "credential=identity"); left < 3580 || left > 3590 {
		t.Errorf("tokenbroker_token_expiry_seconds = %v, want about 3590 (1h less the 10s margin)", left)
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
	if got := h.metric(t, "go_goroutines"); got <= 0 {
		t.Errorf("Go runtime metrics missing")
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
