package grpcapi

import (
	"context"
	"encoding/json"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store"
)

func TestResponsesReuseOnlyTheSameEntry(t *testing.T) {
	r := newResponses()
	exp := time.Date(2026, 11, 24, 12, 0, 0, 500, time.UTC)
	a := &store.Entry{AccessToken: "tok-a", TokenType: "Bearer", Scopes: []string{"IDENTITY"}, Expiry: exp, Fingerprint: "fp-a"}
	first := r.get(a)
	if r.get(a) != first {
		t.Error("a second hit on the same entry built a new message")
	}
	tok := first.GetToken()
	if tok.GetAccessToken() != "tok-a" || tok.GetTokenType() != "Bearer" || tok.GetFingerprint() != "fp-a" ||
		!tok.GetExpireTime().AsTime().Equal(exp) || strings.Join(tok.GetScopes(), " ") != "IDENTITY" {
		t.Errorf("message = %v, want entry a", tok)
	}
	// The same token read again from the store is another entry: its own message.
	again := *a
	if m := r.get(&again); m == first || m.GetToken().GetAccessToken() != "tok-a" {
		t.Errorf("a copy of the entry got %p (first %p), token %q", m, first, m.GetToken().GetAccessToken())
	}
	// Entries that share a place in the table take turns; each gets its own token.
	entries := make([]*store.Entry, 3*len(r.slots))
	for i := range entries {
		entries[i] = &store.Entry{AccessToken: "tok-" + strconv.Itoa(i), Fingerprint: "fp-" + strconv.Itoa(i), Expiry: exp}
	}
	for round := range 2 {
		for i, e := range entries {
			if got := r.get(e).GetToken().GetAccessToken(); got != e.AccessToken {
				t.Fatalf("round %d, entry %d: token %q, want %q", round, i, got, e.AccessToken)
			}
		}
	}
}

func TestRequestID(t *testing.T) {
	madeUp := regexp.MustCompile(`^[0-9a-f]{16}$`)
	with := func(v string) context.Context {
		return metadata.NewIncomingContext(context.Background(), metadata.Pairs(RequestIDHeader, v))
	}
	if got := requestID(with("req-42")); got != "req-42" {
		t.Errorf("the caller's ID: got %q", got)
	}
	seen := map[string]bool{}
	for _, ctx := range []context.Context{context.Background(), with(""), with(strings.Repeat("x", 129))} {
		id := requestID(ctx)
		if !madeUp.MatchString(id) || seen[id] {
			t.Errorf("made-up ID %q: want 16 hex digits, unique (seen %v)", id, seen)
		}
		seen[id] = true
	}
	// GetToken builds the ID in an array on its stack; the audit record must
	// still get the ID of its own call.
	var a, b [16]byte
	makeRequestID(&a)
	makeRequestID(&b)
	if a == b || !madeUp.Match(a[:]) {
		t.Errorf("makeRequestID gave %q and %q", a, b)
	}
}

func TestGetTokenAuditsEachCallsOwnID(t *testing.T) {
	svc, trail, path := newTestService(t)
	caller := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: &callerInfo{id: "spiffe://bank.internal/ns/kyc/sa/onboarding"}})
	req := &pb.GetTokenRequest{Credential: "identity"}
	for _, ctx := range []context.Context{caller, caller, metadata.NewIncomingContext(caller, metadata.Pairs(RequestIDHeader, "req-7")), caller} {
		if _, err := svc.GetToken(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	if err := trail.Close(); err != nil { // flushes
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for line := range strings.Lines(string(raw)) {
		var e struct {
			Event     string `json:"event"`
			RequestID string `json:"request_id"`
		}
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		if e.Event == audit.TokenIssued {
			ids = append(ids, e.RequestID)
		}
	}
	madeUp := regexp.MustCompile(`^[0-9a-f]{16}$`)
	if len(ids) != 4 || ids[2] != "req-7" || !madeUp.MatchString(ids[0]) || !madeUp.MatchString(ids[1]) || !madeUp.MatchString(ids[3]) ||
		ids[0] == ids[1] || ids[1] == ids[3] || ids[0] == ids[3] {
		t.Errorf("request IDs of the issued events = %q, want three distinct made-up IDs and req-7 third", ids)
	}
}
