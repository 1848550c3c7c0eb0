package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// TestClosedGateMessage: the wait is announced in whole seconds, rounded up,
// never "in 0s".
func TestClosedGateMessage(t *testing.T) {
	cause := errors.New("token endpoint is failing")
	for wait, want := range map[time.Duration]string{
		time.Millisecond:        "(next attempt in 1s)",
		999 * time.Millisecond:  "(next attempt in 1s)",
		time.Second:             "(next attempt in 1s)",
		1200 * time.Millisecond: "(next attempt in 2s)",
		30 * time.Second:        "(next attempt in 30s)",
	} {
		err := &closedError{err: cause, wait: wait}
		if got := err.Error(); !strings.HasSuffix(got, want) || !errors.Is(err, cause) {
			t.Errorf("wait %v: %q, want it to end in %q and wrap the cause", wait, got, want)
		}
	}
}

// TestMayWait: a caller waits for an attempt due before its deadline, or
// under way; never for a refused registration's probe.
func TestMayWait(t *testing.T) {
	short, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	long, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	tests := []struct {
		name string
		ctx  context.Context
		ce   closedError
		want bool
	}{
		{"due before the deadline", long, closedError{wait: time.Second}, true},
		{"due after the deadline", short, closedError{wait: time.Second}, false},
		{"no deadline, soon", context.Background(), closedError{wait: time.Second}, true},
		{"no deadline, far", context.Background(), closedError{wait: time.Minute}, false},
		{"under way", short, closedError{wait: time.Minute, probing: true}, true},
		{"refused", long, closedError{wait: time.Second, refused: true}, false},
	}
	for _, tt := range tests {
		if got := mayWait(tt.ctx, &tt.ce); got != tt.want {
			t.Errorf("%s: mayWait = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestRecentCallersBounded: the inventory keeps the 100 most recent callers
// of a credential.
func TestRecentCallersBounded(t *testing.T) {
	var s credUse
	base := time.Unix(1_000_000, 0)
	for i := range 150 {
		s.noteIssued(policy.Identity(fmt.Sprintf("spiffe://t/c%03d", i)), base.Add(time.Duration(i)*time.Second))
	}
	s.noteIssued("spiffe://t/c149", base.Add(200*time.Second)) // a known caller again: no eviction
	if len(s.callers) != MaxRecentCallers {
		t.Fatalf("%d callers kept, want %d", len(s.callers), MaxRecentCallers)
	}
	if _, ok := s.callers["spiffe://t/c049"]; ok {
		t.Error("an old caller was kept over a recent one")
	}
	if got := s.callers["spiffe://t/c050"]; got != base.Add(50*time.Second).Unix() {
		t.Errorf("c050 last = %d, want kept with its time", got)
	}
}

// TestRecentCallersOne: a credential's one caller is recorded without a
// map; a second caller makes one, keeping the first.
func TestRecentCallersOne(t *testing.T) {
	var s credUse
	base := time.Unix(1_000_000, 0)
	s.noteIssued("spiffe://t/a", base)
	s.noteIssued("spiffe://t/a", base.Add(time.Second))
	if s.callers != nil {
		t.Fatal("one caller made a map")
	}
	got := map[policy.Identity]int64{}
	s.recentCallers(func(id policy.Identity, sec int64) { got[id] = sec })
	if len(got) != 1 || got["spiffe://t/a"] != base.Unix()+1 {
		t.Fatalf("recent callers = %v, want a at its last second", got)
	}
	s.noteIssued("spiffe://t/b", base.Add(2*time.Second))
	clear(got)
	s.recentCallers(func(id policy.Identity, sec int64) { got[id] = sec })
	if len(got) != 2 || got["spiffe://t/a"] != base.Unix()+1 || got["spiffe://t/b"] != base.Unix()+2 {
		t.Errorf("recent callers = %v, want a and b at their last seconds", got)
	}
}
