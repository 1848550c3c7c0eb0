// Package policy identifies callers by their verified client certificate and
// decides which callers may use a credential.
//
// A caller's identity is the SPIFFE ID in its certificate's URI SAN, else its
// first DNS SAN written as "dns:<name>". A certificate with more than one URI
// SAN has no identity: it is ambiguous which one to trust. SPIFFE IDs are
// parsed strictly, as the SPIFFE ID specification writes them, from the
// certificate's own bytes: a lowercase "spiffe://" scheme, a trust domain of
// [a-z0-9._-], path segments of [A-Za-z0-9._-], no percent-encoding and no
// empty, "." or ".." segments. Anything else is no identity at all, so that
// one workload can never appear under two spellings. Patterns admit an
// identity by exact match, or by a "/*" suffix that matches on a path segment
// boundary: "spiffe://td/ns/kyc/*" admits "spiffe://td/ns/kyc/sa/api" but
// neither "spiffe://td/ns/kycx/sa/api" nor "spiffe://td/ns/kyc" itself.
// A rule may also restrict a caller to some of the credential's scopes.
// Nothing is admitted by default.
package policy

import (
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
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
	uris, err := uriSANs(c)
	if err != nil {
		return "", err
	}
	if len(uris) > 1 {
		return "", ErrAmbiguousIdentity
	}
	if len(uris) == 1 && len(uris[0]) >= len("spiffe:") && strings.EqualFold(uris[0][:len("spiffe:")], "spiffe:") {
		id, err := spiffeid.FromString(uris[0])
		if err != nil {
			return "", fmt.Errorf("certificate URI SAN is not a valid SPIFFE ID: %w", err)
		}
		return Identity(id.String()), nil
	}
	if len(c.DNSNames) > 0 && c.DNSNames[0] != "" {
		return Identity("dns:" + strings.ToLower(c.DNSNames[0])), nil
	}
	return "", ErrNoIdentity
}

// oidSubjectAltName is the subjectAltName extension (RFC 5280 §4.2.1.6).
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// uriSANs returns the certificate's URI SANs exactly as encoded. The parsed
// c.URIs will not do: url.Parse lowercases the scheme and decodes
// percent-escapes, so "SPIFFE://td/%70ayments" would read as a valid ID.
func uriSANs(c *x509.Certificate) ([]string, error) {
	for _, ext := range c.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		var seq asn1.RawValue
		if rest, err := asn1.Unmarshal(ext.Value, &seq); err != nil || len(rest) > 0 || seq.Tag != asn1.TagSequence || !seq.IsCompound {
			return nil, errors.New("certificate subjectAltName does not parse")
		}
		var uris []string
		for rest := seq.Bytes; len(rest) > 0; {
			var name asn1.RawValue
			var err error
			if rest, err = asn1.Unmarshal(rest, &name); err != nil {
				return nil, errors.New("certificate subjectAltName does not parse")
			}
			if name.Class == asn1.ClassContextSpecific && name.Tag == 6 { // uniformResourceIdentifier
				uris = append(uris, string(name.Bytes))
			}
		}
		return uris, nil
	}
	return nil, nil
}

// IsSPIFFE reports whether id is a SPIFFE ID.
func (id Identity) IsSPIFFE() bool { return strings.HasPrefix(string(id), "spiffe://") }

// TrustDomain is the trust domain of a SPIFFE ID, or "" for other identities.
func (id Identity) TrustDomain() string {
	if !id.IsSPIFFE() {
		return ""
	}
	td, _, _ := strings.Cut(string(id)[len("spiffe://"):], "/")
	return td
}

// Rule admits the callers its Pattern matches, to the Scopes it lists (all
// of the credential's scopes when Scopes is empty) and, for DPoP proofs, to
// the API URLs its URLs prefixes admit (any URL when URLs is empty; see
// URLPrefix).
type Rule struct {
	Pattern string
	Scopes  []string
	URLs    []URLPrefix
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
	exact    []exactRule // sorted by identity, then rule: found by binary search
	prefixes []prefix
	rules    []Rule
}

// exactRule is a rule that names one identity. A sorted slice of them, not
// a map: a credential's rules are few, and with ten thousand credentials a
// map each was a fifth of the broker's heap.
type exactRule struct {
	id   Identity
	rule int
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
	m := &Matcher{rules: make([]Rule, 0, len(rules))}
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
			m.exact = append(m.exact, exactRule{id: Identity(strings.ToLower(p)), rule: i})
		case isPrefix:
			m.prefixes = append(m.prefixes, prefix{base: base + "/", rule: i})
		default:
			m.exact = append(m.exact, exactRule{id: Identity(p), rule: i})
		}
	}
	slices.SortStableFunc(m.exact, func(a, b exactRule) int { return strings.Compare(string(a.id), string(b.id)) })
	m.exact = slices.Clip(m.exact)
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
	if _, err := spiffeid.FromString(id); err != nil {
		return fmt.Errorf("not a valid SPIFFE ID (lowercase spiffe://, trust domain of a-z 0-9 . _ -, path segments of A-Z a-z 0-9 . _ -): %w", err)
	}
	return nil
}

// Allows reports whether id is admitted.
func (m *Matcher) Allows(id Identity) bool {
	_, ok := m.Grant(id)
	return ok
}

// exactFor returns the rules that name id, in rule order.
func (m *Matcher) exactFor(id Identity) []exactRule {
	cmp := func(e exactRule, id Identity) int { return strings.Compare(string(e.id), string(id)) }
	i, found := slices.BinarySearchFunc(m.exact, id, cmp)
	if !found {
		return nil
	}
	j := i + 1
	for j < len(m.exact) && m.exact[j].id == id {
		j++
	}
	return m.exact[i:j]
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
	for _, e := range m.exactFor(id) {
		if !visit(e.rule) {
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
