package upstream

import (
	"errors"
	"net/http"

	"github.com/tokenbroker/tokenbroker/broker/dpop"
)

// prove sets a fresh DPoP proof on req, for POST to the token URL with the
// newest nonce the server sent, and returns that nonce.
func (c *Client) prove(req *http.Request, key *dpop.Key) (string, error) {
	var nonce string
	if n := c.nonce.Load(); n != nil {
		nonce = *n
	}
	proof, _, err := key.Proof(dpop.Request{Method: http.MethodPost, URL: c.cfg.TokenURL, Nonce: nonce}, c.cfg.Now())
	if err != nil {
		return "", err
	}
	req.Header.Set("DPoP", proof)
	return nonce, nil
}

// keepNonce keeps the DPoP-Nonce of a token endpoint response, on errors
// and successes alike (RFC 9449 §8.2): the next request carries it.
func (c *Client) keepNonce(resp *http.Response) {
	if n := resp.Header.Get("DPoP-Nonce"); n != "" && dpop.CheckNonce(n) == nil {
		c.nonce.Store(&n)
	}
}

// newNonce reports whether resp brought a usable nonce other than sent.
func (c *Client) newNonce(resp *http.Response, sent string) bool {
	n := resp.Header.Get("DPoP-Nonce")
	return n != "" && n != sent && dpop.CheckNonce(n) == nil
}

// nonceAsked reports whether err is the token endpoint's use_dpop_nonce.
func nonceAsked(err error) bool {
	var ue *Error
	return errors.As(err, &ue) && ue.Code == "use_dpop_nonce"
}
