package upstream

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
)

const testSecret = "upstream-test-secret"

func newServer(t *testing.T) *oauthtest.Server {
	t.Helper()
	as := oauthtest.New(oauthtest.Options{ExpiresIn: time.Hour})
	as.AddClient(oauthtest.Client{ID: "app", Secret: testSecret, Scopes: []string{"IDENTITY", "READ"}})
	if err := as.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = as.Close() })
	return as
}

// secretFileFor writes the test secret for a fuzz target.
func secretFileFor(f *testing.F) string {
	p := filepath.Join(f.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(testSecret), 0o600); err != nil {
		f.Fatal(err)
	}
	return p
}

func secretFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFetchAuthMethods(t *testing.T) {
	as := newServer(t)
	for _, m := range []AuthMethod{ClientSecretBasic, ClientSecretPost} {
		c, err := New(Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile(t, testSecret), AuthMethod: m,
			EndpointParams: url.Values{"audience": {"identity-api"}}})
		if err != nil {
			t.Fatal(err)
		}
		before := time.Now()
		tok, err := c.Fetch(context.Background(), []string{"IDENTITY"})
		if err != nil {
			t.Fatalf("%s: Fetch: %v", m, err)
		}
		is, ok := as.Lookup(tok.AccessToken)
		if !ok || is.AuthMethod != string(m) {
			t.Errorf("%s: issued %+v (found %v), want auth method %s", m, is, ok, m)
		}
		if got := as.LastForm().Get("audience"); got != "identity-api" {
			t.Errorf("%s: audience sent = %q, want identity-api", m, got)
		}
		if as.LastForm().Has("client_secret") {
			t.Errorf("%s: LastForm kept the client secret", m)
		}
		if strings.Join(tok.Scopes, " ") != "IDENTITY" || !strings.EqualFold(tok.TokenType, "bearer") {
			t.Errorf("%s: token = %+v", m, tok)
		}
		if lt := tok.Expiry.Sub(tok.IssuedAt); lt != time.Hour || tok.IssuedAt.Before(before) {
			t.Errorf("%s: lifetime %v from %v, want 1h from after %v", m, lt, tok.IssuedAt, before)
		}
	}
}

