package broker

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/store"
)

// TestWatchSeesInvalidateDuringSend: a token invalidated while Watch is still
// sending it (before Watch waits again) is replaced on the stream at once. The
// clock moves only inside send, so nothing but the invalidation can wake it.
func TestWatchSeesInvalidateDuringSend(t *testing.T) {
	b, as, clock := newTestBroker(t, nil, time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const rounds = 5
	var sent []string
	done := errors.New("enough rotations")
	send := func(e *store.Entry) error {
		sent = append(sent, e.Fingerprint)
		if len(sent) == rounds {
			return done
		}
		clock.Add(time.Second) // so that the replacement expires later
		ok, err := b.Invalidate(ctx, testCaller, InvalidateRequest{Credential: "identity", Fingerprint: e.Fingerprint})
		if err != nil || !ok {
			t.Errorf("invalidate %s: %v, %v", e.Fingerprint, ok, err)
		}
		return nil
	}
	err := b.Watch(ctx, testCaller, Request{Credential: "identity"}, send)
	if !errors.Is(err, done) {
		t.Fatalf("Watch ended with %v after %d tokens, want %d tokens", err, len(sent), rounds)
	}
	seen := map[string]bool{}
	for _, fp := range sent {
		if seen[fp] {
			t.Errorf("token %s sent twice", fp)
		}
		seen[fp] = true
	}
	if n := as.TokenRequests(); n != rounds {
		t.Errorf("token requests = %d, want %d (one per invalidation)", n, rounds)
	}
}
