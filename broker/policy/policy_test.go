package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
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
		"spiffe://td/a?x=1", "SPIFFE://td/a", "spiffe://TD/a", "spiffe://td/%70ayments", "spiffe://td/a/./b",
	} {
		if _, err := Compile([]string{p}); err == nil {
			t.Errorf("Compile(%q) = nil error, want one", p)
		}
	}
}

// certWith returns a parsed certificate with these SANs, encoded by
// crypto/x509 as written (a url.URL keeps the scheme's case and a RawPath).
func certWith(t *testing.T, uris []*url.URL, dns []string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute),
		NotAfter: time.Now().Add(time.Hour), URIs: uris, DNSNames: dns}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
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
		uris    []*url.URL
		dns     []string
		want    Identity
		wantErr error // nil: none; errAny: some error
	}{
		{"spiffe", []*url.URL{u("spiffe://td/a")}, []string{"x"}, "spiffe://td/a", nil},
		{"dns", nil, []string{"API.internal", "b"}, "dns:api.internal", nil},
		{"non-spiffe URI falls back to DNS", []*url.URL{u("https://x/y")}, []string{"a"}, "dns:a", nil},
		{"two URIs", []*url.URL{u("spiffe://td/a"), u("spiffe://td/b")}, nil, "", ErrAmbiguousIdentity},
		{"nothing", nil, nil, "", ErrNoIdentity},
		// Spellings that url.Parse would normalise into a valid ID are no identity.
		{"uppercase scheme", []*url.URL{{Scheme: "SPIFFE", Host: "td", Path: "/payments"}}, []string{"x"}, "", errAny},
		{"percent-encoded path", []*url.URL{{Scheme: "spiffe", Host: "td", Path: "/payments", RawPath: "/%70ayments"}}, []string{"x"}, "", errAny},
		{"uppercase trust domain", []*url.URL{{Scheme: "spiffe", Host: "TD", Path: "/payments"}}, []string{"x"}, "", errAny},
		{"dot segment", []*url.URL{{Scheme: "spiffe", Host: "td", Path: "/a/../payments"}}, nil, "", errAny},
		{"empty segment", []*url.URL{{Scheme: "spiffe", Host: "td", Path: "/a//b"}}, nil, "", errAny},
		{"port", []*url.URL{u("spiffe://td:443/a")}, nil, "", errAny},
	}
	for _, tt := range tests {
		got, err := IdentityFromCert(certWith(t, tt.uris, tt.dns))
		switch {
		case got != tt.want:
			t.Errorf("%s: IdentityFromCert = %q, %v; want %q", tt.name, got, err, tt.want)
		case tt.wantErr == errAny && err == nil:
			t.Errorf("%s: IdentityFromCert = %q, nil error; want an error", tt.name, got)
		case tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
			t.Errorf("%s: IdentityFromCert error = %v, want %v", tt.name, err, tt.wantErr)
		}
	}
}

var errAny = errors.New("any error")

func TestTrustDomain(t *testing.T) {
	for id, want := range map[Identity]string{"spiffe://bank.internal/ns/a": "bank.internal", "spiffe://td": "td", "dns:api.internal": ""} {
		if got := id.TrustDomain(); got != want {
			t.Errorf("%s.TrustDomain() = %q, want %q", id, got, want)
		}
	}
}

// TestManyExactRules: with many rules naming identities in no order, and
// one identity named twice, each identity gets exactly its rules' scopes
// (the rules are kept in a sorted slice, found by binary search).
func TestManyExactRules(t *testing.T) {
	var rules []Rule
	for i := range 50 {
		n := (i * 37) % 50 // not sorted
		rules = append(rules, Rule{Pattern: fmt.Sprintf("spiffe://td/sa/w%02d", n), Scopes: []string{fmt.Sprintf("S%02d", n)}})
	}
	rules = append(rules, Rule{Pattern: "spiffe://td/sa/w07", Scopes: []string{"EXTRA"}})
	m, err := CompileRules(rules)
	if err != nil {
		t.Fatal(err)
	}
	for n := range 50 {
		id := Identity(fmt.Sprintf("spiffe://td/sa/w%02d", n))
		g, ok := m.Grant(id)
		want := []string{fmt.Sprintf("S%02d", n)}
		if n == 7 {
			want = []string{"EXTRA", "S07"}
		}
		if !ok || !slices.Equal(g.Scopes, want) {
			t.Errorf("%s: %v %v, want %v", id, g.Scopes, ok, want)
		}
		if n != 7 && (g.Rule < 0 || rules[g.Rule].Pattern != string(id)) {
			t.Errorf("%s: rule %d", id, g.Rule)
		}
	}
	if _, ok := m.Grant("spiffe://td/sa/w50"); ok {
		t.Error("an identity no rule names was admitted")
	}
}
