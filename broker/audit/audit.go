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

	"go.uber.org/zap"
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

// MarshalLogObject writes the event's fields.
func (e Event) MarshalLogObject(enc zapcore.ObjectEncoder) error { return e.encode(enc) }

func (e *Event) encode(enc zapcore.ObjectEncoder) error {
	add := func(k, v string) {
		if v != "" {
			enc.AddString(k, v)
		}
	}
	add("request_id", e.RequestID)
	add("caller", e.Caller)
	add("credential", e.Credential)
	if len(e.Scopes) > 0 {
		_ = enc.AddArray("scopes", (*scopeList)(&e.Scopes))
	}
	add("source", e.Source)
	add("fingerprint", e.Fingerprint)
	if !e.ExpireTime.IsZero() {
		enc.AddTime("expire_time", e.ExpireTime)
	}
	add("outcome", e.Outcome)
	add("reason", e.Reason)
	return nil
}

type scopeList []string

func (l *scopeList) MarshalLogArray(a zapcore.ArrayEncoder) error {
	for _, s := range *l {
		a.AppendString(s)
	}
	return nil
}

// record is an event on its way to the encoder, with the field that carries
// it; records are reused so that writing an event allocates nothing.
type record struct {
	Event
	fields [1]zapcore.Field
}

func (r *record) MarshalLogObject(enc zapcore.ObjectEncoder) error { return r.encode(enc) }

var records = sync.Pool{New: func() any { return new(record) }}

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
	core       zapcore.Core
	failClosed bool
	close      func() error
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
	enc := zapcore.EncoderConfig{
		TimeKey: "time", MessageKey: "event", LineEnding: "\n",
		EncodeTime: zapcore.RFC3339NanoTimeEncoder, EncodeDuration: zapcore.StringDurationEncoder,
	}
	l.core = zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(ws), zap.InfoLevel)
	l.close = closeFn
	return l, nil
}

// Write records e. It returns an error only with FailClosed, when the event
// could not be written; without it, failures are left to the buffer.
func (l *Logger) Write(e Event) error {
	if l == nil || l.core == nil {
		return nil
	}
	// Unbuffered under FailClosed, so a failed write shows here. (No fsync per
	// event: a pipe cannot be synced, and the write error is what counts.)
	r := records.Get().(*record)
	r.Event = e
	r.fields[0] = zap.Inline(r)
	// The encoder is done with r when Write returns.
	err := l.core.Write(zapcore.Entry{Time: time.Now(), Message: e.Event}, r.fields[:])
	*r = record{}
	records.Put(r)
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
	_ = l.core.Sync()
	return l.close()
}
