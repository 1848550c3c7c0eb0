package upstream

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
)

// Check reports whether the token endpoint takes connections: a TCP connect
// and, for https, a TLS handshake with the configured CA (and, for
// tls_client_auth, the client certificate). It sends no HTTP request, so
// the authorization server counts no token request and the bank's rate
// limits are not spent. It does not tell whether the registration is
// accepted: only a fetch does.
func (c *Client) Check(ctx context.Context) error {
	u, err := url.Parse(c.cfg.TokenURL)
	if err != nil {
		return &Error{Reason: ReasonNetwork, err: fmt.Errorf("token URL: %w", err)}
	}
	port := u.Port()
	if port == "" {
		port = "443"
		if u.Scheme == "http" {
			port = "80"
		}
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ConnectTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		return &Error{Reason: ReasonNetwork, Temporary: true, err: fmt.Errorf("connect: %w", err)}
	}
	defer conn.Close()
	if u.Scheme != "https" {
		return nil
	}
	tc, _, err := endpointTLS(c.cfg)
	if err != nil {
		return &Error{Reason: ReasonNoSecret, err: err}
	}
	tc.ServerName = u.Hostname()
	if err := tls.Client(conn, tc).HandshakeContext(ctx); err != nil {
		return &Error{Reason: ReasonNetwork, Temporary: true, err: fmt.Errorf("TLS handshake: %w", err)}
	}
	return nil
}
