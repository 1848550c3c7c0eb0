package server

import (
	"crypto/tls"
	"os"
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

// dialWith dials the first broker with a client certificate for id from
// clientCA, trusting serverCA.
func (h *harness) dialWith(clientCA, serverCA *devpki.CA, id string, maxVersion uint16) pb.TokenBrokerClient {
	h.t.Helper()
	pair, err := clientCA.Client(time.Hour, id)
	if err != nil {
		h.t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		h.t.Fatal(err)
	}
	tc := &tls.Config{RootCAs: serverCA.Pool(), Certificates: []tls.Certificate{cert}, MaxVersion: maxVersion}
	conn, err := grpc.NewClient(h.srv.GRPCAddr().String(), grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = conn.Close() })
	return pb.NewTokenBrokerClient(conn)
}

func TestCertificateRotation(t *testing.T) {
	h := newHarness(t, nil)
	req := &pb.GetTokenRequest{Credential: "identity"}
	open := h.client(payments)
	if _, err := h.get(open, req); err != nil {
		t.Fatal(err)
	}

	// New CA, new server certificate, new client CA file, as a rotation writes them.
	ca2, err := devpki.NewCA("rotated CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := ca2.Server(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := pair.WriteFiles(h.path("server.pem"), h.path("server-key.pem")); err != nil {
		t.Fatal(err)
	}
	if err := ca2.WriteCertFile(h.path("ca.pem")); err != nil {
		t.Fatal(err)
	}
	if changed, err := h.srv.ReloadTLS(); !changed || err != nil {
		t.Fatalf("ReloadTLS = %v, %v; want a change", changed, err)
	}

	// The connection opened before was admitted by the CA that left the
	// client CA file: it is closed, and its reconnection fails.
	if _, err := h.get(open, req); status.Code(err) != codes.Unavailable {
		t.Errorf("the open connection of the removed CA after rotation: %v, want UNAVAILABLE", err)
	}
	// New handshakes use the new material: a caller of the new CA gets in...
	if _, err := h.get(h.dialWith(ca2, ca2, payments, 0), req); err != nil {
		t.Errorf("a new caller with the new CA: %v", err)
	}
	// ...and one that still trusts the old server CA fails the handshake.
	if _, err := h.get(h.dialWith(h.ca, h.ca, payments, 0), req); status.Code(err) != codes.Unavailable {
		t.Errorf("a new caller of the old CA: %v, want a failed handshake", err)
	}

	// A half-written file is rejected and the current material stays.
	if err := os.WriteFile(h.path("server-key.pem"), []byte("-----BEGIN PRIVATE KEY-----\ntrunc"), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := h.srv.ReloadTLS(); changed || err == nil {
		t.Errorf("Reload of a broken key = %v, %v; want an error and no change", changed, err)
	}
	if _, err := h.get(h.dialWith(ca2, ca2, kycWork, 0), req); err != nil {
		t.Errorf("after a failed reload: %v", err)
	}
}

func TestTLS12OnlyWhenAllowed(t *testing.T) {
	for _, minVersion := range []string{"1.3", "1.2"} {
		h := newHarness(t, func(c *config.Config) { c.TLS.MinVersion = minVersion })
		_, err := h.get(h.dialWith(h.ca, h.ca, payments, tls.VersionTLS12), &pb.GetTokenRequest{Credential: "identity"})
		if minVersion == "1.3" && status.Code(err) != codes.Unavailable {
			t.Errorf("a TLS 1.2 caller with min_version 1.3: %v, want a failed handshake", err)
		}
		if minVersion == "1.2" && err != nil {
			t.Errorf("a TLS 1.2 caller with min_version 1.2: %v", err)
		}
	}
}
