// Package policy identifies callers by their verified client certificate and
// decides which callers may use a credential.
//
// A caller's identity is the SPIFFE ID in its certificate's URI SAN, else its
// first DNS SAN written as "dns:<name>". A certificate with more than one URI
// SAN has no identity: it is ambiguous which one to trust. Patterns admit an
// identity by exact match, or by a "/*" suffix that matches on a path segment
// boundary: "spiffe://td/ns/kyc/*" admits "spiffe://td/ns/kyc/sa/api" but
// neither "spiffe://td/ns/kycx/sa/api" nor "spiffe://td/ns/kyc" itself.
// A rule may also restrict a caller to some of the credential's scopes.
// Nothing is admitted by default.
package policy

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"slices"
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

// Rule admits the callers its Pattern matches, to the Scopes it lists (all
// of the credential's scopes when Scopes is empty).
type Rule struct {
	Pattern string
	Scopes  []string
}

// Grant is what a Matcher admits a caller to.
type Grant struct {
	// Scopes are the scopes the caller may use, sorted; nil means all.
	Scopes []string
	// Rule is the index of the matching rule when exactly one restricted rule
	// matched (so callers can precompute per rule), else -1.
	Rule int
}

// Matcher admits the identities its rules name. The zero Matcher admits none.
type Matcher struct {
	exact    map[Identity][]int // identity → indexes of rules
	prefixes []prefix
	rules    []Rule
}

type prefix struct {
	base string // ends in "/"
	rule int
}

// Compile parses patterns, each admitting to all scopes. See CompileRules.
func Compile(patterns []string) (*Matcher, error) {
	rules := make([]Rule, len(patterns))
	for i, p := range patterns {
		rules[i] = Rule{Pattern: p}
	}
	return CompileRules(rules)
}

// CompileRules parses rules whose patterns are "spiffe://trust-domain/path",
// "spiffe://trust-domain/path/*" or "dns:name". The error names the first bad pattern.
func CompileRules(rules []Rule) (*Matcher, error) {
	m := &Matcher{exact: make(map[Identity][]int, len(rules))}
	for i, r := range rules {
		p := r.Pattern
		if err := CheckPattern(p); err != nil {
			return nil, err
		}
		if len(r.Scopes) > 0 {
			r.Scopes = slices.Clone(r.Scopes)
			slices.Sort(r.Scopes)
			r.Scopes = slices.Compact(r.Scopes)
		}
		m.rules = append(m.rules, r)
		switch base, isPrefix := strings.CutSuffix(p, "/*"); {
		case strings.HasPrefix(p, "dns:"):
			id := Identity(strings.ToLower(p))
			m.exact[id] = append(m.exact[id], i)
		case isPrefix:
			m.prefixes = append(m.prefixes, prefix{base: base + "/", rule: i})
		default:
			m.exact[Identity(p)] = append(m.exact[Identity(p)], i)
		}
	}
	return m, nil
}

// Rules returns the compiled rules, scopes sorted.
func (m *Matcher) Rules() []Rule {
	if m == nil {
		return nil
	}
	return m.rules
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
	_, ok := m.Grant(id)
	return ok
}

// Grant reports whether id is admitted and to which scopes: the union of
// the scopes of every matching rule, all of them if any rule is unrestricted.
func (m *Matcher) Grant(id Identity) (Grant, bool) {
	if m == nil || id == "" {
		return Grant{}, false
	}
	matched := -1 // the single restricted rule matched so far
	var union []string
	found := false
	visit := func(i int) bool { // false: unrestricted, stop
		found = true
		r := m.rules[i]
		if len(r.Scopes) == 0 {
			return false
		}
		switch {
		case matched == -1 && union == nil:
			matched, union = i, r.Scopes
		default:
			matched = -1
			union = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(union), r.Scopes...))))
		}
		return true
	}
	for _, i := range m.exact[id] {
		if !visit(i) {
			return Grant{Rule: -1}, true
		}
	}
	for _, p := range m.prefixes {
		if len(id) > len(p.base) && strings.HasPrefix(string(id), p.base) {
			if !visit(p.rule) {
				return Grant{Rule: -1}, true
			}
		}
	}
	if !found {
		return Grant{}, false
	}
	return Grant{Scopes: union, Rule: matched}, true
}
