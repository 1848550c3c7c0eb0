// Package secret holds secret values (client secrets, keys) so that they
// cannot reach a log line, an error message or a JSON document by accident:
// every way of printing or encoding a Value yields "[REDACTED]". Only Reveal
// returns the secret, and it is called where the secret is sent, nowhere else.
package secret

import (
	"bytes"
	"errors"
	"fmt"
	"os"

	"go.uber.org/zap/zapcore"
)

// Redacted is what a Value prints as.
const Redacted = "[REDACTED]"

// ErrEmpty is returned by ReadFile when the file holds no secret.
var ErrEmpty = errors.New("secret file is empty")

// Value is a secret. Its zero value is the empty secret.
type Value struct{ s string }

// New wraps s.
func New(s string) Value { return Value{s: s} }

// Reveal returns the secret itself. Call it only to send the secret where it belongs.
func (v Value) Reveal() string { return v.s }

// IsZero reports whether the secret is empty.
func (v Value) IsZero() bool { return v.s == "" }

// String returns Redacted.
func (v Value) String() string { return Redacted }

// GoString returns Redacted, so %#v does not print the secret either.
func (v Value) GoString() string { return Redacted }

// Format prints Redacted for every verb.
func (v Value) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(Redacted)) }

// MarshalText returns Redacted, so JSON, YAML and text encoders redact.
func (v Value) MarshalText() ([]byte, error) { return []byte(Redacted), nil }

// MarshalLogObject logs the value as redacted for zap's object encoders.
func (v Value) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("value", Redacted)
	return nil
}

// ReadFile reads a secret from path, trimming surrounding white space (files
// mounted from Kubernetes Secrets or written by editors often end in a newline).
// The error names the path, never the content.
func ReadFile(path string) (Value, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Value{}, fmt.Errorf("read secret: %w", err)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return Value{}, fmt.Errorf("read secret %s: %w", path, ErrEmpty)
	}
	return Value{s: string(b)}, nil
}
