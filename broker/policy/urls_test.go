package policy

import (
	"net/url"
	"testing"
)

func TestURLPrefixes(t *testing.T) {
	must := func(s string) URLPrefix {
		p, err := ParseURLPrefix(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	m, err := CompileRules([]Rule{
		{Pattern: "spiffe://td/ns/payments/sa/api", URLs: []URLPrefix{must("https://api.bank.example/v1/payments"), must("https://API.bank.example:443/v1/fx/")}},
		{Pattern: "spiffe://td/ns/kyc/*", URLs: []URLPrefix{must("https://api.bank.example/v1/identity")}},
		{Pattern: "spiffe://td/ns/kyc/sa/admin"}, // also under kyc/*: its unrestricted rule wins
		{Pattern: "dns:reporting.internal", URLs: []URLPrefix{must("https://api.bank.example")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id, url string
		want    bool
	}{
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/payments", true},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/payments/7/status", true},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example:443/v1/payments", true},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/paymentsx", false},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/payments/../identity", false},
		{"spiffe://td/ns/payments/sa/api", "http://api.bank.example/v1/payments", false},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example.evil/v1/payments", false},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example:8443/v1/payments", false},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/fx/rates", true},
		{"spiffe://td/ns/payments/sa/api", "https://api.bank.example/v1/identity", false},
		{"spiffe://td/ns/kyc/sa/worker", "https://api.bank.example/v1/identity/x", true},
		{"spiffe://td/ns/kyc/sa/worker", "https://api.bank.example/v1/payments", false},
		{"spiffe://td/ns/kyc/sa/admin", "https://other.example/anything", true},
		{"dns:reporting.internal", "https://api.bank.example/anything", true},
		{"dns:reporting.internal", "https://api.bank.example", true},
		{"spiffe://td/ns/other", "https://api.bank.example/v1/payments", false},
	} {
		u, _ := url.Parse(tc.url)
		if got := m.AllowsURL(Identity(tc.id), u); got != tc.want {
			t.Errorf("AllowsURL(%s, %s) = %v, want %v", tc.id, tc.url, got, tc.want)
		}
	}
	for _, bad := range []string{"api.bank.example/v1", "ftp://h/x", "https://u:p@h/x", "https://h/x?q=1", "https://h/x#f", "https://h/v1/*", "https://h/a/../b"} {
		if _, err := ParseURLPrefix(bad); err == nil {
			t.Errorf("ParseURLPrefix(%q) accepted", bad)
		}
	}
}
