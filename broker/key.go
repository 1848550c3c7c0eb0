package broker

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
	"strings"
)

// Fingerprint identifies an access token in logs, audit events and
// InvalidateToken: lowercase hex of the first 16 bytes of its SHA-256.
func Fingerprint(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return hex.EncodeToString(sum[:16])
}

// cacheKey identifies the tokens of one credential, scope set and upstream
// registration. upstreamID covers the token URL, client ID and endpoint
// parameters, so a changed registration never serves an old token. The
// credential name stays readable for operators; the rest is hashed.
func cacheKey(name, upstreamID string, sortedScopes []string) string {
	h := sha256.New()
	h.Write([]byte(upstreamID))
	for _, s := range sortedScopes {
		h.Write([]byte{0})
		h.Write([]byte(s))
	}
	return name + ":" + hex.EncodeToString(h.Sum(nil)[:16])
}

// upstreamID canonicalises what identifies an upstream registration.
func upstreamID(tokenURL, clientID string, params map[string]string) string {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(tokenURL)
	b.WriteByte(0)
	b.WriteString(clientID)
	for _, k := range keys {
		b.WriteByte(0)
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(params[k])
	}
	return b.String()
}
