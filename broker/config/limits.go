package config

import "time"

// Defaults of the limits: section. deploy/docs/security.md ("The front door")
// says why each is what it is.
const (
	// DefaultHandshakes caps the connections in their TLS (and HTTP/2)
	// handshake at once, across all sources.
	DefaultHandshakes = 1024
	// DefaultHandshakesPerSource caps them per source (an IPv4 address, or an IPv6 /64).
	DefaultHandshakesPerSource = 128
	// DefaultMaxHeaderListSize is the largest request header list accepted (bytes).
	DefaultMaxHeaderListSize = 16 << 10
	// DefaultStreamsPerConnection caps the calls open at once on one connection.
	DefaultStreamsPerConnection = 1000
	// DefaultNewStreamsPerSecond is the sustained rate of new calls on one connection.
	DefaultNewStreamsPerSecond = 1000
	// DefaultNewStreamsBurst is how many calls one connection may start at once.
	DefaultNewStreamsBurst = 2000
	// DefaultStreamResetsPerSecond is the sustained rate of streams one
	// connection may cancel (RST_STREAM); the burst is twice that.
	DefaultStreamResetsPerSecond = 100
	// DefaultFirstMessageTimeout bounds the wait for a call's request message.
	DefaultFirstMessageTimeout = 10 * time.Second
)

// Limits bounds what a peer can make the broker hold or do before it is
// known to be a caller: connections in their handshake, header bytes, calls
// per connection and their rate. A zero value means the default.
type Limits struct {
	// Handshakes caps the connections still in their handshake, all sources
	// together; one more is closed at once.
	Handshakes int `yaml:"handshakes_in_progress"`
	// HandshakesPerSource caps them per source (an IPv4 address, or an IPv6 /64).
	HandshakesPerSource int `yaml:"handshakes_per_source"`
	// MaxHeaderListSize is the largest header list a call may send (bytes,
	// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE); a larger one is refused while
	// it is read, before it is kept.
	MaxHeaderListSize int `yaml:"max_header_list_size"`
	// StreamsPerConnection caps the calls open at once on one connection,
	// whatever their method (grpc.health.v1.Health/Watch included).
	StreamsPerConnection int `yaml:"streams_per_connection"`
	// NewStreamsPerSecond and NewStreamsBurst are a token bucket on the
	// calls one connection starts; a connection that exceeds it is sent
	// GOAWAY (ENHANCE_YOUR_CALM) and closed.
	NewStreamsPerSecond float64 `yaml:"new_streams_per_second"`
	NewStreamsBurst     int     `yaml:"new_streams_burst"`
	// StreamResetsPerSecond is a token bucket (bursts of twice the rate) on
	// the streams a connection cancels (RST_STREAM), the signature of the
	// HTTP/2 rapid reset attack (CVE-2023-44487); a connection that exceeds
	// it is sent GOAWAY (ENHANCE_YOUR_CALM) and closed.
	StreamResetsPerSecond float64 `yaml:"stream_resets_per_second"`
	// FirstMessageTimeout bounds the wait for a call's request message once
	// its headers are in; the call is then cancelled.
	FirstMessageTimeout Duration `yaml:"first_message_timeout"`
}

// WithDefaults returns l with every zero value replaced by its default.
func (l Limits) WithDefaults() Limits {
	or := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	or(&l.Handshakes, DefaultHandshakes)
	or(&l.HandshakesPerSource, DefaultHandshakesPerSource)
	or(&l.MaxHeaderListSize, DefaultMaxHeaderListSize)
	or(&l.StreamsPerConnection, DefaultStreamsPerConnection)
	or(&l.NewStreamsBurst, DefaultNewStreamsBurst)
	if l.NewStreamsPerSecond == 0 {
		l.NewStreamsPerSecond = DefaultNewStreamsPerSecond
	}
	if l.StreamResetsPerSecond == 0 {
		l.StreamResetsPerSecond = DefaultStreamResetsPerSecond
	}
	setDefault(&l.FirstMessageTimeout, DefaultFirstMessageTimeout)
	return l
}

func (l Limits) validate() error {
	for key, v := range map[string]int{"limits.handshakes_in_progress": l.Handshakes, "limits.handshakes_per_source": l.HandshakesPerSource,
		"limits.streams_per_connection": l.StreamsPerConnection, "limits.new_streams_burst": l.NewStreamsBurst} {
		if v < 0 {
			return fieldErr(key, "must be 0 (the default) or positive; got %d", v)
		}
	}
	if l.MaxHeaderListSize != 0 && (l.MaxHeaderListSize < 1024 || l.MaxHeaderListSize > 1<<20) {
		return fieldErr("limits.max_header_list_size", "must be 0 (the default, %d) or between 1024 and 1048576 bytes; got %d",
			DefaultMaxHeaderListSize, l.MaxHeaderListSize)
	}
	if l.NewStreamsPerSecond < 0 {
		return fieldErr("limits.new_streams_per_second", "must be 0 (the default) or positive; got %v", l.NewStreamsPerSecond)
	}
	if l.StreamResetsPerSecond < 0 {
		return fieldErr("limits.stream_resets_per_second", "must be 0 (the default) or positive; got %v", l.StreamResetsPerSecond)
	}
	if l.FirstMessageTimeout < 0 {
		return fieldErr("limits.first_message_timeout", "must be 0 (the default, 10s) or positive")
	}
	if l.HandshakesPerSource > 0 && l.Handshakes > 0 && l.HandshakesPerSource > l.Handshakes {
		return fieldErr("limits.handshakes_per_source", "must not exceed limits.handshakes_in_progress (%d); got %d", l.Handshakes, l.HandshakesPerSource)
	}
	return nil
}
