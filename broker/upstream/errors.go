package upstream

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"golang.org/x/oauth2"
)

// Reason says why a fetch failed. Its values are fit for metric labels.
type Reason string

// The reasons a fetch fails.
const (
	// ReasonNoSecret: the client secret file could not be read.
	ReasonNoSecret Reason = "no_secret"
	// ReasonNetwork: the token endpoint could not be reached.
	ReasonNetwork Reason = "network"
	// ReasonTimeout: the fetch did not complete within its timeout.
	ReasonTimeout Reason = "timeout"
	// ReasonServerError: the server answered with a 5xx status.
	ReasonServerError Reason = "server_error"
	// ReasonThrottled: the server answered 429 Too Many Requests.
	ReasonThrottled Reason = "throttled"
	// ReasonRejected: the server refused the request with an RFC 6749 §5.2 error
	// (invalid_client, invalid_scope, …) or another 4xx status.
	ReasonRejected Reason = "rejected"
	// ReasonMalformed: the response could not be parsed or lacks a required field.
	ReasonMalformed Reason = "malformed"
	// ReasonTokenType: the server issued a token type other than Bearer.
	ReasonTokenType Reason = "token_type"
	// ReasonScopeNotGranted: the server granted fewer scopes than were asked for.
	ReasonScopeNotGranted Reason = "scope_not_granted"
)

// knownCodes are the error codes of RFC 6749 §5.2. Other codes a server sends
// are reported as "other", so an arbitrary string never reaches a log or a label.
var knownCodes = map[string]bool{
	"invalid_request": true, "invalid_client": true, "invalid_grant": true,
	"unauthorized_client": true, "unsupported_grant_type": true, "invalid_scope": true,
}

// Error is a failed fetch. Its message holds the reason, the RFC 6749 error
// code and the HTTP status; never the response body, the secret or a token.
type Error struct {
	// Reason classifies the failure.
	Reason Reason
	// Temporary reports whether a later attempt may succeed without a change
	// of configuration (network trouble, timeouts, 5xx, 429, malformed bodies).
	Temporary bool
	// Code is the RFC 6749 §5.2 error code the server sent, if any.
	Code string
	// StatusCode is the HTTP status of the response, 0 when there was none.
	StatusCode int
	// RetryAfter is the delay the server asked for in Retry-After, if any.
	RetryAfter time.Duration

	detail string
	err    error // a cause that is safe to print (never an oauth2.RetrieveError)
}

// Error describes the failure without secrets or response bodies.
func (e *Error) Error() string {
	s := "token endpoint: " + string(e.Reason)
	if e.Code != "" {
		s += " (" + e.Code + ")"
	}
	if e.StatusCode != 0 {
		s += " (HTTP " + strconv.Itoa(e.StatusCode) + ")"
	}
	if e.detail != "" {
		s += ": " + e.detail
	}
	if e.err != nil {
		s += ": " + e.err.Error()
	}
	return s
}

// Unwrap returns the underlying cause, if it is safe to expose.
func (e *Error) Unwrap() error { return e.err }

// classify turns an error from the oauth2 library into an *Error.
func classify(ctx context.Context, err error) *Error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		return fromResponse(re)
	}
	var ne net.Error
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded), errors.Is(err, context.DeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return &Error{Reason: ReasonTimeout, Temporary: true}
	case errors.Is(err, context.Canceled):
		return &Error{Reason: ReasonNetwork, Temporary: true, err: context.Canceled}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return &Error{Reason: ReasonNetwork, Temporary: true, err: ue.Err}
	}
	// The library's own parse errors ("cannot parse json", "missing access_token").
	return &Error{Reason: ReasonMalformed, Temporary: true}
}

func fromResponse(re *oauth2.RetrieveError) *Error {
	e := &Error{Code: re.ErrorCode}
	if !knownCodes[e.Code] && e.Code != "" {
		e.Code = "other"
	}
	if re.Response != nil {
		e.StatusCode = re.Response.StatusCode
		e.RetryAfter = retryAfter(re.Response.Header.Get("Retry-After"), time.Now())
	}
	switch {
	case e.StatusCode == http.StatusTooManyRequests:
		e.Reason, e.Temporary = ReasonThrottled, true
	case e.StatusCode >= 500:
		e.Reason, e.Temporary = ReasonServerError, true
	case e.Code != "" || e.StatusCode >= 400:
		e.Reason = ReasonRejected
		if e.Code == "" && e.StatusCode == http.StatusUnauthorized {
			e.Code = "invalid_client"
		}
	default: // a 1xx/3xx, or a 2xx that carried no error code but still failed
		e.Reason, e.Temporary = ReasonMalformed, true
	}
	return e
}

// retryAfter parses a Retry-After header: delay seconds or an HTTP date.
func retryAfter(h string, now time.Time) time.Duration {
	if h == "" {
		return 0
	}
	if secs, err := strconv.Atoi(h); err == nil {
		return max(time.Duration(secs)*time.Second, 0)
	}
	if t, err := http.ParseTime(h); err == nil {
		return max(t.Sub(now), 0)
	}
	return 0
}
