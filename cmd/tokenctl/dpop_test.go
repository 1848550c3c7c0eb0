package main

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

// TestTokenDPoP: `tokenctl token CRED --dpop-method M --dpop-url U` prints
// both header lines, with a proof that verifies for that request and
// token; without the flags a DPoP credential is a usage error that says
// why; `agent --write` refuses it.
func TestTokenDPoP(t *testing.T) {
	s := startDevServer(t, "")
	dev := []string{"--dev", "--dev-dir", s.dir}
	const u = "https://api.example/v1/accounts/7?page=2"
	code, out, stderr := s.tokenctl(t, append(dev, "token", "identity-dpop", "--dpop-method", "GET", "--dpop-url", u)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 2 || !strings.HasPrefix(lines[0], "Authorization: DPoP ") || !strings.HasPrefix(lines[1], "DPoP: ") {
		t.Fatalf("token --dpop-* = %d, %q, stderr %q; want two header lines", code, out, stderr)
	}
	tok := strings.TrimPrefix(lines[0], "Authorization: DPoP ")
	req, _ := http.NewRequest("GET", u, nil)
	req.Header.Set("DPoP", strings.TrimPrefix(lines[1], "DPoP: "))
	var v oauthtest.ProofVerifier
	if _, err := v.Verify(req, "https://api.example/v1/accounts/7", tok); err != nil {
		t.Errorf("the printed proof does not verify: %v", err)
	}

	code, _, stderr = s.tokenctl(t, append(dev, "token", "identity-dpop")...)
	if code != exitUsage || !strings.Contains(stderr, "DPoP-bound") || !strings.Contains(stderr, "dpop") {
		t.Errorf("token without --dpop-*: %d, %q; want exit 2 and a message saying the credential is DPoP-bound", code, stderr)
	}
	code, _, stderr = s.tokenctl(t, append(dev, "token", "identity", "--dpop-method", "GET", "--dpop-url", u)...)
	if code != exitUsage || !strings.Contains(stderr, "bearer") {
		t.Errorf("bearer credential with --dpop-*: %d, %q; want exit 2", code, stderr)
	}
	code, _, stderr = s.tokenctl(t, append(dev, "token", "identity-dpop", "--dpop-method", "GET")...)
	if code != exitUsage {
		t.Errorf("--dpop-method without --dpop-url: %d, %q; want exit 2", code, stderr)
	}
	code, _, stderr = s.tokenctl(t, append(dev, "agent", "identity-dpop", "--write", filepath.Join(t.TempDir(), "token"))...)
	if code != exitUsage || !strings.Contains(stderr, "cannot carry the proof") {
		t.Errorf("agent --write for a DPoP credential: %d, %q; want exit 2 and why", code, stderr)
	}
}
