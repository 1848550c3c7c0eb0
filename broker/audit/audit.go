// Package audit writes tokenbroker's audit trail: one JSON line per decision
// (token.issued, token.denied, token.invalidated, upstream.fetch,
// proof.issued, config.reloaded), with who asked, for what, where the token came from and its
// fingerprint — never the token or a secret.
//
// Denials can be written through WriteDenial, which aggregates them per
// (caller or source address, outcome), so that a flood of refused calls
// cannot flood the trail.
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
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Event names.
const (
	TokenIssued      = "token.issued"
	TokenDenied      = "token.denied"
	TokenInvalidated = "token.invalidated"
	UpstreamFetch    = "upstream.fetch"
	ConfigReloaded   = "config.reloaded"
	// ProofIssued: a DPoP proof was made for a caller's request (one event
	// per proof, never aggregated).
	ProofIssued = "proof.issued"
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
	// Peer is the source address of a peer denied without an identity.
	Peer string
	// Method, URL (without query or fragment) and JTI describe a DPoP proof.
	Method, URL, JTI string
	// Count and Since make a summary of aggregated denials (see
	// Logger.WriteDenial): Count denials like this one since Since.
	Count int
	Since time.Time
}

// lineStamps format the two times of a line; the zero value works.
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
	add("peer", e.Peer)
	add("method", e.Method)
	add("url", e.URL)
	add("jti", e.JTI)
	if e.Count > 0 {
		b = append(b, `,"count":`...)
		b = strconv.AppendInt(b, int64(e.Count), 10)
		b = append(b, `,"since":"`...)
		b = e.Since.UTC().AppendFormat(b, time.RFC3339Nano)
		b = append(b, '"')
	}
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

// Config configures a Logger.
type Config struct {
	// Path is "stdout", or a file that events are appended to.
	Path string
	// FailClosed writes each event synchronously and reports failures.
	FailClosed bool
	// Stdout is used for Path "stdout"; nil means os.Stdout.
	Stdout io.Writer
	// DenialWindow is how long WriteDenial counts before a summary line;
	// zero means DenialWindow (tests use less).
	DenialWindow time.Duration
}

// bufferSize is how much the buffered mode holds before it writes.
const bufferSize = 256 << 10

// Logger writes audit events. The zero value and nil discard them.
//
// A line is encoded straight into the Logger's buffer under its lock. With
// FailClosed the buffer holds that one line and is written at once, under
// the lock. Without it, lines gather until bufferSize, the next tick of a
// one-second flusher, or Close; the full buffer is then swapped for an empty
// one and written outside the lock, so that other calls go on recording
// while the disk takes it (full buffers are written one at a time, in the
// order they filled).
type Logger struct {
	mu         sync.Mutex // guards buf and closed
	writing    sync.Mutex // held while a buffer is written; taken under mu
	sink       io.Writer
	buf        []byte
	spare      chan []byte // a written buffer, for the next swap
	stamps     lineStamps  // guarded by mu
	failClosed bool
	closed     bool
	stop       chan struct{} // closed by Close: the flusher ends
	stopped    chan struct{}
	closeSink  func() error
	denials    denialState
}

// ErrWrite is returned by Write when an event could not be written.
var ErrWrite = errors.New("audit: event not written")

// New opens the audit sink.
func New(cfg Config) (*Logger, error) {
	l := &Logger{failClosed: cfg.FailClosed, closeSink: func() error { return nil }}
	l.denials.window = cfg.DenialWindow
	switch cfg.Path {
	case "", "stdout":
		l.sink = cfg.Stdout
		if l.sink == nil {
			l.sink = os.Stdout
		}
	default:
		f, err := os.OpenFile(cfg.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("audit.path: %w", err)
		}
		l.sink, l.closeSink = f, f.Close
	}
	if !cfg.FailClosed {
		l.buf = newBuffer()
		l.spare = make(chan []byte, 1)
		l.stop, l.stopped = make(chan struct{}), make(chan struct{})
		go l.flushEverySecond()
	}
	return l, nil
}

func newBuffer() []byte { return make([]byte, 0, bufferSize+1024) }

// Write records e. It returns an error only with FailClosed, when the event
// could not be written; without it, write failures are the buffer's to
// ignore, and an event written after Close is dropped.
func (l *Logger) Write(e Event) error {
	if l == nil || l.sink == nil {
		return nil
	}
	now := time.Now()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		if l.failClosed {
			return fmt.Errorf("%w: the audit trail is closed", ErrWrite)
		}
		return nil
	}
	l.buf = e.appendJSON(l.buf, now, &l.stamps)
	if l.failClosed {
		// Written now, so a failed write shows here. (No fsync per event: a
		// pipe cannot be synced, and the write error is what counts.)
		_, err := l.sink.Write(l.buf)
		if cap(l.buf) > 64<<10 { // an outsized line's buffer is not kept
			l.buf = nil
		}
		l.buf = l.buf[:0]
		l.mu.Unlock()
		if err != nil {
			return fmt.Errorf("%w: %w", ErrWrite, err)
		}
		return nil
	}
	if len(l.buf) >= bufferSize {
		_ = l.writeOut()
		return nil
	}
	l.mu.Unlock()
	return nil
}

// writeOut swaps the buffer for an empty one and writes the full one. l.mu
// is held on entry and released once the write's turn is taken.
func (l *Logger) writeOut() error {
	full := l.buf
	select {
	case b := <-l.spare:
		l.buf = b
	default:
		l.buf = newBuffer()
	}
	l.writing.Lock()
	l.mu.Unlock()
	var err error
	if len(full) > 0 {
		_, err = l.sink.Write(full)
	}
	l.writing.Unlock()
	if cap(full) <= 4*bufferSize { // an outsized line's buffer is not kept
		select {
		case l.spare <- full[:0]:
		default:
		}
	}
	return err
}

// flushEverySecond writes buffered lines once a second.
func (l *Logger) flushEverySecond() {
	defer close(l.stopped)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-l.stop:
			return
		}
		l.mu.Lock()
		if len(l.buf) == 0 || l.closed {
			l.mu.Unlock()
			continue
		}
		_ = l.writeOut()
	}
}

// Close writes buffered events and closes the sink.
func (l *Logger) Close() error {
	if l == nil || l.sink == nil {
		return nil
	}
	l.closeDenials() // their summaries go in before the end
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	var err error
	if l.failClosed {
		l.mu.Unlock()
	} else {
		err = l.writeOut() // after every write that took its turn before
		close(l.stop)
		<-l.stopped
	}
	return errors.Join(err, l.closeSink())
}
