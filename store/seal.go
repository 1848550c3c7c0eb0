package store

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
)

// KeySize is the size of a sealing key: AES-256.
const KeySize = 32

// ErrUnsealable is returned when a sealed value cannot be opened: it was
// sealed under another key or for another cache key, or it was altered.
var ErrUnsealable = errors.New("store: sealed value cannot be opened")

const (
	sealVersion = 1
	keyIDSize   = 8
	nonceSize   = 12
	headerSize  = 1 + keyIDSize + nonceSize
)

// Sealer seals values with AES-256-GCM under a current key and opens values
// sealed under the current or a previous key, so keys can be rotated without
// losing what is stored. A sealed value is
//
//	version (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext and tag
//
// and is bound to its cache key as associated data: a value copied under
// another key does not open.
type Sealer struct {
	currentID [keyIDSize]byte
	current   cipher.AEAD
	byID      map[[keyIDSize]byte]cipher.AEAD
	// macs are the keys that authenticate pub/sub events, one derived from
	// each sealing key, by the same key ids: whoever can seal can announce.
	macs map[[keyIDSize]byte][]byte
}

// NewSealer returns a Sealer that seals with current and opens with current
// or any of previous. Each key is KeySize bytes.
func NewSealer(current []byte, previous ...[]byte) (*Sealer, error) {
	s := &Sealer{byID: map[[keyIDSize]byte]cipher.AEAD{}, macs: map[[keyIDSize]byte][]byte{}}
	for i, k := range append([][]byte{current}, previous...) {
		if len(k) != KeySize {
			return nil, fmt.Errorf("sealing key %d: %d bytes, want %d", i, len(k), KeySize)
		}
		block, err := aes.NewCipher(k)
		if err != nil {
			return nil, fmt.Errorf("sealing key %d: %w", i, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("sealing key %d: %w", i, err)
		}
		id := keyID(k)
		if i == 0 {
			s.currentID, s.current = id, aead
		}
		if _, dup := s.byID[id]; !dup {
			s.byID[id] = aead
			s.macs[id] = deriveKey(k, "tokenbroker event mac v2")
		}
	}
	return s, nil
}

// keyID names a key without revealing it: a domain-separated hash prefix.
func keyID(k []byte) [keyIDSize]byte {
	h := sha256.Sum256(append([]byte("tokenbroker sealing key id\x00"), k...))
	var id [keyIDSize]byte
	copy(id[:], h[:])
	return id
}

// deriveKey derives a key for another use from sealing key k (HMAC-SHA256
// of a label under k), so one key file serves both without one use weakening
// the other.
func deriveKey(k []byte, label string) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte(label))
	return m.Sum(nil)
}

// Seal encrypts plaintext bound to aad.
func (s *Sealer) Seal(aad string, plaintext []byte) ([]byte, error) {
	out := make([]byte, headerSize, headerSize+len(plaintext)+s.current.Overhead())
	out[0] = sealVersion
	copy(out[1:], s.currentID[:])
	if _, err := rand.Read(out[1+keyIDSize : headerSize]); err != nil {
		return nil, fmt.Errorf("seal: nonce: %w", err)
	}
	return s.current.Seal(out, out[1+keyIDSize:headerSize], plaintext, sealAAD(aad, out[:1+keyIDSize])), nil
}

// Open decrypts a value sealed for aad, or returns ErrUnsealable.
func (s *Sealer) Open(aad string, sealed []byte) ([]byte, error) {
	if len(sealed) < headerSize || sealed[0] != sealVersion {
		return nil, ErrUnsealable
	}
	var id [keyIDSize]byte
	copy(id[:], sealed[1:])
	aead, ok := s.byID[id]
	if !ok {
		return nil, fmt.Errorf("%w: sealed under an unknown key", ErrUnsealable)
	}
	pt, err := aead.Open(nil, sealed[1+keyIDSize:headerSize], sealed[headerSize:], sealAAD(aad, sealed[:1+keyIDSize]))
	if err != nil {
		return nil, ErrUnsealable
	}
	return pt, nil
}

// sealAAD binds the cache key and the header (version and key id) to the ciphertext.
func sealAAD(aad string, header []byte) []byte {
	return append(append([]byte(nil), header...), aad...)
}

// ParseKey reads a sealing key from a key file's content: KeySize raw bytes,
// or their standard or URL-safe base64 encoding (surrounding white space ignored).
func ParseKey(b []byte) ([]byte, error) {
	if len(b) == KeySize {
		return bytes.Clone(b), nil
	}
	t := bytes.TrimSpace(b)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if k, err := enc.DecodeString(string(t)); err == nil && len(k) == KeySize {
			return k, nil
		}
	}
	return nil, fmt.Errorf("want %d random bytes, raw or base64", KeySize)
}
