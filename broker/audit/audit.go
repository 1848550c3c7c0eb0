// Package audit writes tokenbroker's audit trail: one JSON line per decision
// (token.issued, token.denied, token.invalidated, upstream.fetch,
// config.reloaded), with who asked, for what, where the token came from and its
// fingerprint — never the token or a secret.
//
// By default events are buffered and flushed every second and at Close, so
// the hot path does not wait on the disk. With FailClosed every event is
// written before the decision takes effect, and a write that fails is
// returned: the caller then refuses to hand out the token.
package audit

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
	"unicode/utf8"

	"go.uber.org/zap/zapcore"
)

// Event names.
const (
	TokenIssued      = "token.issued"
	TokenDenied      = "token.denied"
	TokenInvalidated = "token.invalidated"
	UpstreamFetch    = "upstream.fetch"
	ConfigReloaded   = "config.reloaded"
)

// Event is one audit record. Empty fields are left out.
type Event struct {
	Event       string
	RequestID   string
	Caller      string
	Credential  string
	Scopes      []string
	Source      string
	Fingerprint string
	ExpireTime  time.Time
	Outcome     string // "ok", "denied", "error", …
	Reason      string
}

// lineStamps format the two times of a line; zero values work.
type lineStamps struct{ now, expiry stamps }

// appendJSON appends e as one JSON line: "time" (now), "event", then the
// fields that are set, in a fixed order. Written by hand rather than through
// a generic encoder: it runs for every token handed out.
func (e *Event) appendJSON(b []byte, now time.Time, ts *lineStamps) []byte {
	b = append(b, `{"time":"`...)
	b = ts.now.appendTime(b, now)
	b = append(b, `","event":`...)
	b = appendString(b, e.Event)
	add := func(k, v string) {
		if v != "" {
			b = append(b, ',', '"')
			b = append(b, k...)
			b = append(b, '"', ':')
			b = appendString(b, v)
		}
	}
	add("request_id", e.RequestID)
	add("caller", e.Caller)
	add("credential", e.Credential)
	if len(e.Scopes) > 0 {
		b = append(b, `,"scopes":[`...)
		for i, sc := range e.Scopes {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, sc)
		}
		b = append(b, ']')
	}
	add("source", e.Source)
	add("fingerprint", e.Fingerprint)
	if !e.ExpireTime.IsZero() {
		b = append(b, `,"expire_time":"`...)
		b = ts.expiry.appendTime(b, e.ExpireTime)
		b = append(b, '"')
	}
	add("outcome", e.Outcome)
	add("reason", e.Reason)
	return append(b, '}', '\n')
}

// plain marks the bytes a JSON string holds as they are: printable ASCII
// other than the quote and the backslash.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 0x7f; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// appendString appends s as a JSON string: quotes, backslashes and control
// characters escaped, invalid UTF-8 replaced by U+FFFD.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	n := 0 // the common case: nothing to escape, copied at once
	for n < len(s) && plain[s[n]] {
		n++
	}
	b = append(b, s[:n]...)
	for i := n; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20 || c == 0x7f:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}

// lines are reusable line buffers, so that writing an event allocates nothing.
var lines = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// Config configures a Logger.
type Config struct {
	// Path is "stdout", or a file that events are appended to.
	Path string
	// FailClosed writes each event synchronously and reports failures.
	FailClosed bool
	// Stdout is used for Path "stdout"; nil means os.Stdout.
	Stdout io.Writer
}

// Logger writes audit events. The zero value and nil discard them.
type Logger struct {
	ws         zapcore.WriteSyncer // safe for concurrent writes
	failClosed bool
	close      func() error
	stamps     lineStamps
}

// ErrWrite is returned by Write when an event could not be written.
var ErrWrite = errors.New("audit: event not written")

// New opens the audit sink.
func New(cfg Config) (*Logger, error) {
	var ws zapcore.WriteSyncer
	closeFn := func() error { return nil }
	switch cfg.Path {
	case "", "stdout":
		w := cfg.Stdout
		if w == nil {
			w = os.Stdout
		}
		ws = zapcore.AddSync(w)
	default:
		f, err := os.OpenFile(cfg.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("audit.path: %w", err)
		}
		ws, closeFn = f, f.Close
	}
	l := &Logger{failClosed: cfg.FailClosed}
	if !cfg.FailClosed {
		b := &zapcore.BufferedWriteSyncer{WS: ws, Size: 256 << 10, FlushInterval: time.Second}
		ws = b
		inner := closeFn
		closeFn = func() error { return errors.Join(b.Stop(), inner()) }
	}
	l.ws = ws
	if cfg.FailClosed {
		l.ws = zapcore.Lock(ws) // one whole line per write, whatever the sink (the buffer locks itself)
	}
	l.close = closeFn
	return l, nil
}

// Write records e. It returns an error only with FailClosed, when the event
// could not be written; without it, failures are left to the buffer.
func (l *Logger) Write(e Event) error {
	if l == nil || l.ws == nil {
		return nil
	}
	// Unbuffered under FailClosed, so a failed write shows here. (No fsync per
	// event: a pipe cannot be synced, and the write error is what counts.)
	buf := lines.Get().(*[]byte)
	*buf = e.appendJSON((*buf)[:0], time.Now(), &l.stamps)
	_, err := l.ws.Write(*buf)
	if cap(*buf) <= 64<<10 { // an outsized line's buffer is not kept
		lines.Put(buf)
	}
	if err != nil && l.failClosed {
		return fmt.Errorf("%w: %w", ErrWrite, err)
	}
	return nil
}

// Close flushes buffered events and closes the sink.
func (l *Logger) Close() error {
	if l == nil || l.close == nil {
		return nil
	}
	_ = l.ws.Sync()
	return l.close()
}
