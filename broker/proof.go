package broker

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/store"
)

// ProofRequest asks for a DPoP proof (RFC 9449) for one HTTP request made
// with the token.
type ProofRequest struct {
	// Method is the request's HTTP method.
	Method string
	// URL is the request's absolute URL; the proof's htu leaves out its
	// query and fragment.
	URL string
	// Nonce is the resource server's DPoP-Nonce, if it sent one.
	Nonce string
}

// Proof is a DPoP proof made for an issued token.
type Proof struct {
	// Value is the proof (a compact JWS) for the DPoP header.
	Value string
	// JTI is the proof's unique identifier, for the audit trail.
	JTI string
	// Method and URL are what the proof is for; URL without query or fragment.
	Method, URL string
}

// checkProof checks a request's proof request against the credential: a DPoP
// credential needs one, a bearer credential takes none, and the caller's
// rules may limit the URLs it gets proofs for.
func (c *credential) checkProof(caller policy.Identity, r *ProofRequest) error {
	switch {
	case c.DPoP == nil && r == nil:
		return nil
	case r == nil:
		return fmt.Errorf("%w: %w: credential %q is DPoP-bound (sender-constrained): ask with dpop {method, url} to get a proof with the token",
			ErrInvalidArgument, ErrDPoPRequired, c.Name)
	case c.DPoP == nil:
		return fmt.Errorf("%w: %w: credential %q issues bearer tokens: ask without dpop", ErrInvalidArgument, ErrNotDPoP, c.Name)
	}
	if err := dpop.CheckMethod(r.Method); err != nil {
		return fmt.Errorf("%w: dpop.method: %w", ErrInvalidArgument, err)
	}
	if r.Nonce != "" {
		if err := dpop.CheckNonce(r.Nonce); err != nil {
			return fmt.Errorf("%w: dpop.nonce: %w", ErrInvalidArgument, err)
		}
	}
	u, err := dpop.ParseURL(r.URL)
	if err != nil {
		return fmt.Errorf("%w: dpop.url: %w", ErrInvalidArgument, err)
	}
	if !c.Callers.AllowsURL(caller, u) {
		return fmt.Errorf("%w: caller %s may not get proofs for %s with credential %q", ErrPermissionDenied, caller, u, c.Name)
	}
	return nil
}

// prove adds a proof for r to is, signed by the key is's token is bound
// to. A token bound to a key this process has not read (the key file
// changed before it started, and the token came from the store) is
// replaced once: the process cannot prove for it, and callers would wait
// for its expiry otherwise.
func (b *Broker) prove(ctx context.Context, p prepared, is Issued, r *ProofRequest) (Issued, error) {
	key, ok := p.c.DPoP.Key(is.JKT)
	if !ok {
		var err error
		if is, err = b.replaceUnprovable(ctx, p, is.Entry); err != nil {
			return Issued{}, err
		}
		if key, ok = p.c.DPoP.Key(is.JKT); !ok {
			return Issued{}, fmt.Errorf("%w: credential %q: the token is bound to a DPoP key this replica does not hold; retry", ErrUnavailable, p.c.Name)
		}
	}
	v, jti, err := key.Proof(dpop.Request{Method: r.Method, URL: r.URL, Nonce: r.Nonce, AccessToken: is.AccessToken}, b.now())
	if err != nil { // the request was checked: a failure of the signer itself
		return Issued{}, fmt.Errorf("dpop proof: %w", err)
	}
	htu, _ := dpop.HTU(r.URL) // checked by checkProof
	is.Proof = &Proof{Value: v, JTI: jti, Method: r.Method, URL: htu}
	return is, nil
}

// replaceUnprovable drops e, here, in the store and (through the store's
// announcement) on the other replicas, and gets a new token, which the
// current key file binds.
func (b *Broker) replaceUnprovable(ctx context.Context, p prepared, e *store.Entry) (Issued, error) {
	fp := e.Fingerprint
	b.slotFor(p.key, p.c, p.scopes).revoked.Store(&fp)
	if _, err := b.store.DeleteIfCurrent(ctx, p.key, fp); err != nil {
		b.storeFailed("delete", err)
	}
	b.drop(p.key, fp)
	b.log.Warn("token bound to a DPoP key this process never read (the key file changed before it started); replacing the token",
		zap.String("credential", p.c.Name), zap.String("fingerprint", fp), zap.String("jkt", e.JKT))
	_ = b.Record(audit.Event{Event: audit.TokenInvalidated, RequestID: RequestID(ctx), Credential: p.c.Name, Scopes: p.scopes,
		Fingerprint: fp, Outcome: "invalidated", Reason: "bound to a DPoP key this replica does not hold"})
	return b.get(ctx, p, b.now())
}
