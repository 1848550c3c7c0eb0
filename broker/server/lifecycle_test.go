package server

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

func TestRetryAfterIsHonoured(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	req := &pb.GetTokenRequest{Credential: "identity"}
	h.as.SetFaults(oauthtest.Faults{Status: 429, RetryAfter: "30"})
	if _, err := h.get(c, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("429: %v, want Unavailable", err)
	}
	h.as.SetFaults(oauthtest.Faults{})
	for range 29 {
		h.clock.Add(time.Second)
		// Callers that cannot wait for the next attempt (it is at least 1s
		// away) are told when it is.
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		_, err := c.GetToken(ctx, req)
		cancel()
		if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "next attempt in") {
			t.Fatalf("within Retry-After: %v %q, want Unavailable saying when the next attempt is", st.Code(), st.Message())
		}
	}
	if n := h.as.TokenRequests(); n != 1 {
		t.Fatalf("token requests within 30s of Retry-After: 30 = %d, want 1", n)
	}
	h.clock.Add(2 * time.Second)
	if _, err := h.get(c, req); err != nil {
		t.Errorf("after Retry-After: %v", err)
	}
}

func TestOutageCostsATrickle(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetExpiresIn(5 * time.Minute)
	c := h.client(payments)
	req := &pb.GetTokenRequest{Credential: "identity"} // default min_ttl 30s
	first, err := h.get(c, req)
	if err != nil {
		t.Fatal(err)
	}
	h.as.SetFaults(oauthtest.Faults{Status: 503})
	start := h.as.TokenRequests()

	// A caller every second for ten minutes of outage.
	var served, unavailable, late int
	for i := range 600 {
		h.clock.Add(time.Second)
		tok, err := h.getWithin(c, req, 50*time.Millisecond)
		switch {
		case err == nil:
			served++
			if tok.GetFingerprint() != first.GetFingerprint() {
				t.Fatal("a new token during the outage")
			}
			if left := tok.GetExpireTime().AsTime().Sub(h.clock.Now()); left < 30*time.Second {
				t.Fatalf("second %d: served a token with %v left, below min_ttl 30s", i, left)
			}
		case status.Code(err) == codes.Unavailable:
			unavailable++
			if strings.Contains(status.Convert(err).Message(), "Service Unavailable") {
				t.Fatal("the upstream body reached the caller")
			}
		case status.Code(err) == codes.DeadlineExceeded:
			late++ // the 50ms deadline on a loaded machine (CI runs packages in parallel)
		default:
			t.Fatalf("second %d: %v, want a token or Unavailable", i, err)
		}
	}
	if late > 600/20 {
		t.Errorf("%d of 600 calls ran past their 50ms deadline, want at most 5%%", late)
	}
	// Served while the token had 30s left: 5m - 10s margin - 30s = 260 calls.
	if served > 260 || served+late < 259 {
		t.Errorf("served %d calls from the cached token, want 260 (until it fell below min_ttl)", served)
	}
	// Bound: nothing while the cached token serves (nobody waits), then,
	// with a caller waiting every second, one attempt per >= 4s
	// (retry.max_backoff_with_waiters, 5s less up to a fifth of jitter).
	attempts := h.as.TokenRequests() - start
	bound := int64((600-259)/4 + 1)
	if attempts > bound || attempts < 3 {
		t.Errorf("attempts during a 10-minute outage = %d, want between 3 and %d", attempts, bound)
	}
	t.Logf("outage: served %d, unavailable %d, upstream attempts %d (bound %d)", served, unavailable, attempts, bound)

	h.as.SetFaults(oauthtest.Faults{})
	h.clock.Add(breakerWait)
	if _, err := h.get(c, req); err != nil {
		t.Errorf("after recovery: %v", err)
	}
}

func TestRefusedRegistrationIsProbedAndShown(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	req := &pb.GetTokenRequest{Credential: "identity"}
	h.as.SetFaults(oauthtest.Faults{ErrorCode: "invalid_client"})
	for range 120 { // two minutes of callers, one a second
		if _, err := h.get(c, req); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("with invalid_client: %v, want FailedPrecondition", err)
		}
		h.clock.Add(time.Second)
	}
	if n := h.as.TokenRequests(); n != 2 {
		t.Errorf("attempts in two minutes of invalid_client = %d, want 2 (one probe a minute)", n)
	}
	code, body := h.readyz(t)
	cred, _ := body.Credentials["identity"].(map[string]any)
	if code != http.StatusOK || cred["state"] != "refused" || cred["reason"] != "invalid_client" {
		t.Errorf("/readyz = %d %v, want 200 with identity refused (invalid_client)", code, body.Credentials)
	}

	h.as.SetFaults(oauthtest.Faults{})
	h.clock.Add(time.Minute)
	if _, err := h.get(c, req); err != nil {
		t.Fatalf("after the registration is fixed: %v", err)
	}
	if _, body := h.readyz(t); body.Credentials["identity"].(map[string]any)["state"] != "ok" {
		t.Errorf("/readyz after recovery = %v, want identity ok", body.Credentials)
	}
}

func TestMinTTLAboveRemainingDuringOutage(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(payments)
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	h.as.SetFaults(oauthtest.Faults{Status: 500})
	h.clock.Add(50 * time.Minute)
	_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", MinTtl: durationpb.New(15 * time.Minute)})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "is failing (server_error)") {
		t.Errorf("min_ttl above what is left, upstream failing: %v %q", st.Code(), st.Message())
	}
}
