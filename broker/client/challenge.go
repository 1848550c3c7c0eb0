package client

import (
	"net/http"
	"strings"
)

// tokenRejected reports whether a 401 says that the token itself is no good,
// so that reporting it to the broker and fetching another can help (RFC 6750
// §3.1): a Bearer challenge with error="invalid_token", or one that names no
// error at all (the resource server did not say why; RFC 6750 §3 allows it
// for a request that lacks or has an unusable token), or no challenge. Any
// other error — insufficient_scope, invalid_request, or one this code does
// not know — is about the request, not the token: a new token would be
// rejected the same way, and would cost the bank a token request.
func tokenRejected(resp *http.Response) bool {
	challenges := resp.Header.Values("WWW-Authenticate")
	if len(challenges) == 0 {
		return true
	}
	sawBearer := false
	for _, h := range challenges {
		for _, c := range parseChallenges(h) {
			if !strings.EqualFold(c.scheme, "Bearer") {
				continue
			}
			sawBearer = true
			if e, ok := c.params["error"]; !ok || e == "invalid_token" {
				return true
			}
		}
	}
	return !sawBearer // a challenge of another scheme only: the token was not judged
}

// challenge is one auth-scheme with its parameters (RFC 9110 §11.2).
type challenge struct {
	scheme string
	params map[string]string // lowercased names
}

// parseChallenges reads a WWW-Authenticate value: a comma-separated list of
// challenges, each a scheme followed by auth-params (name=token or
// name="quoted string"). Malformed parts are skipped; what could be read is
// returned.
func parseChallenges(h string) []challenge {
	var out []challenge
	s := h
	for {
		s = strings.TrimLeft(s, " \t,")
		if s == "" {
			return out
		}
		scheme, rest := readToken(s)
		if scheme == "" {
			return out
		}
		c := challenge{scheme: scheme, params: map[string]string{}}
		s = rest
		for {
			s = strings.TrimLeft(s, " \t")
			if s == "" {
				break
			}
			if s[0] == ',' {
				s = strings.TrimLeft(s[1:], " \t")
			}
			name, rest := readToken(s)
			r := strings.TrimLeft(rest, " \t")
			if name == "" || r == "" || r[0] != '=' {
				break // not an auth-param: the next challenge's scheme, or token68
			}
			r = strings.TrimLeft(r[1:], " \t")
			var v string
			if r != "" && r[0] == '"' {
				v, r = readQuoted(r)
			} else {
				v, r = readToken(r)
			}
			c.params[strings.ToLower(name)] = v
			s = r
		}
		out = append(out, c)
	}
}

// readToken splits s after its leading RFC 9110 token characters.
func readToken(s string) (tok, rest string) {
	i := 0
	for i < len(s) && isTokenChar(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// readQuoted reads a quoted-string at the start of s (which begins with a
// quote), undoing backslash escapes.
func readQuoted(s string) (v, rest string) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if i+1 < len(s) {
				i++
				b.WriteByte(s[i])
			}
		case '"':
			return b.String(), s[i+1:]
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String(), "" // unterminated: take what there is
}
