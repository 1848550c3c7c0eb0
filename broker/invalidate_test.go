package broker

import (
	"context"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/store"
)

// TestInvalidatedTokenStaysOut: a read of the store that raced an
// invalidation (it got the token just before the store's copy was deleted)
// does not bring the token back into the cache: the next call fetches anew.
func TestInvalidatedTokenStaysOut(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	st := store.NewMemory(clock.Now)
	b, as, _ := newTestBroker(t, st, time.Hour)
	ctx := context.Background()
	req := Request{Credential: "identity"}
	first, err := b.GetToken(ctx, testCaller, req)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := b.Invalidate(ctx, testCaller, InvalidateRequest{Credential: "identity", Fingerprint: first.Fingerprint})
	if err != nil || !ok {
		t.Fatalf("Invalidate = %v, %v", ok, err)
	}
	// What the racing reader saw: the store still holding the token.
	p, err := b.prepare(testCaller, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutIfNewer(ctx, p.key, first.Entry); err != nil {
		t.Fatal(err)
	}
	next, err := b.GetToken(ctx, testCaller, req)
	if err != nil {
		t.Fatal(err)
	}
	if next.Fingerprint == first.Fingerprint {
		t.Fatalf("the invalidated token was served again (source %s)", next.Source)
	}
	if n := as.TokenRequests(); n != 2 {
		t.Errorf("token requests = %d, want 2", n)
	}
}
