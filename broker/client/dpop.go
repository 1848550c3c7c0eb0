package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"

	"golang.org/x/oauth2"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// ErrDPoPRequired is returned (wrapped, with the broker's status) by Token
// for a DPoP-bound credential: its tokens are usable only with a proof per
// request, which Transport and Proof get from the broker.
var ErrDPoPRequired = errors.New("client: the credential is DPoP-bound (sender-constrained): use client.Transport, or Source.Proof for each request")

// reasonDPoPRequired is the ErrorInfo reason the broker sends with it.
const reasonDPoPRequired = "DPOP_REQUIRED"

// dpopRequired reports whether err is the broker's answer to a GetToken
// without dpop for a DPoP credential.
func dpopRequired(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.InvalidArgument {
		return false
	}
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetReason() == reasonDPoPRequired {
			return true
		}
	}
	return false
}

// DPoP reports whether the Source has learned that its credential is
// DPoP-bound (from the broker's answer or a token's type).
func (s *Source) DPoP() bool { return s.dpop.Load() }

// Proof asks the broker for a token and a fresh DPoP proof (RFC 9449) for
// one HTTP request: method and url (its query and fragment are left out of
// the proof), with the resource server's nonce if it sent one. Send them as
// "Authorization: DPoP <token>" and "DPoP: <proof>". Every call is a call
// to the broker: a proof is good for one request.
func (s *Source) Proof(ctx context.Context, method, url, nonce string) (*oauth2.Token, string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.c.GetToken(ctx, &pb.GetTokenRequest{Credential: s.credential, Scopes: s.scopes,
		MinTtl: durationpb.New(s.minTTL), Dpop: &pb.DPoPRequest{Method: method, Url: url, Nonce: nonce}})
	if err != nil {
		return nil, "", err
	}
	if resp.GetToken().GetAccessToken() == "" || resp.GetDpopProof() == "" {
		return nil, "", errors.New("client: the broker answered without a token and proof")
	}
	s.dpop.Store(true)
	s.mu.Lock()
	s.keepLocked(resp.GetToken())
	s.mu.Unlock()
	return s.oauthToken(resp.GetToken()), resp.GetDpopProof(), nil
}

// maxNonceOrigins bounds the nonces a Transport remembers.
const maxNonceOrigins = 256

// nonces are the newest DPoP-Nonce values resource servers sent, per origin.
type nonces struct {
	mu sync.Mutex
	m  map[string]string
}

func (n *nonces) get(origin string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.m[origin]
}

// keep remembers resp's DPoP-Nonce for origin, if it sent one (RFC 9449 §9:
// on any response), and reports whether it is new.
func (n *nonces) keep(origin string, resp *http.Response) bool {
	v := resp.Header.Get("DPoP-Nonce")
	if v == "" || len(v) > 512 || strings.ContainsAny(v, "\" \\\r\n") {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.m == nil || len(n.m) >= maxNonceOrigins && n.m[origin] == "" {
		n.m = map[string]string{}
	}
	if n.m[origin] == v {
		return false
	}
	n.m[origin] = v
	return true
}

// dpopRoundTrip sends req with a DPoP-bound token and a proof for it. A 401
// that asks for a nonce (WWW-Authenticate: DPoP error="use_dpop_nonce" with
// DPoP-Nonce) is tried once more with that nonce; one that rejects the
// token (error="invalid_token") is reported to the broker, as for bearer
// tokens, and tried once more with the next token. Either retry needs a
// body that can be sent again.
func (t *Transport) dpopRoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	origin := req.URL.Scheme + "://" + strings.ToLower(req.URL.Host)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	send := func(body io.ReadCloser) (*http.Response, *oauth2.Token, error) {
		tok, proof, err := t.Source.Proof(ctx, req.Method, req.URL.String(), t.nonces.get(origin))
		if err == nil {
			err = checkSyntax(tok)
		}
		if err != nil {
			if body != nil {
				body.Close()
			}
			return nil, nil, err
		}
		r := req.Clone(ctx)
		r.Header.Set("Authorization", "DPoP "+tok.AccessToken)
		r.Header.Set("DPoP", proof)
		r.Body = body
		resp, err := t.base().RoundTrip(r)
		if err == nil {
			t.nonces.keep(origin, resp)
		}
		return resp, tok, err
	}
	resp, tok, err := send(req.Body)
	if err != nil || resp.StatusCode != http.StatusUnauthorized || !replayable {
		return resp, err
	}
	switch dpopError(resp) {
	case "use_dpop_nonce":
		if resp.Header.Get("DPoP-Nonce") == "" {
			return resp, nil
		}
	case "invalid_token":
		if !t.rejectDPoP(ctx, tok) {
			return resp, nil
		}
	default:
		return resp, nil
	}
	body, ok := rewind(req, resp)
	if !ok {
		return resp, nil
	}
	resp, _, err = send(body)
	return resp, err
}

// rejectDPoP reports a token the resource server rejected, once, and
// reports whether a retry may get another.
func (t *Transport) rejectDPoP(ctx context.Context, tok *oauth2.Token) bool {
	report, r := t.Source.markRejected(Fingerprint(tok))
	switch {
	case report:
		_, _ = t.Source.report(ctx, r)
	case r != nil:
		select {
		case <-r.done:
		case <-ctx.Done():
			return false
		}
	default:
		return false
	}
	return true
}

// dpopError is the error parameter of the response's DPoP challenge
// (RFC 9449 §7.1), "" without one.
func dpopError(resp *http.Response) string {
	for _, h := range resp.Header.Values("WWW-Authenticate") {
		for _, c := range parseChallenges(h) {
			if strings.EqualFold(c.scheme, "DPoP") {
				return c.params["error"]
			}
		}
	}
	return ""
}

// dpopErr wraps the broker's refusal of a GetToken without dpop.
func dpopErr(credential string, err error) error {
	return fmt.Errorf("%w (credential %q): %w", ErrDPoPRequired, credential, err)
}
