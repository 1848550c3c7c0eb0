package server

import (
	"bufio"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

type auditLine struct {
	Time        string   `json:"time"`
	Event       string   `json:"event"`
	RequestID   string   `json:"request_id"`
	Caller      string   `json:"caller"`
	Credential  string   `json:"credential"`
	Scopes      []string `json:"scopes"`
	Source      string   `json:"source"`
	Fingerprint string   `json:"fingerprint"`
	ExpireTime  string   `json:"expire_time"`
	Outcome     string   `json:"outcome"`
	Reason      string   `json:"reason"`
	Peer        string   `json:"peer"`
	Count       int      `json:"count"`
}

func auditLines(t *testing.T, raw string) []auditLine {
	t.Helper()
	var out []auditLine
	sc := bufio.NewScanner(strings.NewReader(raw))
	for sc.Scan() {
		var l auditLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("audit line is not JSON: %q", sc.Text())
		}
		out = append(out, l)
	}
	return out
}

func TestAuditTrail(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-request-id", "req-42")
	first, err := c.GetToken(ctx, &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatal(err)
	}
	fp := first.GetToken().GetFingerprint()
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	_, _ = h.get(h.client(stranger), &pb.GetTokenRequest{Credential: "identity"})
	if _, err := c.InvalidateToken(context.Background(), &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: strings.Repeat("0", 32)}); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	h.tokens[first.GetToken().GetAccessToken()] = true // fetched past h.get: scan for it too
	h.mu.Unlock()
	if err := h.stop(); err != nil { // flushes the buffered trail
		t.Fatal(err)
	}

	got := auditLines(t, h.audit.String())
	want := []auditLine{
		{Event: "upstream.fetch", Credential: "identity", Source: "upstream", Fingerprint: fp, Outcome: "ok"},
		{Event: "token.issued", RequestID: "req-42", Caller: payments, Credential: "identity", Source: "upstream", Fingerprint: fp, Outcome: "ok"},
		{Event: "token.issued", Caller: payments, Credential: "identity", Source: "memory", Fingerprint: fp, Outcome: "ok"},
		{Event: "token.denied", Caller: stranger, Credential: "identity", Outcome: "PermissionDenied"},
		{Event: "token.invalidated", Caller: payments, Credential: "identity", Fingerprint: strings.Repeat("0", 32), Outcome: "not_current"},
	}
	if len(got) != len(want) {
		t.Fatalf("audit trail has %d events, want %d:\n%s", len(got), len(want), h.audit.String())
	}
	for i, w := range want {
		g := got[i]
		if g.Event != w.Event || g.Caller != w.Caller || g.Credential != w.Credential || g.Source != w.Source ||
			g.Fingerprint != w.Fingerprint || g.Outcome != w.Outcome || (w.RequestID != "" && g.RequestID != w.RequestID) {
			t.Errorf("event %d = %+v, want %+v", i, g, w)
		}
		if g.Time == "" || (g.Event != "upstream.fetch" && g.RequestID == "") {
			t.Errorf("event %d lacks time or request_id: %+v", i, g)
		}
		if g.Event == "token.issued" && (g.ExpireTime == "" || strings.Join(g.Scopes, " ") != "IDENTITY IDENTITY_READ") {
			t.Errorf("issued event %d lacks expire_time or scopes: %+v", i, g)
		}
	}
	if !strings.Contains(got[3].Reason, "may not use credential") {
		t.Errorf("denied reason = %q", got[3].Reason)
	}
}

func TestAuditFailClosed(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Audit = config.Audit{Path: "/dev/full", FailClosed: true} // every write fails (ENOSPC)
	})
	tok, err := h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "audit trail cannot be written") || tok != nil {
		t.Errorf("GetToken with an unwritable fail-closed audit trail = %v %q (token %v), want Unavailable and no token", st.Code(), st.Message(), tok != nil)
	}
}
