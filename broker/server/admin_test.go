package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

const operator = "spiffe://bank.internal/ns/platform/sa/operator"

// TestAdminDescribeCredentials: the inventory is served over mutual TLS to
// admin.callers only, follows reloads of that list, and shows the bank's
// error_description to operators.
func TestAdminDescribeCredentials(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Admin.Callers = []string{operator} })
	if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	admin := pb.NewAdminClient(h.conn(nil, operator))
	resp, err := admin.DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{})
	if err != nil {
		t.Fatalf("DescribeCredentials as an admin caller: %v", err)
	}
	if len(resp.GetCredentials()) != 1 {
		t.Fatalf("got %d credentials, want 1", len(resp.GetCredentials()))
	}
	d := resp.GetCredentials()[0]
	if d.GetName() != "identity" || d.GetClientId() != "broker" || d.GetTokenUrl() != h.as.TokenURL() ||
		len(d.GetAllowedCallers()) != 4 || len(d.GetCachedTokens()) != 1 || d.GetUpstream().GetState() != "ok" ||
		d.GetTokensIssued() != 1 || len(d.GetRecentCallers()) != 1 || d.GetRecentCallers()[0].GetCaller() != payments {
		t.Errorf("description = %v", d)
	}
	if _, err := admin.DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{Name: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("an unknown name: %v, want NOT_FOUND", err)
	}

	// A token caller is not an admin caller.
	if _, err := pb.NewAdminClient(h.conn(nil, payments)).DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("DescribeCredentials as a token caller: %v, want PERMISSION_DENIED", err)
	}

	// The bank's words reach the operator, never the caller.
	const why = "client secret expired on 2026-11-01; rotate it in the developer portal"
	h.as.SetFaults(oauthtest.Faults{ErrorCode: "invalid_client", ErrorDescription: why})
	h.srv.broker.EvictLocal()
	h.clock.Add(tokenTTL)
	_, err = h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if status.Code(err) != codes.FailedPrecondition || strings.Contains(status.Convert(err).Message(), "expired") {
		t.Errorf("GetToken while the bank refuses: %v; want FAILED_PRECONDITION without the bank's description", err)
	}
	resp, err = admin.DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{Name: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	if up := resp.GetCredentials()[0].GetUpstream(); up.GetState() != "refused" || up.GetReason() != "invalid_client" || up.GetDescription() != why {
		t.Errorf("upstream state = %v, want refused, invalid_client and the bank's description", up)
	}
	if _, body := h.readyz(t); !strings.Contains(func() string { b, _ := json.Marshal(body.Credentials); return string(b) }(), why) {
		t.Errorf("/readyz credentials = %v, want the bank's description", body.Credentials)
	}
	if !strings.Contains(h.logs.String(), `"oauth_error_description":"`+why+`"`) {
		t.Error("the log line of the refused fetch lacks the bank's description")
	}

	// Reloading admin.callers takes effect at once.
	next := *h.cfg
	next.Admin.Callers = nil
	if err := h.srv.Reload(&next); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("after removing the operator from admin.callers: %v, want PERMISSION_DENIED", err)
	}
}

// TestHostileErrorDescription: what a token endpoint puts in
// error_description reaches operators only when it is made of the
// characters RFC 6749 §5.2 allows, and at most 200 of them.
func TestHostileErrorDescription(t *testing.T) {
	for _, tt := range []struct {
		name, sent, want string
	}{
		{"control characters", "ok\n{\"level\":\"fatal\"}", ""},
		{"a quote", `say "hi"`, ""},
		{"non-ASCII", "clé expirée", ""},
		{"overlong", strings.Repeat("x", 1000), strings.Repeat("x", 200)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) { c.Admin.Callers = []string{operator} })
			h.as.SetFaults(oauthtest.Faults{ErrorCode: "invalid_client", ErrorDescription: tt.sent})
			if _, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"}); status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("GetToken: %v, want FAILED_PRECONDITION", err)
			}
			resp, err := pb.NewAdminClient(h.conn(nil, operator)).DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetCredentials()[0].GetUpstream().GetDescription(); got != tt.want {
				t.Errorf("description = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestInventoryOnlyOnLoopbackAdmin: GET /credentials answers on a loopback
// admin address only; on any other the admin port keeps metrics and probes.
func TestInventoryOnlyOnLoopbackAdmin(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.AdminAddr = "0.0.0.0:0" })
	_, port, _ := strings.Cut(h.srv.AdminAddr().String(), "]:")
	if port == "" {
		_, port, _ = strings.Cut(h.srv.AdminAddr().String(), ":")
	}
	get := func(path string) (int, string) {
		resp, err := http.Get("http://127.0.0.1:" + port + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/credentials"); code != http.StatusNotFound || strings.Contains(body, "client_id") || !strings.Contains(body, "tokenctl inventory") {
		t.Errorf("GET /credentials on 0.0.0.0 = %d %q, want 404 pointing at tokenctl inventory and no inventory", code, body)
	}
	for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
		if code, _ := get(path); code != http.StatusOK {
			t.Errorf("GET %s = %d, want 200", path, code)
		}
	}
	if got := inventoryOverHTTP("[::1]:9090"); !got {
		t.Error("[::1] is loopback")
	}
	if got := inventoryOverHTTP("10.0.0.1:9090"); got {
		t.Error("10.0.0.1 is not loopback")
	}
}
