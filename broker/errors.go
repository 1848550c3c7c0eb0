package broker

import "errors"

// Sentinel errors of the Broker. Each maps to one gRPC status code (status.go);
// wrap them with fmt.Errorf("%w: …") to say what happened.
var (
	// ErrUnauthenticated: the caller's verified certificate yields no usable identity.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: the caller may not use the credential, or it does not exist.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrInvalidArgument: the request is malformed.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrResourceExhausted: the caller exceeded its rate limit.
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrUnavailable: no token with enough lifetime can be had now; retrying may help.
	ErrUnavailable = errors.New("unavailable")
	// ErrFailedPrecondition: the authorization server refuses the broker's own
	// credentials or grants less than asked, or min_ttl exceeds the granted lifetime.
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrStreamRevoked: a WatchToken stream's caller lost access by a
	// configuration change. It comes wrapped with ErrPermissionDenied.
	ErrStreamRevoked = errors.New("WatchToken stream revoked by a configuration change")
	// ErrDPoPRequired: a DPoP credential was asked for without a proof
	// request. It comes wrapped with ErrInvalidArgument.
	ErrDPoPRequired = errors.New("DPoP credential asked without dpop")
	// ErrNotDPoP: a bearer credential was asked for with a proof request.
	// It comes wrapped with ErrInvalidArgument.
	ErrNotDPoP = errors.New("bearer credential asked with dpop")
)
