package config

import (
	"strings"
	"testing"
)

func TestDPoPConfig(t *testing.T) {
	doc := strings.Replace(valid, "[spiffe://bank.internal/ns/kyc/*]",
		"[{caller: spiffe://bank.internal/ns/kyc/*, urls: [https://api.bank.example/v1/identity]}]", 1) +
		"    dpop: {key_file: /secrets/dpop.pem, alg: EdDSA}\n"
	c, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	cr := c.Credentials[0]
	if cr.DPoP == nil || cr.DPoP.KeyFile != "/secrets/dpop.pem" || cr.DPoP.Alg != "EdDSA" ||
		len(cr.AllowedCallers[0].URLs) != 1 {
		t.Errorf("dpop = %+v, callers %+v", cr.DPoP, cr.AllowedCallers)
	}
	for _, tt := range []struct{ name, doc, want string }{
		{"no key file", valid + "    dpop: {alg: ES256}\n", "credentials[0].dpop.key_file: required"},
		{"bad alg", valid + "    dpop: {key_file: /k, alg: HS256}\n", `credentials[0].dpop.alg: must be ES256 (EC P-256), EdDSA (Ed25519), RS256 or PS256 (RSA); got "HS256"`},
		{"unknown key", valid + "    dpop: {keyfile: /k}\n", "credentials[0].dpop.keyfile: unknown key"},
		{"urls without dpop", strings.Replace(valid, "[spiffe://bank.internal/ns/kyc/*]",
			"[{caller: spiffe://bank.internal/ns/kyc/*, urls: [https://api.bank.example/v1]}]", 1),
			"credentials[0].allowed_callers[0].urls: only for a credential with dpop:"},
		{"bad url", strings.Replace(doc, "https://api.bank.example/v1/identity", "https://api.bank.example/v1/*", 1),
			"credentials[0].allowed_callers[0].urls[0]:"},
		{"url with query", strings.Replace(doc, "https://api.bank.example/v1/identity", "'https://api.bank.example/v1?x=1'", 1),
			"credentials[0].allowed_callers[0].urls[0]:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
