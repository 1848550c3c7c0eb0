package server

import (
	"bufio"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// metric returns the value of the sample of name whose labels include every
// label given as "key=value", or -1 when there is none.
func (h *harness) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			if !strings.Contains(line, k+`="`+v+`"`) {
				match = false
			}
		}
		if match {
			f, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			if err != nil {
				t.Fatalf("bad sample %q", line)
			}
			return f
		}
	}
	return -1
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
		{"tokenbroker_upstream_duration_seconds_count", []string{"credential=identity"}, 1},
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
