package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"
)

// decoded is an event line as a JSON reader sees it.
type decoded struct {
	Time        time.Time `json:"time"`
	Event       string    `json:"event"`
	RequestID   string    `json:"request_id"`
	Caller      string    `json:"caller"`
	Credential  string    `json:"credential"`
	Scopes      []string  `json:"scopes"`
	Source      string    `json:"source"`
	Fingerprint string    `json:"fingerprint"`
	ExpireTime  time.Time `json:"expire_time"`
	Outcome     string    `json:"outcome"`
	Reason      string    `json:"reason"`
}

// roundTrip encodes e and decodes the line with encoding/json.
func roundTrip(t *testing.T, e Event, now time.Time) (decoded, string) {
	t.Helper()
	line := string(e.appendJSON(nil, now, &lineStamps{}))
	if !strings.HasSuffix(line, "}\n") || strings.Count(line, "\n") != 1 {
		t.Fatalf("not one line: %q", line)
	}
	var d decoded
	dec := json.NewDecoder(strings.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("line %q does not decode: %v", line, err)
	}
	return d, line
}

// valid is s as the encoder writes it: each byte of invalid UTF-8 becomes U+FFFD.
func valid(s string) string {
	var b strings.Builder
	for _, r := range s { // ranging over a string yields U+FFFD per invalid byte
		b.WriteRune(r)
	}
	return b.String()
}

func TestEventLine(t *testing.T) {
	now := time.Date(2026, 11, 24, 20, 40, 12, 500000000, time.UTC)
	e := Event{Event: TokenIssued, RequestID: "req-42", Caller: "spiffe://bank.internal/ns/payments/sa/api", Credential: "identity",
		Scopes: []string{"IDENTITY", "READ"}, Source: "memory", Fingerprint: "156e2a7ffa412e481cd2e53a4eaf71ff",
		ExpireTime: now.Add(time.Hour), Outcome: "ok"}
	_, line := roundTrip(t, e, now)
	want := `{"time":"2026-11-24T20:40:12.5Z","event":"token.issued","request_id":"req-42","caller":"spiffe://bank.internal/ns/payments/sa/api",` +
		`"credential":"identity","scopes":["IDENTITY","READ"],"source":"memory","fingerprint":"156e2a7ffa412e481cd2e53a4eaf71ff",` +
		`"expire_time":"2026-11-24T21:40:12.5Z","outcome":"ok"}` + "\n"
	if line != want {
		t.Errorf("line =\n%s\nwant\n%s", line, want)
	}
	// Empty fields are left out.
	if _, line := roundTrip(t, Event{Event: ConfigReloaded, Outcome: "ok"}, now); strings.Contains(line, "caller") || strings.Contains(line, "expire_time") {
		t.Errorf("empty fields written: %s", line)
	}
}

// FuzzEventLine: whatever the strings (a caller's request ID, a status
// message), the line is one valid JSON object that reads back the same.
func FuzzEventLine(f *testing.F) {
	for _, s := range []string{"plain", `quote " and \ backslash`, "line\nbreak\r\t", "\x00\x1f\x7f", "caf\xc3\xa9", "bad \xff utf8", "\u2028\u2029", "</script>"} {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		now := time.Unix(1_800_000_000, 123)
		e := Event{Event: TokenDenied, RequestID: a, Caller: b, Scopes: []string{a, b}, Reason: a + b, Outcome: "PermissionDenied"}
		d, line := roundTrip(t, e, now)
		if d.RequestID != valid(a) || d.Caller != valid(b) || d.Reason != valid(a+b) || len(d.Scopes) != 2 || d.Scopes[1] != valid(b) {
			t.Errorf("line %q reads back as %+v", line, d)
		}
		if !utf8.ValidString(line) || !d.Time.Equal(now) {
			t.Errorf("line %q: invalid UTF-8 or time %v", line, d.Time)
		}
	})
}

