// Package bearer checks the syntax of bearer access tokens (RFC 6750 §2.1).
//
// A value that passes Valid can go into an "Authorization: Bearer" header
// as it is: it holds no white space, no control characters and nothing that
// could end the header or start another. The broker vends only such values,
// and its client library sends only such values.
package bearer

// MaxLen is the longest access token accepted, in bytes. Real tokens, even
// large JWTs, are a few kilobytes; a longer value is a broken or hostile
// response, and it would be copied into every request a caller makes.
const MaxLen = 16 << 10

// Valid reports whether token is a b64token (RFC 6750 §2.1:
// 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=") of at most
// MaxLen bytes.
func Valid(token string) bool {
	if len(token) == 0 || len(token) > MaxLen {
		return false
	}
	i := 0
	for ; i < len(token); i++ {
		if !tokenChar(token[i]) {
			break
		}
	}
	if i == 0 {
		return false // padding alone, or a first byte outside the set
	}
	for ; i < len(token); i++ {
		if token[i] != '=' {
			return false
		}
	}
	return true
}

func tokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '-', '.', '_', '~', '+', '/':
		return true
	}
	return false
}
