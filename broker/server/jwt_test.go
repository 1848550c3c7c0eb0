package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

func ecKeyPEM(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func TestPrivateKeyJWTEndToEnd(t *testing.T) {
	key, keyPEM := ecKeyPEM(t)
	keyFile := filepath.Join(t.TempDir(), "signing-key.pem")
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		cr := &c.Credentials[0]
		cr.ClientID, cr.AuthMethod, cr.PrivateKeyFile, cr.KeyID = "jwt-app", "private_key_jwt", keyFile, "2026-11"
		cr.ClientSecretFile = ""
	})
	h.as.AddClient(oauthtest.Client{ID: "jwt-app", PublicKey: key.Public(), Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
	_, otherPEM := ecKeyPEM(t)
	h.secrets = append(h.secrets, string(keyPEM), string(otherPEM))

	c := h.client(payments)
	tok, err := h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY"}})
	if err != nil {
		t.Fatalf("GetToken with private_key_jwt: %v", err)
	}
	if is, ok := h.as.Lookup(tok.GetAccessToken()); !ok || is.AuthMethod != "private_key_jwt" || is.ClientID != "jwt-app" {
		t.Errorf("issued %+v, want jwt-app by private_key_jwt", is)
	}

	// The key file now holds a key the bank does not know: refused, clearly.
	if err := os.WriteFile(keyFile, otherPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = h.get(c, &pb.GetTokenRequest{Credential: "identity", Scopes: []string{"IDENTITY_READ"}})
	if st := status.Convert(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), `refused credential "identity" (invalid_client)`) {
		t.Errorf("with an unregistered key: %v %q, want FailedPrecondition invalid_client", st.Code(), st.Message())
	}
	if !strings.Contains(h.logs.String(), `"oauth_error":"invalid_client"`) {
		t.Error("no log line naming invalid_client")
	}
}

// tlsBank is an https authorization server whose certificate chains to its
// own CA and which admits tls_client_auth clients whose certificates chain
// to clientCA.
type tlsBank struct {
	*oauthtest.Server
	ca *devpki.CA
}

func startTLSBank(t *testing.T, clientCA *devpki.CA) tlsBank {
	t.Helper()
	bankCA, err := devpki.NewCA("bank CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srvPair, err := bankCA.Server(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srvCert, err := srvPair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	bank := oauthtest.New(oauthtest.Options{})
	if err := bank.StartTLS("127.0.0.1:0", srvCert, clientCA.Pool()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bank.Close() })
	bank.AddClient(oauthtest.Client{ID: "mtls-app", TLSSubject: "broker.bank.internal", Scopes: []string{"IDENTITY", "IDENTITY_READ"}})
	return tlsBank{Server: bank, ca: bankCA}
}

// brokerFor starts a broker whose credential authenticates to the bank with
// tls_client_auth, with a client certificate from ca.
func (b tlsBank) brokerFor(t *testing.T, ca *devpki.CA) *harness {
	t.Helper()
	dir := t.TempDir()
	pair, err := ca.Client(time.Hour, "broker.bank.internal")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, caFile := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem"), filepath.Join(dir, "bank-ca.pem")
	if err := pair.WriteFiles(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	if err := b.ca.WriteCertFile(caFile); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) {
		cr := &c.Credentials[0]
		cr.TokenURL, cr.ClientID, cr.AuthMethod, cr.ClientSecretFile = b.TokenURL(), "mtls-app", "tls_client_auth", ""
		cr.TLSClientCertFile, cr.TLSClientKeyFile, cr.TLSCAFile = certFile, keyFile, caFile
	})
	h.secrets = append(h.secrets, string(pair.KeyPEM))
	return h
}

func TestTLSClientAuthEndToEnd(t *testing.T) {
	clientCA, err := devpki.NewCA("broker client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := devpki.NewCA("unknown CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	bank := startTLSBank(t, clientCA)

	good := bank.brokerFor(t, clientCA)
	tok, err := good.get(good.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if err != nil {
		t.Fatalf("GetToken with tls_client_auth: %v", err)
	}
	if is, ok := bank.Lookup(tok.GetAccessToken()); !ok || is.AuthMethod != "tls_client_auth" {
		t.Errorf("issued %+v, want tls_client_auth", is)
	}

	// A certificate from a CA the bank does not trust: refused, clearly.
	bad := bank.brokerFor(t, otherCA)
	_, err = bad.get(bad.client(payments), &pb.GetTokenRequest{Credential: "identity"})
	if st := status.Convert(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), "(invalid_client)") {
		t.Errorf("with an untrusted client certificate: %v %q, want FailedPrecondition invalid_client", st.Code(), st.Message())
	}
	if !strings.Contains(bad.logs.String(), `"oauth_error":"invalid_client"`) {
		t.Error("no log line naming invalid_client")
	}
}
