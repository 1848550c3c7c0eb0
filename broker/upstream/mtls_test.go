package upstream

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

// mtlsServer is oauthtest over https, trusting clientCA for client certificates.
func mtlsServer(t *testing.T, clientCA *devpki.CA) (*oauthtest.Server, string) {
	t.Helper()
	serverCA, err := devpki.NewCA("bank CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := serverCA.Server(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	as := oauthtest.New(oauthtest.Options{})
	if err := as.StartTLS("127.0.0.1:0", cert, clientCA.Pool()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = as.Close() })
	caFile := filepath.Join(t.TempDir(), "bank-ca.pem")
	if err := serverCA.WriteCertFile(caFile); err != nil {
		t.Fatal(err)
	}
	return as, caFile
}

func TestTLSClientAuth(t *testing.T) {
	clientCA, err := devpki.NewCA("client CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := devpki.NewCA("other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	as, bankCA := mtlsServer(t, clientCA)
	as.AddClient(oauthtest.Client{ID: "mtls-app", TLSSubject: "broker.bank.internal", Scopes: []string{"IDENTITY"}})

	client := func(ca *devpki.CA, name string) *Client {
		t.Helper()
		pair, err := ca.Client(time.Hour, name)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		cf, kf := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
		if err := pair.WriteFiles(cf, kf); err != nil {
			t.Fatal(err)
		}
		c, err := New(Config{TokenURL: as.TokenURL(), ClientID: "mtls-app", AuthMethod: TLSClientAuth,
			TLSClientCertFile: cf, TLSClientKeyFile: kf, TLSCAFile: bankCA})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx := context.Background()
	tok, err := client(clientCA, "broker.bank.internal").Fetch(ctx, []string{"IDENTITY"})
	if err != nil {
		t.Fatalf("tls_client_auth: %v", err)
	}
	if is, ok := as.Lookup(tok.AccessToken); !ok || is.AuthMethod != "tls_client_auth" || as.LastForm().Get("client_id") != "mtls-app" {
		t.Errorf("issued %+v, form %v", is, as.LastForm())
	}
	for name, c := range map[string]*Client{
		"untrusted CA":  client(otherCA, "broker.bank.internal"),
		"wrong subject": client(clientCA, "someone.else.internal"),
	} {
		_, err := c.Fetch(ctx, nil)
		var ue *Error
		if !errors.As(err, &ue) || ue.Code != "invalid_client" || ue.Temporary {
			t.Errorf("%s: %v, want invalid_client", name, err)
		}
	}
	broken, err := New(Config{TokenURL: as.TokenURL(), ClientID: "mtls-app", AuthMethod: TLSClientAuth,
		TLSClientCertFile: "/nonexistent.pem", TLSClientKeyFile: "/nonexistent-key.pem", TLSCAFile: bankCA})
	if err != nil {
		t.Fatal(err)
	}
	before := as.TokenRequests()
	_, err = broken.Fetch(ctx, nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonNoSecret || as.TokenRequests() != before {
		t.Errorf("unreadable client certificate: %v, want a local error and no request", err)
	}
}
