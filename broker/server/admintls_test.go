package server

import (
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
)

// TestAdminTLS serves the admin address over TLS with a scrapers' CA:
// probes need no certificate, /metrics does, a certificate from another CA
// (the callers') gets no metrics, plain HTTP gets nothing, and a
// new scrapers' CA takes effect without a restart.
func TestAdminTLS(t *testing.T) {
	scrapers, err := devpki.NewCA("scrapers", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		dir := t.TempDir()
		ca := dir + "/scrapers.pem"
		if err := scrapers.WriteCertFile(ca); err != nil {
			t.Fatal(err)
		}
		c.AdminTLS = config.AdminTLS{CertFile: c.TLS.CertFile, KeyFile: c.TLS.KeyFile, ClientCAFile: ca}
	})
	base := "https://" + h.srv.AdminAddr().String()
	client := func(ca *devpki.CA) *http.Client {
		tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: h.ca.Pool()}
		if ca != nil {
			pair, err := ca.Client(time.Hour, "spiffe://bank.internal/ns/monitoring/sa/prometheus")
			if err != nil {
				t.Fatal(err)
			}
			cert, err := pair.TLSCertificate()
			if err != nil {
				t.Fatal(err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		tr := &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 10 * time.Second}
	}
	get := func(c *http.Client, path string) (int, string, error) {
		resp, err := c.Get(base + path)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}

	anon := client(nil)
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body, err := get(anon, path); err != nil || code != http.StatusOK {
			t.Errorf("GET %s without a client certificate = %d %q, %v; want 200 (the kubelet presents none)", path, code, body, err)
		}
	}
	if code, body, err := get(anon, "/metrics"); err != nil || code != http.StatusForbidden || !strings.Contains(body, "admin_tls.client_ca_file") {
		t.Errorf("GET /metrics without a client certificate = %d %q, %v; want 403 naming admin_tls.client_ca_file", code, body, err)
	}
	prom := client(scrapers)
	if code, body, err := get(prom, "/metrics"); err != nil || code != http.StatusOK || !strings.Contains(body, "tokenbroker_") {
		t.Errorf("GET /metrics with a scraper's certificate = %d, %v; want 200 with the metrics", code, err)
	}
	// A client holding only a certificate from another CA (the callers') sends
	// none, since the server names the scrapers' CA; either way, no metrics.
	if code, _, err := get(client(h.ca), "/metrics"); err == nil && code != http.StatusForbidden {
		t.Errorf("GET /metrics with a callers' certificate = %d; want 403 or a refused handshake", code)
	}
	// One that sends it anyway fails the handshake.
	pair, err := h.ca.Client(time.Hour, payments)
	if err != nil {
		t.Fatal(err)
	}
	forced, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	pushy := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: h.ca.Pool(),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &forced, nil }}}}
	if code, _, err := get(pushy, "/metrics"); err == nil {
		t.Errorf("GET /metrics presenting a callers' certificate = %d; want the handshake refused", code)
	}
	if resp, err := http.Get("http://" + h.srv.AdminAddr().String() + "/metrics"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP /metrics = 200 %q; want nothing served without TLS", b)
		}
	}

	// The scrapers' CA rotates: the new one works at once, the old one no more.
	next, err := devpki.NewCA("scrapers 2", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := next.WriteCertFile(h.cfg.AdminTLS.ClientCAFile); err != nil {
		t.Fatal(err)
	}
	if code, _, err := get(client(next), "/metrics"); err != nil || code != http.StatusOK {
		t.Errorf("after the CA file changed, the new CA's scraper got %d, %v; want 200", code, err)
	}
	if code, _, err := get(client(scrapers), "/metrics"); err == nil && code != http.StatusForbidden {
		t.Errorf("after the CA file changed, the old CA's scraper got %d; want 403 or a refused handshake", code)
	}
	// A file caught halfway through a renewal keeps the last good material.
	if err := os.WriteFile(h.cfg.AdminTLS.ClientCAFile, []byte("-----BEGIN CERTIFICATE-----\ntruncated"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, err := get(client(next), "/metrics"); err != nil || code != http.StatusOK {
		t.Errorf("with a broken CA file, the last good CA's scraper got %d, %v; want 200", code, err)
	}
}
