package server

import (
	"context"
	"net/url"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
)

// fetcher is a credential's broker.Fetcher: its upstream.Client, made at the
// credential's first fetch from the configuration in force. Until then the
// credential holds its configuration, which the server keeps anyway (the
// inventory shows it), and not also a copy of it as an upstream.Config: with
// ten thousand credentials, most of them idle at any time, that copy was a
// third of what one cost.
//
// The configuration was checked when it was loaded (brokerCredentials made
// a client of it then, and let it go), so the client made later fails only
// on what changed on disk since: the CA file, which it reads again (as every
// background check does).
type fetcher struct {
	cr     *config.Credential // in the configuration in force, which nothing changes
	ring   *dpop.Keyring      // cr's dpop: keyring; nil without one
	env    *upstreamEnv
	client atomic.Pointer[upstream.Client] // nil until the first fetch
}

// upstreamEnv is what the upstream clients of one configuration share.
type upstreamEnv struct {
	now func() time.Time
	tp  trace.TracerProvider // nil: no tracing
}

// Fetch implements broker.Fetcher.
func (f *fetcher) Fetch(ctx context.Context, scopes []string) (*upstream.Token, error) {
	c := f.client.Load()
	if c == nil {
		made, err := upstream.New(upstreamConfig(f.cr, f.ring, f.env))
		if err != nil {
			return nil, err
		}
		if !f.client.CompareAndSwap(nil, made) {
			made = f.client.Load() // another fetch made it first
		}
		c = made
	}
	return c.Fetch(ctx, scopes)
}

// Check implements broker.Checker. A credential that has not fetched yet is
// checked with a client made for the check and let go: one check per token
// endpoint is no reason for every credential to keep a client.
func (f *fetcher) Check(ctx context.Context) error {
	c := f.client.Load()
	if c == nil {
		var err error
		if c, err = upstream.New(upstreamConfig(f.cr, f.ring, f.env)); err != nil {
			return err
		}
	}
	return c.Check(ctx)
}

// upstreamConfig is the upstream client configuration of credential c.
func upstreamConfig(c *config.Credential, ring *dpop.Keyring, env *upstreamEnv) upstream.Config {
	var params url.Values // nil without endpoint_params: a map each adds up over thousands of credentials
	for k, v := range c.EndpointParams {
		if params == nil {
			params = url.Values{}
		}
		params.Set(k, v)
	}
	return upstream.Config{
		TokenURL:          c.TokenURL,
		ClientID:          c.ClientID,
		ClientSecretFile:  c.ClientSecretFile,
		ClientSecretFiles: c.ClientSecretFiles,
		AuthMethod:        upstream.AuthMethod(c.AuthMethod),
		PrivateKeyFile:    c.PrivateKeyFile,
		JWTAlg:            c.JWTAlg,
		KeyID:             c.KeyID,
		JWTAudience:       c.JWTAudience,
		TLSClientCertFile: c.TLSClientCertFile,
		TLSClientKeyFile:  c.TLSClientKeyFile,
		TLSCAFile:         c.TLSCAFile,
		EndpointParams:    params,
		DefaultTTL:        c.DefaultTTL.D(),
		MaxTTL:            c.MaxTTL.D(),
		ExpiryMargin:      c.ExpiryMargin.D(),
		Timeout:           c.Timeout.D(),
		Now:               env.now,
		TracerProvider:    env.tp,
		DPoP:              ring,
	}
}
