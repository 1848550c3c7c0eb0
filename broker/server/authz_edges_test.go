package server

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// The edges of authorization after the handshake that a hostile review found:
// a handshake spanning a trust reload, a trusted CA that expires, a call
// waiting out a backoff across a reload, a browser reaching the loopback
// inventory, and a token endpoint echoing the secret.

// stallConn lets its first Write (the ClientHello) through and holds the
// later ones until release is closed: a client that takes its time.
type stallConn struct {
	net.Conn
	mu      sync.Mutex
	writes  int
	first   chan struct{}
	release chan struct{}
}

func (c *stallConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes++
	n := c.writes
	c.mu.Unlock()
	if n == 1 {
		defer close(c.first)
	} else {
		<-c.release
	}
	return c.Conn.Write(p)
}

// TestHandshakeSpanningTrustReload: a client certificate whose CA leaves the
// trust material while its handshake is under way is judged by the new
// material, not by the one in force at its ClientHello.
func TestHandshakeSpanningTrustReload(t *testing.T) {
	h := newHarness(t, nil)
	second := h.newCA("second CA")
	h.writeCAs("ca.pem", h.ca, second)
	if _, err := h.srv.ReloadTLS(); err != nil {
		t.Fatal(err)
	}
	pair, err := second.Client(time.Hour, payments)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	sc := &stallConn{first: make(chan struct{}), release: make(chan struct{})}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: h.ca.Pool(), Certificates: []tls.Certificate{cert}}
	conn, err := grpc.NewClient(h.srv.GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			sc.Conn = raw
			return sc, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := pb.NewTokenBrokerClient(conn)
	done := make(chan error, 1)
	go func() {
		_, err := h.getWithin(c, &pb.GetTokenRequest{Credential: "identity"}, 3*time.Second)
		done <- err
	}()
	<-sc.first
	time.Sleep(300 * time.Millisecond) // the server has the ClientHello and waits for the certificate

	h.writeCAs("ca.pem", h.ca) // the second CA leaves
	if changed, err := h.srv.ReloadTLS(); !changed || err != nil {
		t.Fatalf("ReloadTLS = %v, %v", changed, err)
	}
	close(sc.release)
	if err := <-done; err == nil {
		t.Error("a certificate of the CA removed during its handshake got a token")
	}
	if _, err := h.getWithin(c, &pb.GetTokenRequest{Credential: "identity"}, 3*time.Second); err == nil {
		t.Error("the removed CA's connection gets tokens after the reload")
	}
}

// TestTrustedCAExpiryClosesConnections: the expiry that closes a connection
// is the earliest of the chain it was verified through, the trusted CA's
// included (not only what the client sent).
func TestTrustedCAExpiryClosesConnections(t *testing.T) {
	h := newHarness(t, nil)
	short, err := devpki.NewCA("short-lived CA", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	h.writeCAs("ca.pem", h.ca, short)
	if _, err := h.srv.ReloadTLS(); err != nil {
		t.Fatal(err)
	}
	c := h.dialCert(short, time.Hour, payments)
	req := &pb.GetTokenRequest{Credential: "identity"}
	if _, err := h.get(c, req); err != nil {
		t.Fatal(err)
	}
	toks, errs, _ := watch(t, c, &pb.WatchTokenRequest{Credential: "identity"})
	recvToken(t, toks, errs)
	if err, _ := streamEnd(t, toks, errs, 5*time.Second); err == nil {
		t.Error("the stream outlived its trusted CA")
	}
	if _, err := h.get(c, req); err == nil {
		t.Error("the connection whose trusted CA expired still gets tokens")
	}
}

// TestGetTokenReadmittedAfterBackoff: a GetToken that waits out the token
// endpoint's backoff across a reload removing its credential fetches nothing
// with the removed credential and returns no token.
func TestGetTokenReadmittedAfterBackoff(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		other := c.Credentials[0]
		other.Name = "other"
		other.AllowedCallers = []config.AllowedCaller{{Caller: stranger}}
		c.Credentials = append(c.Credentials, other)
	})
	c := h.client(payments)
	h.as.SetFaults(oauthtest.Faults{Status: 503, RetryAfter: "3"})
	_, _ = h.getWithin(c, &pb.GetTokenRequest{Credential: "identity"}, time.Second)
	done := make(chan error, 1)
	go func() {
		_, err := h.getWithin(c, &pb.GetTokenRequest{Credential: "identity"}, 10*time.Second)
		done <- err
	}()
	time.Sleep(500 * time.Millisecond) // the call waits for the next attempt
	next := *h.cfg
	next.Credentials = slices.Clone(h.cfg.Credentials[1:]) // "identity" removed, secret and all
	before := h.as.TokenRequests()
	if err := h.srv.Reload(&next); err != nil {
		t.Fatal(err)
	}
	h.as.SetFaults(oauthtest.Faults{})
	if err := <-done; err == nil {
		t.Error("a token of a credential removed while the call waited was returned")
	}
	if n := h.as.TokenRequests() - before; n != 0 {
		t.Errorf("%d token requests with the removed credential after the reload, want 0", n)
	}
}

// TestLoopbackInventoryRefusesBrowsers: on a loopback admin address,
// /credentials answers only a loopback Host with no browser's cross-site
// marks, so that DNS rebinding or a page cannot read it.
func TestLoopbackInventoryRefusesBrowsers(t *testing.T) {
	h := newHarness(t, nil)
	get := func(host string, header http.Header) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+h.srv.AdminAddr().String()+"/credentials", nil)
		if host != "" {
			req.Host = host
		}
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tt := range []struct {
		name   string
		host   string
		header http.Header
	}{
		{"rebound name", "attacker.example:9090", nil},
		{"cross-origin fetch", "", http.Header{"Origin": {"https://attacker.example"}}},
		{"cross-site navigation", "", http.Header{"Sec-Fetch-Site": {"cross-site"}}},
	} {
		if code, body := get(tt.host, tt.header); code != http.StatusForbidden || strings.Contains(body, "client_id") {
			t.Errorf("%s: %d %.100s, want 403 and no inventory", tt.name, code, body)
		}
	}
	if code, body := get("localhost:9090", nil); code != http.StatusOK || !strings.Contains(body, "client_id") {
		t.Errorf("curl on the loopback: %d %.100s, want the inventory", code, body)
	}
}

// TestEchoedSecretWithheld: an error_description that repeats the client
// secret is withheld from logs, /readyz and the inventory.
func TestEchoedSecretWithheld(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Admin.Callers = []string{operator} })
	h.as.SetFaults(oauthtest.Faults{ErrorCode: "invalid_client", ErrorDescription: "client broker secret " + h.secret + " expired"})
	_, _ = h.get(h.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if strings.Contains(string(b), h.secret) || !strings.Contains(string(b), "withheld") {
		t.Errorf("/readyz = %s; want the description withheld", b)
	}
	// The harness's cleanup scans every log and audit line for the secret.
}
