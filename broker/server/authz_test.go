package server

import (
	"context"
	"crypto/tls"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// streamEnd waits up to within for the stream's end and returns its error.
func streamEnd(t *testing.T, toks <-chan *pb.Token, errs <-chan error, within time.Duration) (error, int) {
	t.Helper()
	extra := 0
	deadline := time.After(within)
	for {
		select {
		case <-toks:
			extra++
		case err := <-errs:
			return err, extra
		case <-deadline:
			t.Fatalf("the stream did not end within %s", within)
		}
	}
}

// TestWatchStreamsReauthorizedOnReload: an open WatchToken stream whose caller
// loses access by a configuration reload ends with PERMISSION_DENIED within a
// second, gets no token and makes no token request afterwards, and its end is
// audited.
func TestWatchStreamsReauthorizedOnReload(t *testing.T) {
	for _, tt := range []struct {
		name   string
		caller string
		scopes []string
		change func(c *config.Credential) // applied to the reloaded credential
		remove bool                       // the credential leaves the configuration
	}{
		{name: "caller removed", caller: payments, change: func(c *config.Credential) {
			c.AllowedCallers = slices.DeleteFunc(slices.Clone(c.AllowedCallers), func(a config.AllowedCaller) bool { return a.Caller == payments })
		}},
		{name: "scope no longer granted", caller: readOnly, scopes: []string{"IDENTITY_READ"}, change: func(c *config.Credential) {
			c.AllowedCallers = slices.Clone(c.AllowedCallers)
			for i, a := range c.AllowedCallers {
				if a.Caller == readOnly {
					c.AllowedCallers[i].Scopes = []string{"IDENTITY"}
				}
			}
		}},
		{name: "credential removed", caller: payments, remove: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(c *config.Config) {
				// A second credential keeps the configuration valid when the first goes.
				other := c.Credentials[0]
				other.Name = "other"
				other.AllowedCallers = []config.AllowedCaller{{Caller: stranger}}
				c.Credentials = append(c.Credentials, other)
			})
			c := h.client(tt.caller)
			toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity", Scopes: tt.scopes})
			recvToken(t, toks, errs)
			// A denial just before: the revocation is still audited whole,
			// not folded into this caller's aggregated denials.
			if _, err := h.get(c, &pb.GetTokenRequest{Credential: "nope"}); status.Code(err) != codes.PermissionDenied {
				t.Fatalf("GetToken of an unknown credential: %v", err)
			}

			next := *h.cfg
			next.Credentials = slices.Clone(h.cfg.Credentials)
			if tt.remove {
				next.Credentials = next.Credentials[1:]
			} else {
				tt.change(&next.Credentials[0])
			}
			before := h.as.TokenRequests()
			if err := h.srv.Reload(&next); err != nil {
				t.Fatal(err)
			}
			err, extra := streamEnd(t, toks, errs, time.Second)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "stream revoked") {
				t.Fatalf("stream ended with %v, want PERMISSION_DENIED saying it was revoked", err)
			}
			if extra != 0 {
				t.Errorf("%d tokens sent after the reload", extra)
			}
			// Time passes beyond the token's lifetime: nothing is fetched for the stream.
			h.clock.Add(tokenTTL)
			h.srv.broker.RefreshDue(context.Background())
			if got := h.as.TokenRequests() - before; got != 0 {
				t.Errorf("%d token requests after the stream was revoked, want 0", got)
			}
			waitFor(t, "the revoked stream in the audit trail", func() bool {
				return strings.Contains(h.audit.String(), `"event":"token.denied"`) && strings.Contains(h.audit.String(), "WatchToken stream revoked by a configuration change")
			})
		})
	}
}

