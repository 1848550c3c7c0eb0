package dpop

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// Limits on what a proof may be asked for.
const (
	// MaxURLLen is the longest URL a proof is made for.
	MaxURLLen = 4096
	// MaxMethodLen is the longest HTTP method.
	MaxMethodLen = 32
	// MaxNonceLen is the longest nonce.
	MaxNonceLen = 512
)

// CheckMethod reports whether m is an HTTP method: an RFC 9110 token of at
// most MaxMethodLen characters.
func CheckMethod(m string) error {
	if m == "" || len(m) > MaxMethodLen {
		return fmt.Errorf("dpop: method must be 1 to %d characters", MaxMethodLen)
	}
	for i := 0; i < len(m); i++ {
		if !tchar(m[i]) {
			return errors.New("dpop: method is not an HTTP method token")
		}
	}
	return nil
}

// CheckNonce reports whether n is a nonce RFC 9449 §8.1 allows: 1 or more
// NQCHAR (printable ASCII but the double quote and the backslash), at most
// MaxNonceLen.
func CheckNonce(n string) error {
	if n == "" || len(n) > MaxNonceLen {
		return fmt.Errorf("dpop: nonce must be 1 to %d characters", MaxNonceLen)
	}
	for i := 0; i < len(n); i++ {
		if c := n[i]; c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
			return errors.New("dpop: nonce has a character outside NQCHAR")
		}
	}
	return nil
}

// HTU returns the htu claim for raw: an absolute http or https URL without
// user information, its scheme and host lowercased, a default port (443,
// 80) dropped, an empty path written "/", query and fragment left out.
func HTU(raw string) (string, error) {
	u, err := ParseURL(raw)
	if err != nil {
		return "", err
	}
	return u.String(), nil
}

// ParseURL parses raw as HTU does and returns the URL htu is made of.
func ParseURL(raw string) (*url.URL, error) {
	if raw == "" || len(raw) > MaxURLLen {
		return nil, fmt.Errorf("dpop: url must be 1 to %d characters", MaxURLLen)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("dpop: url does not parse")
	}
	scheme := strings.ToLower(u.Scheme)
	if (scheme != "https" && scheme != "http") || u.Host == "" || u.Opaque != "" {
		return nil, errors.New("dpop: url must be an absolute http or https URL")
	}
	if u.User != nil {
		return nil, errors.New("dpop: url must not hold user information")
	}
	host := strings.ToLower(u.Host)
	if h, p, err := net.SplitHostPort(host); err == nil && (scheme == "https" && p == "443" || scheme == "http" && p == "80") {
		host = h
		if strings.Contains(h, ":") {
			host = "[" + h + "]"
		}
	}
	out := &url.URL{Scheme: scheme, Host: host, Path: u.Path, RawPath: u.RawPath}
	if out.Path == "" {
		out.Path, out.RawPath = "/", ""
	}
	return out, nil
}

// tchar reports whether c may appear in an RFC 9110 token.
func tchar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
