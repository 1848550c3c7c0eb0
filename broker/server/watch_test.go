package server

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// watch opens a WatchToken stream and delivers its messages on a channel.
func watch(t *testing.T, c pb.TokenBrokerClient, req *pb.WatchTokenRequest) (<-chan *pb.Token, <-chan error, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := c.WatchToken(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	toks, errs := make(chan *pb.Token, 16), make(chan error, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				errs <- err
				return
			}
			toks <- resp.GetToken()
		}
	}()
	t.Cleanup(cancel)
	return toks, errs, cancel
}

func recvToken(t *testing.T, toks <-chan *pb.Token, errs <-chan error) *pb.Token {
	t.Helper()
	select {
	case tok := <-toks:
		return tok
	case err := <-errs:
		t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no token on the stream within 10s")
	}
	return nil
}

// TestWatchReceivesEveryRotation: over a simulated hour of 5-minute tokens, the
// watcher gets each replacement, each while the previous one still has the
// stream's min_ttl left.
func TestWatchReceivesEveryRotation(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetExpiresIn(5 * time.Minute)
	const minTTL = time.Minute
	toks, errs, _ := watch(t, h.client(payments), &pb.WatchTokenRequest{Credential: "identity", MinTtl: durationpb.New(minTTL)})
	prev := recvToken(t, toks, errs)
	if _, ok := h.as.Lookup(prev.GetAccessToken()); !ok {
		t.Fatal("the first token was not minted by the authorization server")
	}
	ctx := context.Background()
	rotations := 0
	for range 60 * 60 {
		h.clock.Add(time.Second)
		before := h.as.TokenRequests()
		h.srv.broker.RefreshDue(ctx)
		if h.as.TokenRequests() == before {
			continue
		}
		next := recvToken(t, toks, errs)
		if next.GetFingerprint() == prev.GetFingerprint() {
			t.Fatal("the stream sent the same token again")
		}
		if left := prev.GetExpireTime().AsTime().Sub(h.clock.Now()); left < minTTL {
			t.Fatalf("rotation %d arrived when the previous token had %v left, below min_ttl %v", rotations+1, left, minTTL)
		}
		prev = next
		rotations++
	}
	// One rotation per 150-210s of a 300s token: 17 to 24 in an hour.
	if rotations < 17 || rotations > 24 {
		t.Errorf("rotations in an hour = %d, want 17 to 24", rotations)
	}
	select {
	case tok := <-toks:
		t.Errorf("an extra token on the stream: %s", tok.GetFingerprint())
	default:
	}
}

// TestWatchSurvivesBlip: a failed refresh does not end the stream; the next
// successful one reaches it.
func TestWatchSurvivesBlip(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetExpiresIn(5 * time.Minute)
	toks, errs, _ := watch(t, h.client(payments), &pb.WatchTokenRequest{Credential: "identity"})
	first := recvToken(t, toks, errs)
	h.as.SetFaults(oauthtest.Faults{Status: 503})
	h.clock.Add(4 * time.Minute) // past every jittered refresh point
	h.srv.broker.RefreshDue(context.Background())
	select {
	case err := <-errs:
		t.Fatalf("the stream ended on a blip: %v", err)
	case tok := <-toks:
		t.Fatalf("a token during the blip: %s", tok.GetFingerprint())
	case <-time.After(100 * time.Millisecond):
	}
	h.as.SetFaults(oauthtest.Faults{})
	h.clock.Add(breakerWait / 2)
	h.srv.broker.RefreshDue(context.Background())
	if next := recvToken(t, toks, errs); next.GetFingerprint() == first.GetFingerprint() {
		t.Error("the stream resent the old token")
	}
}

// TestWatchEndsUnavailableOnShutdown: streams end with UNAVAILABLE at once, so
// shutdown does not wait out its grace period and clients reconnect.
func TestWatchEndsUnavailableOnShutdown(t *testing.T) {
	h := newHarness(t, nil)
	toks, errs, _ := watch(t, h.client(payments), &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)
	start := time.Now()
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > GracePeriod/2 {
		t.Errorf("shutdown with an open watch took %v", d)
	}
	select {
	case err := <-errs:
		if status.Code(err) != codes.Unavailable {
			t.Errorf("stream ended with %v, want Unavailable", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("the stream did not end")
	}
}

func TestWatchRejectsLikeGetToken(t *testing.T) {
	h := newHarness(t, nil)
	for _, tt := range []struct {
		ids  []string
		req  *pb.WatchTokenRequest
		code codes.Code
	}{
		{[]string{stranger}, &pb.WatchTokenRequest{Credential: "identity"}, codes.PermissionDenied},
		{[]string{payments}, &pb.WatchTokenRequest{Credential: "identity", Scopes: []string{"ADMIN"}}, codes.PermissionDenied},
		{[]string{payments}, &pb.WatchTokenRequest{Credential: "identity", MinTtl: durationpb.New(2 * time.Hour)}, codes.FailedPrecondition},
	} {
		_, errs, _ := watch(t, h.client(tt.ids...), tt.req)
		select {
		case err := <-errs:
			if status.Code(err) != tt.code {
				t.Errorf("WatchToken(%v) = %v, want %v", tt.req, err, tt.code)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("WatchToken(%v) did not fail", tt.req)
		}
	}
}

// TestWatchFollowsInvalidate: a token dropped by InvalidateToken right after
// the stream sent it is replaced on the stream at once, not when the old one
// would have run down. The clock only moves a second per round, so nothing but
// the invalidation can wake the stream.
func TestWatchFollowsInvalidate(t *testing.T) {
	h := newHarness(t, nil)
	h.as.SetExpiresIn(time.Hour)
	c := h.client(payments)
	toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
	prev := recvToken(t, toks, errs)
	for i := range 8 { // under the invalidation burst of 10
		h.clock.Add(time.Second)
		resp, err := c.InvalidateToken(context.Background(), &pb.InvalidateTokenRequest{Credential: "identity", Fingerprint: prev.GetFingerprint()})
		if err != nil {
			t.Fatal(err)
		}
		if !resp.GetInvalidated() {
			t.Fatalf("round %d: the token the stream sent was not the current one", i)
		}
		next := recvToken(t, toks, errs)
		if next.GetFingerprint() == prev.GetFingerprint() {
			t.Fatalf("round %d: the stream resent the invalidated token", i)
		}
		prev = next
	}
}
