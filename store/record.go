package store

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// recordVersion is the format of the records this version writes into
// Redis. Version 1 (the releases before tombstones) sealed the same fields
// without "v"; it is read as is, so replicas of both versions can share
// Redis during a rolling upgrade.
const recordVersion = 2

// record is the sealed plaintext of a stored entry. Everything the broker
// acts on (expiry, fingerprint, issue time) is in here, under the AEAD; the
// plain fields beside it in Redis are copies for operators and older
// replicas, and an entry whose copies disagree with it is not used.
type record struct {
	V        int      `json:"v,omitempty"`
	Token    string   `json:"t"`
	Type     string   `json:"y"`
	Scopes   []string `json:"s"`
	IssuedAt int64    `json:"i"` // Unix nanoseconds
	Expiry   int64    `json:"e"` // Unix nanoseconds
	FP       string   `json:"f"`
	JKT      string   `json:"k,omitempty"` // DPoP key thumbprint; absent for bearer tokens, as older versions wrote them
}

// tombstone is the sealed plaintext of an invalidation: the token with
// fingerprint FP must not be served again, nor any token issued before it.
type tombstone struct {
	V        int    `json:"v"`
	FP       string `json:"f"`
	IssuedAt int64  `json:"i"` // Unix nanoseconds
	Expiry   int64  `json:"e"` // Unix nanoseconds
}

// tombstoneAAD binds a tombstone to its cache key, apart from entries: an
// entry's sealed value copied into the tombstone key does not open there.
func tombstoneAAD(key string) string { return "tombstone\x00" + key }

// stored is what Redis holds for one cache key, as read, before it is trusted.
type stored struct {
	v, fp, exp, iat string // the entry hash's fields; v is the sealed record
	tomb            string // the sealed tombstone
}

// verdict says why a stored value is not used.
type verdict int

const (
	valid      verdict = iota
	absent             // nothing stored
	unsealable         // does not open under any configured key
	tampered           // opens, but the plain fields beside it disagree
)

// openEntry opens the stored entry for key. An entry that does not open, or
// whose plain fields disagree with its sealed ones, is as good as absent.
func (r *Redis) openEntry(key string, s stored) (*Entry, verdict) {
	if s.v == "" {
		return nil, absent
	}
	pt, err := r.sealer.Open(key, []byte(s.v))
	if err != nil {
		return nil, unsealable
	}
	var rec record
	if err := json.Unmarshal(pt, &rec); err != nil || rec.V > recordVersion {
		return nil, unsealable
	}
	if s.fp != rec.FP || s.exp != strconv.FormatInt(time.Unix(0, rec.Expiry).UnixMilli(), 10) ||
		(s.iat != "" && s.iat != strconv.FormatInt(time.Unix(0, rec.IssuedAt).UnixMilli(), 10)) {
		return nil, tampered
	}
	return &Entry{AccessToken: rec.Token, TokenType: rec.Type, Scopes: rec.Scopes,
		IssuedAt: time.Unix(0, rec.IssuedAt), Expiry: time.Unix(0, rec.Expiry), Fingerprint: rec.FP, JKT: rec.JKT}, valid
}

// openTombstone opens the stored tombstone for key; nil when there is none
// that opens (a tombstone someone else wrote is ignored).
func (r *Redis) openTombstone(key string, s stored) *tombstone {
	if s.tomb == "" {
		return nil
	}
	pt, err := r.sealer.Open(tombstoneAAD(key), []byte(s.tomb))
	if err != nil {
		r.stats.unsealable.Add(1)
		return nil
	}
	var t tombstone
	if err := json.Unmarshal(pt, &t); err != nil || t.FP == "" {
		r.stats.unsealable.Add(1)
		return nil
	}
	return &t
}

// buries reports whether tombstone t forbids entry e: the invalidated token
// itself, or one issued before it.
func (t *tombstone) buries(e *Entry) bool {
	return t != nil && (e.Fingerprint == t.FP || e.IssuedAt.UnixNano() < t.IssuedAt)
}

// sealEntry seals e for key.
func (r *Redis) sealEntry(key string, e *Entry) ([]byte, error) {
	pt, err := json.Marshal(record{V: recordVersion, Token: e.AccessToken, Type: e.TokenType, Scopes: e.Scopes,
		IssuedAt: e.IssuedAt.UnixNano(), Expiry: e.Expiry.UnixNano(), FP: e.Fingerprint, JKT: e.JKT})
	if err != nil {
		return nil, fmt.Errorf("redis: encode entry: %w", err)
	}
	return r.sealer.Seal(key, pt)
}

// sealTombstone seals the tombstone of e for key.
func (r *Redis) sealTombstone(key string, e *Entry) ([]byte, error) {
	pt, err := json.Marshal(tombstone{V: recordVersion, FP: e.Fingerprint, IssuedAt: e.IssuedAt.UnixNano(), Expiry: e.Expiry.UnixNano()})
	if err != nil {
		return nil, fmt.Errorf("redis: encode tombstone: %w", err)
	}
	return r.sealer.Seal(tombstoneAAD(key), pt)
}
