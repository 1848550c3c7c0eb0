package broker

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"
	"github.com/tokenbroker/tokenbroker/broker/upstream"
	"github.com/tokenbroker/tokenbroker/store"
)

func TestFingerprint(t *testing.T) {
	// SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223 b00361a396177a9cb410ff61f20015ad
	if got, want := Fingerprint("abc"), "ba7816bf8f01cfea414140de5dae2223"; got != want {
		t.Errorf("Fingerprint(abc) = %s, want %s", got, want)
	}
}

func TestCacheKeys(t *testing.T) {
	up := upstreamID("https://as/token", "app", map[string]string{"b": "2", "a": "1"})
	if up != upstreamID("https://as/token", "app", map[string]string{"a": "1", "b": "2"}) {
		t.Error("upstreamID depends on map order")
	}
	base := cacheKey("identity", up, []string{"A", "B"})
	if !strings.HasPrefix(base, "identity:") {
		t.Errorf("key %q does not start with the credential name", base)
	}
	for name, other := range map[string]string{
		"scopes":      cacheKey("identity", up, []string{"A"}),
		"scope split": cacheKey("identity", up, []string{"A\x00B"}),
		"name":        cacheKey("identity2", up, []string{"A", "B"}),
		"token URL":   cacheKey("identity", upstreamID("https://as2/token", "app", map[string]string{"a": "1", "b": "2"}), []string{"A", "B"}),
		"client ID":   cacheKey("identity", upstreamID("https://as/token", "app2", map[string]string{"a": "1", "b": "2"}), []string{"A", "B"}),
		"params":      cacheKey("identity", upstreamID("https://as/token", "app", map[string]string{"a": "1"}), []string{"A", "B"}),
	} {
		if other == base {
			t.Errorf("changing the %s keeps the cache key", name)
		}
	}
}

func TestResolveScopes(t *testing.T) {
	// resolve never fetches; the upstream client points at nothing.
	up, err := upstream.New(upstream.Config{TokenURL: "http://127.0.0.1:1/token", ClientID: "app", ClientSecretFile: "/nonexistent"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Store: store.NewMemory(nil), Credentials: []Credential{{Name: "identity", Scopes: []string{"B", "A"}, Fetcher: up}}})
	if err != nil {
		t.Fatal(err)
	}
	c := (*b.creds.Load())["identity"]
	for _, req := range [][]string{nil, {"A", "B"}, {"B", "A", "A"}} {
		scopes, key, err := c.resolve(testCaller, policy.Grant{Rule: -1}, req)
		if err != nil || key != c.keys().defaultKey || strings.Join(scopes, " ") != "A B" {
			t.Errorf("resolve(%v) = %v, %q, %v; want the default set and key", req, scopes, key, err)
		}
	}
	scopes, key, err := c.resolve(testCaller, policy.Grant{Rule: -1}, []string{"B"})
	if err != nil || key == c.keys().defaultKey || strings.Join(scopes, " ") != "B" {
		t.Errorf("resolve([B]) = %v, %q, %v; want [B] under its own key", scopes, key, err)
	}
	if _, _, err := c.resolve(testCaller, policy.Grant{Rule: -1}, []string{"C"}); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("resolve([C]) = %v, want ErrPermissionDenied (the same as a scope not granted)", err)
	}
}

// TestStatisticsAcrossReloads: a reload that keeps a credential hands on its
// statistics (counts, retry gate, check state); one that removes it drops
// them, and a credential of that name added later starts afresh.
func TestStatisticsAcrossReloads(t *testing.T) {
	b, _, _ := newTestBroker(t, nil, time.Hour)
	c := (*b.creds.Load())["identity"]
	if _, err := b.GetToken(context.Background(), testCaller, Request{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetCredentials([]Credential{c.Credential}); err != nil {
		t.Fatal(err)
	}
	kept := (*b.creds.Load())["identity"]
	if kept == c || kept.stats != c.stats {
		t.Fatal("a reload that keeps the credential did not hand on its statistics")
	}
	if _, err := b.GetToken(context.Background(), testCaller, Request{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	if h := b.Health()["identity"]; h.State != "ok" || h.LastSuccess == nil {
		t.Errorf("health after the reload = %+v, want ok with the fetch's success", h)
	}
	if n := b.Use()["identity"].Issued; n != 2 {
		t.Errorf("tokens issued after the reload = %d, want 2 (both sides of the reload)", n)
	}

	other := c.Credential
	other.Name = "other"
	if err := b.SetCredentials([]Credential{other}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetCredentials([]Credential{c.Credential}); err != nil {
		t.Fatal(err)
	}
	if back := (*b.creds.Load())["identity"]; back.stats == c.stats || b.Use()["identity"].Issued != 0 {
		t.Error("a credential removed and added again kept the statistics of before")
	}
}

// TestIdleCredentialHoldsNoRequestState: a credential nobody asked for has
// no cache keys, no record of use and no retry gate; the first GetToken
// makes them, and a reload's credential makes the same keys again.
func TestIdleCredentialHoldsNoRequestState(t *testing.T) {
	b, _, _ := newTestBroker(t, nil, time.Hour)
	c := (*b.creds.Load())["identity"]
	if c.keysP.Load() != nil || c.stats.useP.Load() != nil || c.stats.gateP.Load() != nil {
		t.Fatal("an idle credential has cache keys, a record of use or a retry gate")
	}
	if _, err := b.GetToken(context.Background(), testCaller, Request{Credential: "identity"}); err != nil {
		t.Fatal(err)
	}
	if c.keysP.Load() == nil || c.stats.useP.Load() == nil || c.stats.gateP.Load() == nil {
		t.Fatal("a used credential lacks its cache keys, its record of use or its retry gate")
	}
	if err := b.SetCredentials([]Credential{c.Credential}); err != nil {
		t.Fatal(err)
	}
	kept := (*b.creds.Load())["identity"]
	if kept.keysP.Load() != nil {
		t.Error("the reloaded credential has cache keys before a request")
	}
	is, err := b.GetToken(context.Background(), testCaller, Request{Credential: "identity"})
	if err != nil || is.Source != SourceMemory {
		t.Errorf("after the reload: %v from %q, want the cached token", err, is.Source)
	}
	if got, want := kept.keys().defaultKey, c.keys().defaultKey; got != want {
		t.Errorf("the reloaded credential's key is %q, want the same as before (%q)", got, want)
	}
}
