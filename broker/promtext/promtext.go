// Package promtext writes metric families in the Prometheus text exposition
// format (version 0.0.4) straight from the values a program already holds.
//
// The broker exports a handful of series per credential; with ten thousand
// credentials, making a client_golang metric for each (and a protobuf
// message for each at every scrape) costs hundreds of bytes of heap per
// series and most of a scrape's time. Families written with this package
// cost neither: their values are read at scrape time and appended to the
// response as text.
package promtext

import (
	"math"
	"strconv"
	"strings"
)

// Type is a metric family's type.
type Type string

// The family types the broker writes.
const (
	Counter Type = "counter"
	Gauge   Type = "gauge"
)

// Writer appends families to a byte slice. The zero Writer is ready to use.
type Writer struct {
	buf []byte
}

// Bytes returns what has been written.
func (w *Writer) Bytes() []byte { return w.buf }

// Reset empties w, keeping its buffer.
func (w *Writer) Reset() { w.buf = w.buf[:0] }

// Family starts a family: its HELP and TYPE lines. Samples of it follow;
// a family must be written whole before the next one starts.
func (w *Writer) Family(name, help string, t Type) {
	w.buf = append(w.buf, "# HELP "...)
	w.buf = append(w.buf, name...)
	w.buf = append(w.buf, ' ')
	w.buf = appendEscaped(w.buf, help, false)
	w.buf = append(w.buf, "\n# TYPE "...)
	w.buf = append(w.buf, name...)
	w.buf = append(w.buf, ' ')
	w.buf = append(w.buf, t...)
	w.buf = append(w.buf, '\n')
}

// Sample writes one sample of name with labels given as name, value pairs.
func (w *Writer) Sample(name string, v float64, labels ...string) {
	w.start(name, labels)
	w.buf = appendFloat(w.buf, v)
	w.buf = append(w.buf, '\n')
}

// Count writes one counter sample whose value is a whole number.
func (w *Writer) Count(name string, v uint64, labels ...string) {
	w.start(name, labels)
	w.buf = strconv.AppendUint(w.buf, v, 10)
	w.buf = append(w.buf, '\n')
}

func (w *Writer) start(name string, labels []string) {
	w.buf = append(w.buf, name...)
	if len(labels) > 0 {
		w.buf = append(w.buf, '{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				w.buf = append(w.buf, ',')
			}
			w.buf = append(w.buf, labels[i]...)
			w.buf = append(w.buf, `="`...)
			w.buf = appendEscaped(w.buf, labels[i+1], true)
			w.buf = append(w.buf, '"')
		}
		w.buf = append(w.buf, '}')
	}
	w.buf = append(w.buf, ' ')
}

// appendEscaped escapes a backslash and a line feed, and in a label value a
// double quote, as the text format requires.
func appendEscaped(b []byte, s string, quote bool) []byte {
	if !strings.ContainsAny(s, "\\\n\"") {
		return append(b, s...)
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quote:
			b = append(b, `\"`...)
		default:
			b = append(b, c)
		}
	}
	return b
}

// appendFloat writes v as the text format spells it.
func appendFloat(b []byte, v float64) []byte {
	switch {
	case math.IsNaN(v):
		return append(b, "NaN"...)
	case math.IsInf(v, 1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// Write appends p, so that other encoders (expfmt's) can write into w.
func (w *Writer) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	return len(p), nil
}