func TestFetchErrorsCarryNoBody(t *testing.T) {
	as := newServer(t)
	c, err := New(Config{TokenURL: as.TokenURL(), ClientID: "app", ClientSecretFile: secretFile(t, "wrong")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonRejected || ue.Code != "invalid_client" || ue.StatusCode != 401 || ue.Temporary {
		t.Fatalf("wrong secret: %#v, want rejected invalid_client 401", err)
	}
	if strings.Contains(err.Error(), "client authentication failed") || strings.Contains(err.Error(), "wrong") {
		t.Errorf("error %q holds the response body or the secret", err)
	}

	as.SetFaults(oauthtest.Faults{Status: 429, RetryAfter: "30"})
	_, err = c.Fetch(context.Background(), nil)
	if !errors.As(err, &ue) || ue.Reason != ReasonThrottled || !ue.Temporary || ue.RetryAfter != 30*time.Second {
		t.Errorf("429: %#v, want throttled, temporary, RetryAfter 30s", err)
	}
}

func TestFetchUnreachableAndMissingSecret(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens here now
	c, err := New(Config{TokenURL: "http://" + addr + "/token", ClientID: "app", ClientSecretFile: secretFile(t, testSecret)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonNetwork || !ue.Temporary {
		t.Errorf("unreachable: %v, want a temporary network error", err)
	}

	c, err = New(Config{TokenURL: "http://" + addr + "/token", ClientID: "app", ClientSecretFile: filepath.Join(t.TempDir(), "nope")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Fetch(context.Background(), nil)
	if !errors.As(err, &ue) || ue.Reason != ReasonNoSecret || ue.Temporary || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing secret file: %v, want no_secret wrapping ErrNotExist", err)
	}
}

func TestLifetime(t *testing.T) {
	const def, maxTTL = 5 * time.Minute, time.Hour
	tests := []struct {
		in      any
		want    time.Duration
		wantErr bool
	}{
		{nil, def, false},
		{"", def, false},
		{float64(300), 300 * time.Second, false},
		{"3600", time.Hour, false},
		{float64(86400), maxTTL, false},
		{float64(5 * 365 * 86400), maxTTL, false},
		{float64(11 * 365 * 86400), 0, true},
		{"1e300", 0, true},
		{float64(0), 0, true},
		{float64(-5), 0, true},
		{math.NaN(), 0, true},
		{"soon", 0, true},
		{true, 0, true},
	}
	for _, tt := range tests {
		got, err := lifetime(tt.in, def, maxTTL)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("lifetime(%v) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"30":                            30 * time.Second,
		"-3":                            0,
		"Thu, 01 Jan 2026 00:01:00 GMT": time.Minute,
		"Wed, 31 Dec 2025 00:00:00 GMT": 0,
		"later":                         0,
	} {
		if got := retryAfter(in, now); got != want {
			t.Errorf("retryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestBodyIsCapped(t *testing.T) {
	// A 2 MiB JSON body: read up to the 1 MiB cap, so it does not parse.
	big := `{"access_token":"a","token_type":"Bearer","expires_in":60,"pad":"` + strings.Repeat("x", 2<<20) + `"}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(big))
	}))
	defer srv.Close()
	c, err := New(Config{TokenURL: srv.URL, ClientID: "app", ClientSecretFile: secretFile(t, testSecret)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Fetch(context.Background(), nil)
	var ue *Error
	if !errors.As(err, &ue) || ue.Reason != ReasonMalformed {
		t.Errorf("2 MiB body: %v, want a malformed-response error", err)
	}
}

// TestProxyFromEnvironment: the client takes its proxy from HTTPS_PROXY and
// NO_PROXY (lower case too), as net/http reads them. The process reads them
// once, so each case runs in a child process of this test binary.
// TestHTTPSProxyHonoured (cmd/tokenbroker) sends real token requests through
// a CONNECT proxy.
func TestProxyFromEnvironment(t *testing.T) {
	if os.Getenv("UPSTREAM_PROXY_CHILD") == "1" {
		c, err := New(Config{TokenURL: "https://bank.test/oauth2/token", ClientID: "app", ClientSecretFile: "/nonexistent"})
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest(http.MethodPost, "https://bank.test/oauth2/token", nil)
		u, err := c.http.Transport.(*http.Transport).Proxy(req)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("proxy=%v\n", u)
		return
	}
	for _, tt := range []struct {
		env  []string
		want string
	}{
		{[]string{"HTTPS_PROXY=http://127.0.0.1:3128"}, "proxy=http://127.0.0.1:3128"},
		{[]string{"https_proxy=http://127.0.0.1:3129"}, "proxy=http://127.0.0.1:3129"},
		{[]string{"HTTPS_PROXY=http://127.0.0.1:3128", "NO_PROXY=bank.test"}, "proxy=<nil>"},
		{[]string{"HTTPS_PROXY=http://127.0.0.1:3128", "NO_PROXY=.test"}, "proxy=<nil>"},
		{[]string{"HTTPS_PROXY=http://127.0.0.1:3128", "NO_PROXY=other.example"}, "proxy=http://127.0.0.1:3128"},
		{[]string{"HTTP_PROXY=http://127.0.0.1:3128"}, "proxy=<nil>"}, // https goes by HTTPS_PROXY only
		{nil, "proxy=<nil>"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestProxyFromEnvironment$", "-test.v")
		cmd.Env = append([]string{"UPSTREAM_PROXY_CHILD=1", "PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, tt.env...)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), tt.want+"\n") {
			t.Errorf("with %q: %v\n%s\nwant %s", tt.env, err, out, tt.want)
		}
	}
}

// TestRedirectNotFollowed: whatever the 3xx, the client stays on the token
// URL and reports the redirect's scheme and host only.
func TestRedirectNotFollowed(t *testing.T) {
	var stolen atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { stolen.Add(1) }))
	defer target.Close()
	for _, code := range []int{301, 302, 303, 307, 308} {
		for _, m := range []AuthMethod{ClientSecretBasic, ClientSecretPost} {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, target.URL+"/steal?x=1", code)
			}))
			c, err := New(Config{TokenURL: srv.URL, ClientID: "app", ClientSecretFile: secretFile(t, testSecret), AuthMethod: m})
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Fetch(context.Background(), []string{"IDENTITY"})
			var ue *Error
			if !errors.As(err, &ue) || ue.Reason != ReasonRedirect || ue.Temporary || ue.StatusCode != code || ue.Location != target.URL {
				t.Errorf("%d %s: %v (%+v), want a redirect to %s", code, m, err, ue, target.URL)
			}
			if strings.Contains(err.Error(), "steal") {
				t.Errorf("%d: %q names the Location's path", code, err)
			}
			srv.Close()
		}
	}
	if n := stolen.Load(); n != 0 {
		t.Errorf("the redirect target got %d requests", n)
	}
}

// TestReview2RetryAfterHuge: a hostile token endpoint's huge Retry-After
// is a long delay (capped by the gate), never one that wraps to a short
// one or is ignored.
func TestReview2RetryAfterHuge(t *testing.T) {
	now := time.Now()
	for _, in := range []string{"9223372037", "18446744074", "99999999999999999999999"} {
		if got := retryAfter(in, now); got < 24*time.Hour {
			t.Errorf("retryAfter(%q) = %v, want a long delay", in, got)
		}
	}
	if got := retryAfter("-99999999999999999999999", now); got != 0 {
		t.Errorf("negative Retry-After = %v, want 0", got)
	}
}
