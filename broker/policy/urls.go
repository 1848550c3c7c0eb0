package policy

import (
	"fmt"
	"net/url"
	"strings"
)

// URLPrefix admits the URLs with its scheme and host whose path starts
// with its path on a segment boundary: "https://api.bank.example/v1/accounts"
// admits ".../v1/accounts" and ".../v1/accounts/7" but not
// ".../v1/accountsx". A prefix ending in "/" admits what is below it.
type URLPrefix struct {
	scheme, host, path string // host lowercased, default port dropped; path without a final "/"
	raw                string
}

// ParseURLPrefix parses an absolute http or https URL without query,
// fragment or user information.
func ParseURLPrefix(s string) (URLPrefix, error) {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return URLPrefix{}, fmt.Errorf("%q: not a URL", s)
	case u.Scheme != "https" && u.Scheme != "http" || u.Host == "":
		return URLPrefix{}, fmt.Errorf("%q: want an absolute https (or http) URL", s)
	case u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return URLPrefix{}, fmt.Errorf("%q: no user information, query or fragment", s)
	case strings.Contains(u.Path, "*"):
		return URLPrefix{}, fmt.Errorf("%q: a URL prefix has no wildcards; it admits every path below it", s)
	}
	for _, seg := range strings.Split(u.Path, "/") {
		if seg == "." || seg == ".." {
			return URLPrefix{}, fmt.Errorf("%q: no . or .. segments", s)
		}
	}
	return URLPrefix{scheme: u.Scheme, host: normHost(u.Scheme, u.Host), path: strings.TrimSuffix(u.EscapedPath(), "/"), raw: s}, nil
}

// String is the prefix as configured.
func (p URLPrefix) String() string { return p.raw }

// Admits reports whether u (an absolute URL, as dpop.ParseURL returns it)
// is under p. A path with a "." or ".." segment is never admitted: a
// server may resolve it to somewhere else.
func (p URLPrefix) Admits(u *url.URL) bool {
	if !strings.EqualFold(u.Scheme, p.scheme) || normHost(strings.ToLower(u.Scheme), u.Host) != p.host {
		return false
	}
	path := u.EscapedPath()
	for _, seg := range strings.Split(path, "/") {
		if dotSegment(seg) {
			return false
		}
	}
	if p.path == "" {
		return true
	}
	rest, ok := strings.CutPrefix(path, p.path)
	return ok && (rest == "" || rest[0] == '/')
}

// dotSegment reports whether seg (a path segment as sent) may resolve as
// "." or ".." at a server: percent-encoded ("%2e%2e" is ".." by RFC 3986
// §6.2.2.2), behind an encoded slash or backslash ("x%2F.."), or with
// path parameters ("..;x"). A segment that does not unescape is refused too.
func dotSegment(seg string) bool {
	s, err := url.PathUnescape(seg)
	if err != nil {
		return true
	}
	for _, part := range strings.FieldsFunc(s, func(r rune) bool { return r == '/' || r == '\\' }) {
		part, _, _ = strings.Cut(part, ";")
		if part == "." || part == ".." {
			return true
		}
	}
	return s == "." || s == ".."
}

func normHost(scheme, host string) string {
	host = strings.ToLower(host)
	switch {
	case scheme == "https" && strings.HasSuffix(host, ":443"):
		return strings.TrimSuffix(host, ":443")
	case scheme == "http" && strings.HasSuffix(host, ":80"):
		return strings.TrimSuffix(host, ":80")
	}
	return host
}

// AllowsURL reports whether id may have DPoP proofs made for u: some rule
// matching id lists no URLs, or lists a prefix that admits u.
func (m *Matcher) AllowsURL(id Identity, u *url.URL) bool {
	if m == nil || id == "" {
		return false
	}
	ok := false
	visit := func(i int) bool { // true: decided
		r := m.rules[i]
		if len(r.URLs) == 0 {
			ok = true
			return true
		}
		for _, p := range r.URLs {
			if p.Admits(u) {
				ok = true
				return true
			}
		}
		return false
	}
	for _, e := range m.exactFor(id) {
		if visit(e.rule) {
			return ok
		}
	}
	for _, p := range m.prefixes {
		if len(id) > len(p.base) && strings.HasPrefix(string(id), p.base) && visit(p.rule) {
			return ok
		}
	}
	return ok
}
