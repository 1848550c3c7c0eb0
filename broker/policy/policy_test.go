package policy

import (
	"crypto/x509"
	"errors"
	"net/url"
	"strings"
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

func TestGrantScopes(t *testing.T) {
	m, err := CompileRules([]Rule{
		{Pattern: "spiffe://td/ns/kyc/*", Scopes: []string{"READ", "IDENTITY"}},
		{Pattern: "spiffe://td/ns/kyc/sa/admin", Scopes: []string{"ADMIN"}},
		{Pattern: "spiffe://td/ns/payments/sa/api"},
		{Pattern: "spiffe://td/ns/payments/*", Scopes: []string{"READ"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		id       Identity
		ok       bool
		scopes   string // joined; "" with ok means all
		wantRule int
	}{
		{"spiffe://td/ns/kyc/sa/worker", true, "IDENTITY READ", 0},
		{"spiffe://td/ns/kyc/sa/admin", true, "ADMIN IDENTITY READ", -1}, // two restricted rules: the union
		{"spiffe://td/ns/payments/sa/api", true, "", -1},                 // an unrestricted rule wins
		{"spiffe://td/ns/payments/sa/batch", true, "READ", 3},
		{"spiffe://td/ns/other/sa/x", false, "", 0},
	}
	for _, tt := range tests {
		g, ok := m.Grant(tt.id)
		if ok != tt.ok || strings.Join(g.Scopes, " ") != tt.scopes || (ok && g.Rule != tt.wantRule) {
			t.Errorf("Grant(%s) = %+v, %v; want %v, scopes %q, rule %d", tt.id, g, ok, tt.ok, tt.scopes, tt.wantRule)
		}
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
