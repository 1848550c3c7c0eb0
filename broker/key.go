package broker

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"sort"
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
	writeField(h, upstreamID)
	for _, s := range sortedScopes {
		writeField(h, s)
	}
	return name + ":" + hex.EncodeToString(h.Sum(nil)[:16])
}

// writeField writes s with its length first, so no two field lists hash alike.
func writeField(h hash.Hash, s string) {
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(s)))
	h.Write(n[:])
	h.Write([]byte(s))
}

// upstreamID digests what identifies an upstream registration.
func upstreamID(tokenURL, clientID string, params map[string]string) string {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fields := []string{tokenURL, clientID}
	for _, k := range keys {
		fields = append(fields, k, params[k])
	}
	h := sha256.New()
	for _, f := range fields {
		writeField(h, f)
	}
	return string(h.Sum(nil))
}
