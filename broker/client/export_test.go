package client

import "time"

// WithNow sets the Source's clock, for tests.
func WithNow(now func() time.Time) Option {
	return func(s *Source) { s.now = now }
}
