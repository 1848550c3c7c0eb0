package audit

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is a sink safe for the flusher and the test to share.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for line := range strings.Lines(l.b.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("not JSON: %q", line)
		}
		out = append(out, m)
	}
	return out
}

// TestWriteDenial: per (who, outcome), the first denial is written at once
// and the next ones counted into one summary line per window; another
// source's first denial is written at once; a quiet pair is forgotten;
// Close writes what is pending; issued tokens are written one by one.
func TestWriteDenial(t *testing.T) {
	const window = 100 * time.Millisecond
	sink := &lockedBuffer{}
	l, err := New(Config{Stdout: sink, FailClosed: true, DenialWindow: window})
	if err != nil {
		t.Fatal(err)
	}
	deny := func(who, outcome string) bool {
		written, err := l.WriteDenial(who, Event{Event: TokenDenied, Peer: who, Outcome: outcome, Reason: "no"})
		if err != nil {
			t.Fatal(err)
		}
		return written
	}
	if !deny("10.0.0.1", "Unauthenticated") {
		t.Fatal("the first denial was not written at once")
	}
	for range 999 {
		if deny("10.0.0.1", "Unauthenticated") {
			t.Fatal("a repeated denial was written at once")
		}
	}
	if !deny("10.0.0.2", "Unauthenticated") || !deny("10.0.0.1", "PermissionDenied") {
		t.Fatal("a new source's (or outcome's) first denial was not written at once")
	}
	for range 5 {
		_ = l.Write(Event{Event: TokenIssued, Caller: "c", Outcome: "ok"})
	}
	time.Sleep(10 * window) // a summary at the first tick; the pairs forgotten at the next
	if !deny("10.0.0.1", "Unauthenticated") {
		t.Error("after a quiet window, the next denial was not written at once")
	}
	deny("10.0.0.1", "Unauthenticated")
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	var firsts, issued int
	var counts []float64
	for _, m := range sink.lines(t) {
		switch {
		case m["event"] == TokenIssued:
			issued++
		case m["count"] != nil:
			counts = append(counts, m["count"].(float64))
			if m["peer"] != "10.0.0.1" || m["since"] == nil {
				t.Errorf("summary %v: want peer 10.0.0.1 and since", m)
			}
		default:
			firsts++
		}
	}
	if firsts != 4 || issued != 5 || len(counts) != 2 || counts[0] != 999 || counts[1] != 1 {
		t.Errorf("%d first denials, %d issued, summaries %v; want 4, 5, [999 1]", firsts, issued, counts)
	}
}
