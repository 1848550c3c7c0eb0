package client

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/tokenbroker/broker/bearer"
)

// Transport is an http.RoundTripper that sends each request with
// "Authorization: Bearer <token>" from Source — in the header, never in the
// URL. When the resource server answers 401 and its WWW-Authenticate says
// the token is no good (error="invalid_token", or no error named; RFC 6750
// §3.1), it reports the token to the broker (Source.Invalidate; each token
// once, however many requests it failed) and, if the request body can be
// sent again (none, or http.Request.GetBody set, as http.NewRequest does
// for in-memory bodies), retries once with the new token. A second 401, and
// a 401 for any other reason (insufficient_scope), are returned as they are.
//
// It refuses to send a token over plain http except to a loopback address,
// and refuses (with an error, sending nothing) a token that is not a bearer
// token in the syntax of RFC 6750 §2.1.
//
// For a DPoP-bound credential (the broker answers DPOP_REQUIRED, or the
// token's type is DPoP) it asks the broker, per request, for a token and a
// proof for the request's method and URL, and sends "Authorization: DPoP"
// and "DPoP"; see dpopRoundTrip for the 401s it answers.
type Transport struct {
	// Source provides the tokens.
	Source *Source
	// Base sends the requests; nil means http.DefaultTransport.
	Base http.RoundTripper

	nonces nonces // DPoP-Nonce per origin
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if err := cleartext(req); err != nil {
		closeBody(req)
		return nil, err
	}
	if t.Source.DPoP() {
		return t.dpopRoundTrip(req)
	}
	tok, err := t.Source.TokenContext(req.Context())
	if errors.Is(err, ErrDPoPRequired) || err == nil && tok.TokenType == "DPoP" {
		return t.dpopRoundTrip(req)
	}
	if err == nil {
		err = checkSyntax(tok)
	}
	if err != nil {
		closeBody(req)
		return nil, err
	}
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	resp, err := t.base().RoundTrip(withBearer(req, tok.AccessToken, req.Body))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}

	// Rejected. Only a rejection of the token itself is reported (not, say,
	// insufficient_scope: a new token would fare no better), each token once
	// however many requests it failed, and a request is sent again only once
	// its token has been reported.
	if !tokenRejected(resp) {
		return resp, nil
	}
	fp := Fingerprint(tok)
	report, r := t.Source.markRejected(fp)
	switch {
	case report:
		_, _ = t.Source.report(req.Context(), r) // best effort: a failed report still drops the local copy
	case r != nil: // another request reported it: wait for the broker's answer before asking for the next token
		select {
		case <-r.done:
		case <-req.Context().Done():
			return resp, nil
		}
	default: // replaced by rotation meanwhile, never reported: nothing happened that a retry could count on
		return resp, nil
	}
	if !replayable {
		return resp, nil
	}
	next, err := t.Source.TokenContext(req.Context())
	if err != nil || Fingerprint(next) == fp || checkSyntax(next) != nil {
		return resp, nil // no other token to try
	}
	body, ok := rewind(req, resp)
	if !ok {
		return resp, nil
	}
	return t.base().RoundTrip(withBearer(req, next.AccessToken, body))
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// withBearer returns a copy of req with the token in the Authorization
// header and body as its body; req itself is not changed.
func withBearer(req *http.Request, token string, body io.ReadCloser) *http.Request {
	r := req.Clone(req.Context())
	r.Header.Set("Authorization", "Bearer "+token)
	r.Body = body
	return r
}

// checkSyntax refuses a token that is not a bearer token (RFC 6750 §2.1):
// white space, a line break or a quote in it could end the Authorization
// header and start another. The broker vends none; this holds the line for
// a broker of another version, or something posing as one.
func checkSyntax(tok *oauth2.Token) error {
	if !bearer.Valid(tok.AccessToken) {
		return fmt.Errorf("client: the broker returned an access token (fingerprint %s) that is not a bearer token; not sending it", Fingerprint(tok))
	}
	return nil
}

// cleartext refuses plain http to anything but a loopback address.
func cleartext(req *http.Request) error {
	if req.URL.Scheme == "https" {
		return nil
	}
	if ip := net.ParseIP(req.URL.Hostname()); req.URL.Scheme == "http" && (req.URL.Hostname() == "localhost" || ip != nil && ip.IsLoopback()) {
		return nil
	}
	return fmt.Errorf("client: refusing to send a bearer token to %s://%s: use https", req.URL.Scheme, req.URL.Host)
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}

// rewind prepares the retry of req after resp: a fresh copy of its body
// (req.GetBody; a request without one has no body to copy), and resp read
// out and closed so that its connection is reused. It reports false, with
// resp untouched for the caller to return, when the body cannot be had again.
func rewind(req *http.Request, resp *http.Response) (io.ReadCloser, bool) {
	body := req.Body
	if req.GetBody != nil {
		var err error
		if body, err = req.GetBody(); err != nil {
			return nil, false
		}
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return body, true
}
