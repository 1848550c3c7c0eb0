package config

import "time"

// Retry tunes how the broker retries a failing token endpoint.
type Retry struct {
	// MaxBackoffWithWaiters caps the wait before the next attempt after a
	// transient failure while callers are waiting with no usable token
	// (jittered down by up to a fifth). With nobody waiting, the backoff
	// grows to its own cap (a probe every 27–33s once the breaker opens).
	MaxBackoffWithWaiters Duration `yaml:"max_backoff_with_waiters"`
	// MaxRetryAfter caps the Retry-After the broker honours; a longer one
	// is taken as this.
	MaxRetryAfter Duration `yaml:"max_retry_after"`
}

// Defaults of the retry keys.
const (
	DefaultMaxBackoffWithWaiters = 5 * time.Second
	DefaultMaxRetryAfter         = 10 * time.Minute
)

func (r *Retry) applyDefaults() {
	setDefault(&r.MaxBackoffWithWaiters, DefaultMaxBackoffWithWaiters)
	setDefault(&r.MaxRetryAfter, DefaultMaxRetryAfter)
}

func (r *Retry) validate() error {
	// Zero (a Config built in code) means the default.
	if d := r.MaxBackoffWithWaiters.D(); d != 0 && (d < 100*time.Millisecond || d > time.Minute) {
		return fieldErr("retry.max_backoff_with_waiters", "must be between 100ms and 1m; got %s", d)
	}
	if d := r.MaxRetryAfter.D(); d != 0 && (d < time.Second || d > time.Hour) {
		return fieldErr("retry.max_retry_after", "must be between 1s and 1h; got %s", d)
	}
	return nil
}

// Effective is r with the defaults in place of zero values (a Config built
// in code, not parsed, has them).
func (r Retry) Effective() Retry {
	r.applyDefaults()
	return r
}
