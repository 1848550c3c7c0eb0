// Package policy identifies callers by their verified client certificate and
// decides which callers may use a credential.
//
// A caller's identity is the SPIFFE ID in its certificate's URI SAN, else its
// first DNS SAN written as "dns:<name>". A certificate with more than one URI
// SAN has no identity: it is ambiguous which one to trust. Patterns admit an
// identity by exact match, or by a "/*" suffix that matches on a path segment
// boundary: "spiffe://td/ns/kyc/*" admits "spiffe://td/ns/kyc/sa/api" but
// neither "spiffe://td/ns/kycx/sa/api" nor "spiffe://td/ns/kyc" itself.
// Nothing is admitted by default.
package policy

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Identity is a caller identity: a SPIFFE ID ("spiffe://…") or "dns:<name>".
type Identity string

// Errors returned by IdentityFromCert.
var (
	// ErrNoIdentity means the certificate has neither a SPIFFE URI SAN nor a DNS SAN.
	ErrNoIdentity = errors.New("certificate has no SPIFFE ID or DNS name")
	// ErrAmbiguousIdentity means the certificate has more than one URI SAN.
	ErrAmbiguousIdentity = errors.New("certificate has more than one URI SAN")
)

// IdentityFromCert returns the identity of a verified leaf certificate.
func IdentityFromCert(c *x509.Certificate) (Identity, error) {
	if len(c.URIs) > 1 {
		return "", ErrAmbiguousIdentity
	}
	if len(c.URIs) == 1 && c.URIs[0].Scheme == "spiffe" {
		id := c.URIs[0].String()
		if err := checkSPIFFE(id); err != nil {
			return "", fmt.Errorf("certificate URI SAN: %w", err)
		}
		return Identity(id), nil
	}
	if len(c.DNSNames) > 0 && c.DNSNames[0] != "" {
		return Identity("dns:" + strings.ToLower(c.DNSNames[0])), nil
	}
	return "", ErrNoIdentity
}

// Matcher admits the identities its patterns name. The zero Matcher admits none.
type Matcher struct {
	exact    map[Identity]struct{}
	prefixes []string // each ends in "/"
}

// Compile parses patterns: "spiffe://trust-domain/path", "spiffe://trust-domain/path/*"
// or "dns:name". The error names the first bad pattern.
func Compile(patterns []string) (*Matcher, error) {
	m := &Matcher{exact: make(map[Identity]struct{}, len(patterns))}
	for _, p := range patterns {
		if err := CheckPattern(p); err != nil {
			return nil, err
		}
		if strings.HasPrefix(p, "dns:") {
			m.exact[Identity(strings.ToLower(p))] = struct{}{}
		} else if base, ok := strings.CutSuffix(p, "/*"); ok {
			m.prefixes = append(m.prefixes, base+"/")
		} else {
			m.exact[Identity(p)] = struct{}{}
		}
	}
	return m, nil
}

// CheckPattern reports whether p is a valid caller pattern, and why not.
func CheckPattern(p string) error {
	switch {
	case strings.HasPrefix(p, "dns:"):
		name := p[len("dns:"):]
		if name == "" || strings.ContainsAny(name, "*/: ") {
			return fmt.Errorf("%q: want dns:<host name> (no wildcards)", p)
		}
		return nil
	case strings.HasPrefix(p, "spiffe://"):
		base, _ := strings.CutSuffix(p, "/*")
		if strings.Contains(base, "*") {
			return fmt.Errorf("%q: a wildcard is allowed only as a final /* segment", p)
		}
		if err := checkSPIFFE(base); err != nil {
			return fmt.Errorf("%q: %w", p, err)
		}
		return nil
	default:
		return fmt.Errorf("%q: want spiffe://<trust domain>/<path>[/*] or dns:<host name>", p)
	}
}

func checkSPIFFE(id string) error {
	u, err := url.Parse(id)
	if err != nil || u.Scheme != "spiffe" {
		return errors.New("not a SPIFFE ID")
	}
	if u.Host == "" || u.Port() != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return errors.New("a SPIFFE ID is spiffe://<trust domain>/<path> with no port, user, query or fragment")
	}
	if u.Path != "" {
		for _, seg := range strings.Split(u.Path[1:], "/") {
			if seg == "" || seg == "." || seg == ".." {
				return errors.New("a SPIFFE ID path has no empty, '.' or '..' segments")
			}
		}
	}
	return nil
}

// Allows reports whether id is admitted.
func (m *Matcher) Allows(id Identity) bool {
	if m == nil || id == "" {
		return false
	}
	if _, ok := m.exact[id]; ok {
		return true
	}
	for _, p := range m.prefixes {
		if len(id) > len(p) && strings.HasPrefix(string(id), p) {
			return true
		}
	}
	return false
}