// TestWatchStreamKeptWhenStillAllowed: a reload that keeps the caller's access
// does not end its stream.
func TestWatchStreamKeptWhenStillAllowed(t *testing.T) {
	h := newHarness(t, nil)
	toks, errs, _ := watch(t, h.client(payments), &pb.WatchTokenRequest{Credential: "identity"})
	first := recvToken(t, toks, errs)
	next := *h.cfg
	next.Credentials = slices.Clone(h.cfg.Credentials)
	next.Credentials[0].AllowedCallers = append(slices.Clone(next.Credentials[0].AllowedCallers), config.AllowedCaller{Caller: stranger})
	if err := h.srv.Reload(&next); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errs:
		t.Fatalf("the stream of a caller still allowed ended: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	// It still gets the replacement.
	h.clock.Add(tokenTTL - 20*time.Second)
	h.srv.broker.RefreshDue(context.Background())
	if tok := recvToken(t, toks, errs); tok.GetFingerprint() == first.GetFingerprint() {
		t.Error("the replacement was the same token")
	}
}

// TestScopesCannotBeEnumerated: a scope outside the caller's grant is refused
// with one code and one message whether or not the credential has it.
func TestScopesCannotBeEnumerated(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(readOnly) // granted IDENTITY_READ only
	const fp = "0123456789abcdef0123456789abcdef"
	call := map[string]func(scope string) error{
		"GetToken": func(scope string) error {
			_, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{scope}})
			return err
		},
		"WatchToken": func(scope string) error {
			_, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity", Scopes: []string{scope}})
			select {
			case err := <-errs:
				return err
			case <-time.After(5 * time.Second):
				return nil
			}
		},
		"InvalidateToken": func(scope string) error {
			_, err := c.InvalidateToken(context.Background(), &pb.InvalidateTokenRequest{Credential: "identity", Scopes: []string{scope}, Fingerprint: fp})
			return err
		},
	}
	for name, f := range call {
		existing, missing := f("IDENTITY"), f("NO_SUCH_SCOPE")
		for _, err := range []error{existing, missing} {
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("%s: %v, want PERMISSION_DENIED", name, err)
			}
		}
		norm := func(err error, scope string) string {
			return strings.Replace(status.Convert(err).Message(), scope, "SCOPE", 1)
		}
		if a, b := norm(existing, "IDENTITY"), norm(missing, "NO_SUCH_SCOPE"); a != b {
			t.Errorf("%s: the messages differ: %q for a scope the credential has, %q for one it has not", name, a, b)
		}
	}
}

// newCAFile makes a CA and writes its certificate to name in h's directory.
func (h *harness) newCA(name string) *devpki.CA {
	h.t.Helper()
	ca, err := devpki.NewCA(name, time.Hour)
	if err != nil {
		h.t.Fatal(err)
	}
	return ca
}

// writeCAs writes the certificates of cas to file name.
func (h *harness) writeCAs(name string, cas ...*devpki.CA) string {
	h.t.Helper()
	var pem []byte
	for _, ca := range cas {
		pem = append(pem, ca.CertPEM...)
	}
	h.write(name, string(pem))
	return h.path(name)
}

// dialCert dials the first broker with a client certificate from ca for ids,
// valid for validity.
func (h *harness) dialCert(ca *devpki.CA, validity time.Duration, ids ...string) pb.TokenBrokerClient {
	h.t.Helper()
	pair, err := ca.Client(validity, ids...)
	if err != nil {
		h.t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		h.t.Fatal(err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool(), Certificates: []tls.Certificate{cert}}
	conn, err := grpc.NewClient(h.srv.GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = conn.Close() })
	return pb.NewTokenBrokerClient(conn)
}

// TestTrustDomainsBoundToTheirBundles: with client_trust_bundles, a
// certificate from one trust domain's CA cannot claim another trust domain's
// SPIFFE ID; with both CAs in client_ca_file it can (what README warns of).
func TestTrustDomainsBoundToTheirBundles(t *testing.T) {
	const partner = "spiffe://partner.example/ns/settlement/sa/api"
	req := &pb.GetTokenRequest{Credential: "identity"}
	var partnerCA *devpki.CA
	h := newHarness(t, func(c *config.Config) {
		c.Credentials[0].AllowedCallers = append(c.Credentials[0].AllowedCallers, config.AllowedCaller{Caller: partner})
	})
	partnerCA = h.newCA("partner CA")

	// One client_ca_file holding both CAs: either vouches for any identity.
	h.writeCAs("ca.pem", h.ca, partnerCA)
	if _, err := h.srv.ReloadTLS(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.get(h.dialCert(partnerCA, time.Hour, payments), req); err != nil {
		t.Fatalf("with a shared client_ca_file the partner CA should vouch for %s (the risk README names): %v", payments, err)
	}

	// Per-trust-domain bundles: each CA vouches for its own trust domain only.
	h2 := newHarness(t, func(c *config.Config) {
		c.Credentials[0].AllowedCallers = append(c.Credentials[0].AllowedCallers, config.AllowedCaller{Caller: partner})
	})
	bankFile := h2.writeCAs("bank-bundle.pem", h2.ca)
	partnerFile := h2.writeCAs("partner-bundle.pem", partnerCA)
	next := *h2.cfg
	next.TLS.ClientCAFile = ""
	next.TLS.ClientTrustBundles = []config.TrustBundle{{TrustDomain: "bank.internal", CAFile: bankFile}, {TrustDomain: "partner.example", CAFile: partnerFile}}
	h2.stop()
	h2.cfg = &next
	h2.srv, h2.stop = h2.startBroker()

	for _, tt := range []struct {
		name string
		ca   *devpki.CA
		id   string
		code codes.Code
	}{
		{"own CA, own trust domain", h2.ca, payments, codes.OK},
		{"partner CA claiming the bank's trust domain", partnerCA, payments, codes.Unavailable}, // handshake refused
		{"partner CA, partner trust domain", partnerCA, partner, codes.OK},
		{"bank CA claiming the partner's trust domain", h2.ca, partner, codes.Unavailable},
		{"a DNS identity without client_ca_file", h2.ca, "reporting.internal", codes.Unavailable},
		{"a trust domain with no bundle", h2.ca, "spiffe://elsewhere.example/x", codes.Unavailable},
	} {
		_, err := h2.get(h2.dialCert(tt.ca, time.Hour, tt.id), req)
		if status.Code(err) != tt.code {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.code)
		}
	}
}

