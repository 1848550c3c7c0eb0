package policy

import (
	"crypto/x509"
	"errors"
	"net/url"
	"testing"
)

func TestMatcher(t *testing.T) {
	m, err := Compile([]string{
		"spiffe://bank.internal/ns/payments/sa/api",
		"spiffe://bank.internal/ns/kyc/*",
		"dns:Reporting.internal",
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		id   Identity
		want bool
	}{
		{"spiffe://bank.internal/ns/payments/sa/api", true},
		{"spiffe://bank.internal/ns/payments/sa/api2", false},
		{"spiffe://bank.internal/ns/payments/sa", false},
		{"spiffe://bank.internal/ns/kyc/sa/worker", true},
		{"spiffe://bank.internal/ns/kyc/a", true},
		{"spiffe://bank.internal/ns/kyc", false},
		{"spiffe://bank.internal/ns/kyc/", false},
		{"spiffe://bank.internal/ns/kycx/a", false},
		{"spiffe://other.internal/ns/kyc/a", false},
		{"dns:reporting.internal", true},
		{"dns:reporting.internal.evil", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := m.Allows(tt.id); got != tt.want {
			t.Errorf("Allows(%q) = %v, want %v", tt.id, got, tt.want)
		}
	}
	var none *Matcher
	if none.Allows("spiffe://bank.internal/ns/kyc/a") {
		t.Error("nil Matcher admitted a caller")
	}
}

func TestCompileRejects(t *testing.T) {
	for _, p := range []string{
		"", "*", "spiffe://", "spiffe://td/a/*/b", "spiffe://td/a*", "spiffe://td:8080/a",
		"spiffe://td//a", "spiffe://td/a/../b", "https://td/a", "dns:", "dns:*.bank.internal",
		"spiffe://td/a?x=1",
	} {
		if _, err := Compile([]string{p}); err == nil {
			t.Errorf("Compile(%q) = nil error, want one", p)
		}
	}
}

func TestIdentityFromCert(t *testing.T) {
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	tests := []struct {
		name    string
		cert    *x509.Certificate
		want    Identity
		wantErr error
	}{
		{"spiffe", &x509.Certificate{URIs: []*url.URL{u("spiffe://td/a")}, DNSNames: []string{"x"}}, "spiffe://td/a", nil},
		{"dns", &x509.Certificate{DNSNames: []string{"API.internal", "b"}}, "dns:api.internal", nil},
		{"non-spiffe URI falls back to DNS", &x509.Certificate{URIs: []*url.URL{u("https://x/y")}, DNSNames: []string{"a"}}, "dns:a", nil},
		{"two URIs", &x509.Certificate{URIs: []*url.URL{u("spiffe://td/a"), u("spiffe://td/b")}}, "", ErrAmbiguousIdentity},
		{"nothing", &x509.Certificate{}, "", ErrNoIdentity},
	}
	for _, tt := range tests {
		got, err := IdentityFromCert(tt.cert)
		if got != tt.want || !errors.Is(err, tt.wantErr) {
			t.Errorf("%s: IdentityFromCert = %q, %v; want %q, %v", tt.name, got, err, tt.want, tt.wantErr)
		}
	}
}
