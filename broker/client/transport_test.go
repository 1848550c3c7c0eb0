package client_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// resourceServer is an httptest stand-in for the bank's API. It records each
// request's token and body, and answers 401 to the tokens reject says no to.
type resourceServer struct {
	*httptest.Server
	mu     sync.Mutex
	tokens []string
	bodies []string
}

func newResourceServer(t *testing.T, reject func(n int, token string) bool) *resourceServer {
	rs := &resourceServer{}
	rs.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if r.URL.RawQuery != "" {
			t.Errorf("request with a query string %q: a token must never go in the URL", r.URL.RawQuery)
		}
		rs.mu.Lock()
		rs.tokens = append(rs.tokens, tok)
		rs.bodies = append(rs.bodies, string(body))
		n := len(rs.tokens)
		rs.mu.Unlock()
		if !ok || tok == "" || reject(n, tok) {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			http.Error(w, "invalid_token", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, "ok")
	}))
	t.Cleanup(rs.Close)
	return rs
}

func (rs *resourceServer) seen() ([]string, []string) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]string(nil), rs.tokens...), append([]string(nil), rs.bodies...)
}

// oneShotBody is a request body that cannot be read twice (no GetBody).
type oneShotBody struct{ io.Reader }

func (oneShotBody) Close() error { return nil }

func TestTransport(t *testing.T) {
	b := newBroker(t)

	for _, tt := range []struct {
		name           string
		reject         func(n int, token string) bool
		body           func() io.Reader // nil: a GET without a body
		wantStatus     int
		wantRequests   int
		wantInvalidate int64
	}{
		{"accepted", func(int, string) bool { return false }, nil, 200, 1, 0},
		{"first token rejected: report, retry once, success",
			func(n int, _ string) bool { return n == 1 }, nil, 200, 2, 1},
		{"replayable body is sent again",
			func(n int, _ string) bool { return n == 1 },
			func() io.Reader { return strings.NewReader(`{"q":"me"}`) }, 200, 2, 1},
		{"rejected twice: the second 401 goes to the caller",
			func(int, string) bool { return true }, nil, 401, 2, 1},
		{"body that cannot be replayed: reported, not retried",
			func(n int, _ string) bool { return n == 1 },
			func() io.Reader { return oneShotBody{strings.NewReader(`{"q":"me"}`)} }, 401, 1, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rs := newResourceServer(t, tt.reject)
			conn, calls := b.conn(t)
			ts := client.TokenSource(conn, devmode.Credential)
			defer ts.Close()
			hc := &http.Client{Transport: &client.Transport{Source: ts}}

			method, want := http.MethodGet, ""
			var body io.Reader
			if tt.body != nil {
				body = tt.body()
				method, want = http.MethodPost, `{"q":"me"}`
			}
			req, err := http.NewRequestWithContext(t.Context(), method, rs.URL+"/identity/v1/me", body)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := body.(oneShotBody); ok && req.GetBody != nil {
				t.Fatal("test setup: the one-shot body is replayable")
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if req.Header.Get("Authorization") != "" {
				t.Error("the caller's request was modified")
			}

			tokens, bodies := rs.seen()
			if resp.StatusCode != tt.wantStatus || len(tokens) != tt.wantRequests || calls.invalidate.Load() != tt.wantInvalidate {
				t.Fatalf("status %d, %d requests, %d InvalidateToken calls; want %d, %d, %d",
					resp.StatusCode, len(tokens), calls.invalidate.Load(), tt.wantStatus, tt.wantRequests, tt.wantInvalidate)
			}
			for i, tok := range tokens {
				if _, ok := b.env.OAuth.Lookup(tok); !ok {
					t.Errorf("request %d: the Bearer token is not one the authorization server issued", i+1)
				}
				if bodies[i] != want {
					t.Errorf("request %d: body %q, want %q", i+1, bodies[i], want)
				}
			}
			if len(tokens) == 2 && tokens[0] == tokens[1] {
				t.Error("the retry used the rejected token")
			}
		})
	}
}

