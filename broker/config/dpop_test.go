package config

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

// TestCheckFilesParsesDPoPKey: --check-config refuses a DPoP key that does
// not parse or fit alg, naming the key and never the content.
func TestCheckFilesParsesDPoPKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	good := write("good.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})))
	bad := write("bad.pem", "not a key")
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt", "secret"} {
		write(f, "x")
	}
	doc := strings.NewReplacer("/tls/", dir+"/", "/secrets/identity", dir+"/secret").Replace(valid)
	for _, tc := range []struct{ key, alg, want string }{
		{good, "ES256", ""},
		{good, "EdDSA", `credentials[0].dpop.key_file: dpop key ` + good + `: alg "EdDSA" does not fit an EC P-256 key`},
		{bad, "", "credentials[0].dpop.key_file: dpop key " + bad + ": no PEM block"},
	} {
		c, err := Parse([]byte(doc + "    dpop: {key_file: " + tc.key + ", alg: " + tc.alg + "}\n"))
		if err != nil {
			t.Fatal(err)
		}
		err = c.CheckFiles()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("CheckFiles(%s, %s) = %v, want %q", filepath.Base(tc.key), tc.alg, err, tc.want)
		}
	}
}