// TestLoggerWritesAndFailsClosed: events reach the file at Close; with
// FailClosed a failed write is an error.
func TestLoggerWritesAndFailsClosed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := New(Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := l.Write(Event{Event: TokenIssued, Outcome: "ok"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if n := bytes.Count(raw, []byte(`"event":"token.issued"`)); n != 3 {
		t.Errorf("%d events in the file, want 3:\n%s", n, raw)
	}
	full, err := New(Config{Path: "/dev/full", FailClosed: true})
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()
	if err := full.Write(Event{Event: TokenIssued}); err == nil {
		t.Error("a failed write under FailClosed returned no error")
	}
}

// TestLoggerBuffering: without FailClosed, lines reach the sink within about
// a second without Close, and at once when the buffer fills; lines from many
// goroutines arrive whole, each once, each goroutine's in order (full buffers
// are written outside the lock, one at a time); after Close events are
// dropped without error, and under FailClosed refused.
func TestLoggerBuffering(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := New(Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Write(Event{Event: TokenIssued, RequestID: "first"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		raw, _ := os.ReadFile(path)
		if bytes.Contains(raw, []byte(`"request_id":"first"`)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a buffered line was not written within 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}

	const writers, each = 8, 3000 // about 1.5 MB: several full buffers
	done := make(chan error, writers)
	for w := range writers {
		go func() {
			for i := range each {
				if err := l.Write(Event{Event: TokenIssued, RequestID: fmt.Sprintf("w%d-%d", w, i), Caller: strings.Repeat("c", 40),
					Fingerprint: "156e2a7ffa412e481cd2e53a4eaf71ff", ExpireTime: time.Now()}); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range writers {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if raw, _ := os.ReadFile(path); bytes.Count(raw, []byte("\n")) < writers*each/2 {
		t.Errorf("%d lines written before Close, want the full buffers' (over %d)", bytes.Count(raw, []byte("\n")), writers*each/2)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Write(Event{Event: TokenIssued, RequestID: "late"}); err != nil {
		t.Errorf("a write after Close: %v, want it dropped quietly", err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	next := make([]int, writers) // each writer's lines come in the order written
	for line := range strings.Lines(string(raw)) {
		var d decoded
		if err := json.Unmarshal([]byte(line), &d); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if seen[d.RequestID] {
			t.Fatalf("request %s written twice", d.RequestID)
		}
		seen[d.RequestID] = true
		var w, i int
		if _, err := fmt.Sscanf(d.RequestID, "w%d-%d", &w, &i); err == nil {
			if i != next[w] {
				t.Fatalf("writer %d: line %d after line %d", w, i, next[w]-1)
			}
			next[w]++
		}
	}
	if len(seen) != writers*each+1 || seen["late"] {
		t.Errorf("%d distinct lines, want %d and not the late one", len(seen), writers*each+1)
	}

	closed, err := New(Config{Path: filepath.Join(t.TempDir(), "fc.log"), FailClosed: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	if err := closed.Write(Event{Event: TokenIssued}); !errors.Is(err, ErrWrite) {
		t.Errorf("a write after Close under FailClosed: %v, want ErrWrite", err)
	}
}

// slowSink takes its time over each write, longer for earlier ones, as a
// busy disk may: writes that overlapped would land out of order.
type slowSink struct {
	mu     sync.Mutex
	out    bytes.Buffer
	writes atomic.Int32
	inside atomic.Int32 // writes in progress
	most   atomic.Int32
}

func (s *slowSink) Write(p []byte) (int, error) {
	n := s.writes.Add(1)
	in := s.inside.Add(1)
	defer s.inside.Add(-1)
	if in > s.most.Load() {
		s.most.Store(in)
	}
	time.Sleep(time.Duration(20-min(n, 19)) * time.Millisecond)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.Write(p)
}

// TestLoggerWritesBuffersInOrder: full buffers are written outside the lock,
// but one at a time and in the order they filled, however slow the sink.
func TestLoggerWritesBuffersInOrder(t *testing.T) {
	sink := &slowSink{}
	l, err := New(Config{Path: "stdout", Stdout: sink})
	if err != nil {
		t.Fatal(err)
	}
	const writers, each = 4, 3000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				_ = l.Write(Event{Event: TokenIssued, RequestID: fmt.Sprintf("w%d-%d", w, i), Caller: strings.Repeat("c", 60)})
			}
		})
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if sink.writes.Load() < 3 || sink.most.Load() != 1 {
		t.Errorf("%d writes, at most %d at once; want several, one at a time", sink.writes.Load(), sink.most.Load())
	}
	next := make([]int, writers)
	for line := range strings.Lines(sink.out.String()) {
		var d decoded
		if err := json.Unmarshal([]byte(line), &d); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		var w, i int
		if _, err := fmt.Sscanf(d.RequestID, "w%d-%d", &w, &i); err != nil || i != next[w] {
			t.Fatalf("line %q after writer %d's line %d", d.RequestID, w, next[w]-1)
		}
		next[w]++
	}
	for w, n := range next {
		if n != each {
			t.Errorf("writer %d: %d lines, want %d", w, n, each)
		}
	}
}