func TestTransportRefusesCleartext(t *testing.T) {
	b := newBroker(t)
	conn, calls := b.conn(t)
	ts := client.TokenSource(conn, devmode.Credential)
	defer ts.Close()
	hc := &http.Client{Transport: &client.Transport{Source: ts}}
	_, err := hc.Get("http://api.bank.example/identity/v1/me")
	if err == nil || !strings.Contains(err.Error(), "refusing to send a bearer token") {
		t.Errorf("plain http to a remote host: %v, want a refusal", err)
	}
	if n := calls.get.Load(); n != 0 {
		t.Errorf("%d GetToken calls for a refused request, want 0", n)
	}
}

// TestTransport401s: the agent attack of issue 23. A resource server answers
// 20 requests with 401 — 5 of them insufficient_scope, 15 invalid_token —
// some of them at once. insufficient_scope is passed on as it is, with no
// report and no retry; each rejected token is reported once whatever the
// number of requests it failed; the broker asks the bank for a new token only
// after a report, never more often than tokens were reported.
func TestTransport401s(t *testing.T) {
	b := newBroker(t)
	var mu sync.Mutex
	scope := 0 // how many insufficient_scope answers are still to give
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.URL.Path == "/scope" && scope > 0 {
			scope--
			w.Header().Set("WWW-Authenticate", `Bearer realm="bank", error="insufficient_scope", scope="IDENTITY_WRITE"`)
		} else {
			w.Header().Set("WWW-Authenticate", `Bearer realm="bank", error="invalid_token"`)
		}
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(rs.Close)
	var reported sync.Map // fingerprint → *atomic.Int64: InvalidateToken calls for it
	var inv atomic.Int64
	conn, err := client.DialFiles(b.addr, b.files(), grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
		req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*pb.InvalidateTokenRequest); ok {
			inv.Add(1)
			n, _ := reported.LoadOrStore(r.GetFingerprint(), &atomic.Int64{})
			n.(*atomic.Int64).Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ts := client.TokenSource(conn, devmode.Credential)
	defer ts.Close()
	hc := &http.Client{Transport: &client.Transport{Source: ts}}
	seen := map[string]bool{} // the tokens the resource server saw
	var seenMu sync.Mutex
	rs.Config.Handler = func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			seenMu.Lock()
			seen[r.Header.Get("Authorization")] = true
			seenMu.Unlock()
			h.ServeHTTP(w, r)
		})
	}(rs.Config.Handler)
	do := func(path string) int {
		resp, err := hc.Get(rs.URL + path)
		if err != nil {
			t.Error(err)
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	fetches0 := b.env.OAuth.TokenRequests()

	mu.Lock()
	scope = 5
	mu.Unlock()
	for range 5 {
		if got := do("/scope"); got != http.StatusUnauthorized {
			t.Fatalf("insufficient_scope: status %d, want 401 passed on", got)
		}
	}
	if n := inv.Load(); n != 0 {
		t.Fatalf("5 insufficient_scope answers made %d InvalidateToken calls, want 0", n)
	}

	// 10 requests at once with the same token, then 5 one after another.
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() { do("/invalid") })
	}
	wg.Wait()
	for range 5 {
		do("/invalid")
	}
	invalidations, fetches := inv.Load(), b.env.OAuth.TokenRequests()-fetches0
	seenMu.Lock()
	tokens := len(seen)
	seenMu.Unlock()
	t.Logf("15 invalid_token requests (with their retries, 401s for %d tokens): %d InvalidateToken calls, %d token requests to the bank",
		tokens, invalidations, fetches)
	reported.Range(func(fp, n any) bool {
		if n.(*atomic.Int64).Load() != 1 {
			t.Errorf("token %s reported %d times, want once", fp, n.(*atomic.Int64).Load())
		}
		return true
	})
	if invalidations < 1 || invalidations > int64(tokens) {
		t.Errorf("%d InvalidateToken calls for 401s on %d tokens, want between 1 and one per token", invalidations, tokens)
	}
	if fetches > invalidations {
		t.Errorf("%d token requests to the bank after %d invalidations: want at most one per invalidation", fetches, invalidations)
	}
}
