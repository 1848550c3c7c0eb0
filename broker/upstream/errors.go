package upstream

import (
	"context"
	"errors"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"
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
	// ReasonRedirect: the server answered with a redirect (3xx), which is never
	// followed: token_url is not the token endpoint, or something between
	// the broker and the bank is trying to divert its requests.
	ReasonRedirect Reason = "redirect"
)

// knownCodes are the error codes of RFC 6749 §5.2. Other codes a server sends
// are reported as "other", so an arbitrary string never reaches a log or a label.
var knownCodes = map[string]bool{
	"invalid_request": true, "invalid_client": true, "invalid_grant": true,
	"unauthorized_client": true, "unsupported_grant_type": true, "invalid_scope": true,
	"invalid_dpop_proof": true, "use_dpop_nonce": true, // RFC 9449 §5, §8
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
	// Location is where a redirect pointed: scheme and host only, never a
	// path or query (which may carry anything).
	Location string
	// Description is the server's error_description, for operators (log,
	// readiness, inventory) and never for callers: only the characters RFC
	// 6749 §5.2 allows, at most MaxDescription bytes; empty when it sent
	// none or anything else. Error does not include it.
	Description string

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
	if e.Location != "" {
		s += " to " + e.Location + ", not followed"
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

// classify turns an error of the HTTP exchange into an *Error.
func classify(ctx context.Context, err error) *Error {
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
	return &Error{Reason: ReasonNetwork, Temporary: true}
}

// redirected is the failure of a 3xx answer. Only the scheme and host of
// its Location are kept.
func redirected(resp *http.Response) *Error {
	e := &Error{Reason: ReasonRedirect, StatusCode: resp.StatusCode, Location: "nowhere (no Location)"}
	if loc := resp.Header.Get("Location"); loc != "" {
		u, err := resp.Request.URL.Parse(loc) // relative to the token URL
		switch {
		case err != nil || u.Host == "" || len(u.Host) > 255:
			e.Location = "an unparsable Location"
		default:
			e.Location = u.Scheme + "://" + u.Host
		}
	}
	return e
}

// fromResponse is the failure of a response that carried an error status or
// an RFC 6749 §5.2 error code.
func fromResponse(resp *http.Response, code, description string) *Error {
	e := &Error{Code: code, StatusCode: resp.StatusCode, RetryAfter: retryAfter(resp.Header.Get("Retry-After"), time.Now()),
		Description: cleanDescription(description)}
	if !knownCodes[e.Code] && e.Code != "" {
		e.Code = "other"
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
		// A nonce the server wants and did not give, or changed meanwhile:
		// the next request will carry the newest.
		e.Temporary = e.Code == "use_dpop_nonce"
	default: // a 1xx/3xx, or a 2xx that carried no error code but still failed
		e.Reason, e.Temporary = ReasonMalformed, true
	}
	return e
}

// MaxDescription caps the error_description kept from a response.
const MaxDescription = 200

// cleanDescription keeps an error_description made only of the characters
// RFC 6749 §5.2 allows (printable ASCII but '"' and '\\'), cut to
// MaxDescription; anything else is dropped whole, so that a hostile server
// cannot put control characters or markup in front of an operator.
func cleanDescription(d string) string {
	for i := 0; i < len(d); i++ {
		if c := d[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return ""
		}
	}
	if len(d) > MaxDescription {
		d = d[:MaxDescription]
	}
	return d
}

// retryAfter parses a Retry-After header: delay seconds or an HTTP date.
func retryAfter(h string, now time.Time) time.Duration {
	if h == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(h, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		// A delay past what a Duration holds (or past int64) is the
		// longest Duration, not a wrapped one: the caller caps it.
		switch {
		case secs <= 0:
			return 0
		case secs > int64(math.MaxInt64/time.Second):
			return math.MaxInt64
		}
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(h); err == nil {
		return max(t.Sub(now), 0)
	}
	return 0
}
