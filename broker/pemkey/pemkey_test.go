package pemkey

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
)

// TestParse: the three encodings parse to their key; what is not a private
// key is refused with an error that holds none of the input.
func TestParse(t *testing.T) {
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(ec)
	sec1, _ := x509.MarshalECPrivateKey(ec)
	pkcs1 := x509.MarshalPKCS1PrivateKey(rk)
	for typ, der := range map[string][]byte{"PRIVATE KEY": pkcs8, "EC PRIVATE KEY": sec1, "RSA PRIVATE KEY": pkcs1} {
		k, err := Parse(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
		if err != nil || k == nil {
			t.Errorf("%s: %v", typ, err)
		}
	}
	pub, _ := x509.MarshalPKIXPublicKey(ec.Public())
	secretish := strings.Repeat("A", 64)
	for name, in := range map[string][]byte{
		"not PEM":         []byte(secretish),
		"public key":      pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}),
		"corrupt PKCS #8": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte(secretish)}),
		"corrupt PKCS #1": pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: pkcs1[:len(pkcs1)/2]}),
	} {
		_, err := Parse(in)
		if err == nil {
			t.Errorf("%s: parsed", name)
			continue
		}
		if strings.Contains(err.Error(), secretish) || strings.Contains(err.Error(), "AAAA") {
			t.Errorf("%s: the error holds the input: %v", name, err)
		}
	}
}