// TestSPIFFEIDsParsedStrictly: spellings of an allowed SPIFFE ID that a loose
// parser would normalise get no identity.
func TestSPIFFEIDsParsedStrictly(t *testing.T) {
	h := newHarness(t, nil)
	req := &pb.GetTokenRequest{Credential: "identity"}
	for _, id := range []string{
		"SPIFFE://bank.internal/ns/payments/sa/api",
		"spiffe://bank.internal/ns/%70ayments/sa/api",
		"spiffe://BANK.internal/ns/payments/sa/api",
	} {
		_, err := h.get(h.client(id), req)
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: %v, want UNAUTHENTICATED", id, err)
		}
	}
}

// TestCARemovedClosesOpenConnections: a reload of the client CA file that
// drops a CA closes, within a second, every open connection whose chain it
// verified, streams included; other connections stay.
func TestCARemovedClosesOpenConnections(t *testing.T) {
	h := newHarness(t, nil)
	second := h.newCA("second CA")
	h.writeCAs("ca.pem", h.ca, second)
	if _, err := h.srv.ReloadTLS(); err != nil {
		t.Fatal(err)
	}
	req := &pb.GetTokenRequest{Credential: "identity"}
	doomed, kept := h.dialCert(second, time.Hour, payments), h.dialCert(h.ca, time.Hour, payments)
	for _, c := range []pb.TokenBrokerClient{doomed, kept} {
		if _, err := h.get(c, req); err != nil {
			t.Fatal(err)
		}
	}
	toks, errs, _ := watch(t, doomed, &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)

	h.writeCAs("ca.pem", h.ca)
	if changed, err := h.srv.ReloadTLS(); !changed || err != nil {
		t.Fatalf("ReloadTLS = %v, %v", changed, err)
	}
	if err, _ := streamEnd(t, toks, errs, time.Second); status.Code(err) != codes.Unavailable {
		t.Errorf("the stream on the removed CA's connection ended with %v, want UNAVAILABLE (connection closed)", err)
	}
	if _, err := h.get(doomed, req); err == nil {
		t.Error("a call from the removed CA's certificate succeeded after the reload")
	}
	if _, err := h.get(kept, req); err != nil {
		t.Errorf("a connection of the CA still trusted: %v", err)
	}
	if got := h.metric(t, "tokenbroker_connections_closed_total", "reason=client_trust_removed"); got != 1 {
		t.Errorf("tokenbroker_connections_closed_total{reason=client_trust_removed} = %v, want 1", got)
	}
}

// TestExpiredClientCertificateClosesConnection: a connection whose client
// certificate passes its notAfter is closed (its stream ends) and no call on
// it succeeds afterwards.
func TestExpiredClientCertificateClosesConnection(t *testing.T) {
	h := newHarness(t, nil)
	c := h.dialCert(h.ca, 2*time.Second, payments)
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)
	if err, _ := streamEnd(t, toks, errs, 5*time.Second); status.Code(err) != codes.Unavailable {
		t.Errorf("the stream ended with %v, want UNAVAILABLE (connection closed at the certificate's expiry)", err)
	}
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err == nil {
		t.Error("a call with an expired client certificate succeeded")
	}
	if got := h.metric(t, "tokenbroker_connections_closed_total", "reason=client_certificate_expired"); got != 1 {
		t.Errorf("tokenbroker_connections_closed_total{reason=client_certificate_expired} = %v, want 1", got)
	}
}

// TestMaxConnectionAge: a connection is sent away after tls.max_connection_age
// and closed after the grace; a stream on it ends and the client reconnects.
func TestMaxConnectionAge(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.TLS.MaxConnectionAge = config.Duration(time.Second)
		c.TLS.MaxConnectionAgeGrace = config.Duration(500 * time.Millisecond)
	})
	c := h.client(payments)
	toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)
	if err, _ := streamEnd(t, toks, errs, 5*time.Second); status.Code(err) != codes.Unavailable {
		t.Errorf("the stream ended with %v, want UNAVAILABLE at the connection's age", err)
	}
	if _, err := h.get(c, &pb.GetTokenRequest{Credential: "identity"}); err != nil {
		t.Errorf("after the connection aged out the client should reconnect: %v", err)
	}
}
