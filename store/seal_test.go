package store

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"testing"
)

func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSealer(t *testing.T) {
	k1, k2, k3 := newKey(t), newKey(t), newKey(t)
	s1, err := NewSealer(k1)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte(`{"t":"access-token"}`)
	v, err := s1.Seal("identity:abc", msg)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(v, []byte("access-token")) {
		t.Fatal("sealed value holds the plaintext")
	}
	if v2, _ := s1.Seal("identity:abc", msg); bytes.Equal(v, v2) {
		t.Error("two seals of the same value are equal: the nonce is not random")
	}
	if got, err := s1.Open("identity:abc", v); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("Open = %q, %v", got, err)
	}
	if _, err := s1.Open("identity:other", v); !errors.Is(err, ErrUnsealable) {
		t.Errorf("opened under another cache key: %v", err)
	}
	tampered := bytes.Clone(v)
	tampered[len(tampered)-1] ^= 1
	if _, err := s1.Open("identity:abc", tampered); !errors.Is(err, ErrUnsealable) {
		t.Errorf("opened a tampered value: %v", err)
	}
	for _, short := range [][]byte{nil, {1}, v[:headerSize]} {
		if _, err := s1.Open("identity:abc", short); !errors.Is(err, ErrUnsealable) {
			t.Errorf("opened a truncated value: %v", err)
		}
	}

	// Rotation: k2 is current, k1 still opens old values; k3 alone cannot.
	s2, err := NewSealer(k2, k1)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Open("identity:abc", v); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("a value sealed with the previous key did not open after rotation: %v", err)
	}
	nv, _ := s2.Seal("identity:abc", msg)
	if _, err := s1.Open("identity:abc", nv); !errors.Is(err, ErrUnsealable) {
		t.Errorf("the old sealer opened a value sealed with the new key: %v", err)
	}
	s3, _ := NewSealer(k3)
	if _, err := s3.Open("identity:abc", v); !errors.Is(err, ErrUnsealable) {
		t.Errorf("an unrelated key opened the value: %v", err)
	}
	if _, err := NewSealer(k1[:16]); err == nil {
		t.Error("a 16-byte key was accepted")
	}
}

func TestParseKey(t *testing.T) {
	k := newKey(t)
	for name, in := range map[string][]byte{
		"raw":          k,
		"base64":       []byte(base64.StdEncoding.EncodeToString(k) + "\n"),
		"base64url":    []byte(base64.RawURLEncoding.EncodeToString(k)),
		"base64 nopad": []byte(base64.RawStdEncoding.EncodeToString(k)),
	} {
		got, err := ParseKey(in)
		if err != nil || !bytes.Equal(got, k) {
			t.Errorf("%s: ParseKey = %x, %v", name, got, err)
		}
	}
	for _, bad := range [][]byte{nil, []byte("short"), []byte(base64.StdEncoding.EncodeToString(k[:16]))} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}
