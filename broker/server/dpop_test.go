package server

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenbroker/tokenbroker/broker/agent"
	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// dpopHarness is a broker with a bearer credential "identity" and a DPoP
// credential "identity-dpop" (client "broker-dpop", EC P-256 key), and a
// resource server that verifies every proof. payments may get proofs for
// the resource server's /v1/accounts only; kyc workloads for any URL.
type dpopHarness struct {
	*harness
	rs      *oauthtest.ResourceServer
	keyFile string
}

func newDPoPHarness(t *testing.T, more ...func(*config.Config)) *dpopHarness {
	t.Helper()
	rsAddr := freeAddr(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	pemKey := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	var keyFile string
	h := newHarness(t, func(c *config.Config) {
		d := c.Credentials[0]
		keyFile = filepath.Join(filepath.Dir(d.ClientSecretFile), "dpop.pem")
		if err := os.WriteFile(keyFile, []byte(pemKey), 0o600); err != nil {
			t.Fatal(err)
		}
		d.Name, d.ClientID, d.DPoP = "identity-dpop", "broker-dpop", &config.DPoP{KeyFile: keyFile, Alg: "ES256"}
		d.AllowedCallers = []config.AllowedCaller{{Caller: payments, URLs: []string{"http://" + rsAddr + "/v1/accounts"}},
			{Caller: "spiffe://bank.internal/ns/kyc/*"}}
		c.Credentials = append(c.Credentials, d)
		for _, m := range more {
			m(c)
		}
	})
	h.secrets = append(h.secrets, pemKey)
	h.as.AddClient(oauthtest.Client{ID: "broker-dpop", Secret: h.secret, Scopes: []string{"IDENTITY", "IDENTITY_READ"}, DPoP: true})
	rs := oauthtest.NewResourceServer(h.as)
	if err := rs.Start(rsAddr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Close() })
	return &dpopHarness{harness: h, rs: rs, keyFile: keyFile}
}

// rotateKey writes a new EC P-256 key over the DPoP key file.
func (h *dpopHarness) rotateKey() {
	h.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		h.t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	pemKey := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	h.secrets = append(h.secrets, pemKey)
	if err := os.WriteFile(h.keyFile, []byte(pemKey), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

// call asks c for a token and a proof for GET url and sends them to the
// resource server; it returns the token and the resource server's status.
func (h *dpopHarness) call(c pb.TokenBrokerClient, url string) (*pb.Token, int) {
	h.t.Helper()
	resp, err := c.GetToken(context.Background(), &pb.GetTokenRequest{Credential: "identity-dpop",
		Dpop: &pb.DPoPRequest{Method: "GET", Url: url, Nonce: h.rs.DPoP().Nonce()}})
	if err != nil {
		h.t.Fatal(err)
	}
	h.remember(resp.GetToken().GetAccessToken())
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "DPoP "+resp.GetToken().GetAccessToken())
	req.Header.Set("DPoP", resp.GetDpopProof())
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	r.Body.Close()
	return resp.GetToken(), r.StatusCode
}

// TestDPoPKeyRotation: a changed key file binds the next token; the token
// already bound to the previous key keeps getting proofs from it until it
// expires.
func TestDPoPKeyRotation(t *testing.T) {
	h := newDPoPHarness(t)
	c := h.client(payments)
	target := h.rs.URL() + "/v1/accounts/1"
	t1, code := h.call(c, target)
	if code != http.StatusOK {
		t.Fatalf("first call: %d", code)
	}
	h.rotateKey()
	again, code := h.call(c, target)
	if code != http.StatusOK || again.GetFingerprint() != t1.GetFingerprint() {
		t.Fatalf("after the rotation, the cached token: %d, same token %v", code, again.GetFingerprint() == t1.GetFingerprint())
	}
	h.clock.Add(tokenTTL)
	t2, code := h.call(c, target)
	if code != http.StatusOK || t2.GetFingerprint() == t1.GetFingerprint() {
		t.Fatalf("after expiry: %d, new token %v", code, t2.GetFingerprint() != t1.GetFingerprint())
	}
	is1, _ := h.as.Lookup(t1.GetAccessToken())
	is2, _ := h.as.Lookup(t2.GetAccessToken())
	if is1.JKT == "" || is1.JKT == is2.JKT {
		t.Errorf("bound to %q then %q; want the new key for the new token", is1.JKT, is2.JKT)
	}
}

// TestDPoPUnknownKeyReplaced: a replica that starts after the key file
// changed, and finds in Redis a token bound to the earlier key, replaces
// that token once rather than fail until it expires; the first replica
// then serves the replacement, proving with the new key.
func TestDPoPUnknownKeyReplaced(t *testing.T) {
	rdb := redistest.Start(t)
	h := newDPoPHarness(t, withRedis("", rdb.Addr()))
	target := h.rs.URL() + "/v1/accounts/1"
	t1, code := h.call(h.client(payments), target)
	if code != http.StatusOK {
		t.Fatalf("first call: %d", code)
	}
	h.rotateKey()
	keyrings.Clear() // the next replica is a new process: it never read the first key
	b, _ := h.startBroker()
	before := h.as.TokenRequests()
	t2, code := h.call(pb.NewTokenBrokerClient(h.connTo(b, nil, payments)), target)
	if code != http.StatusOK || t2.GetFingerprint() == t1.GetFingerprint() {
		t.Fatalf("new replica: %d, replaced %v", code, t2.GetFingerprint() != t1.GetFingerprint())
	}
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("%d token requests, want 1 (the replacement)", n)
	}
	if !strings.Contains(h.logs.String(), "token bound to a DPoP key this process never read") {
		t.Error("the replacement was not for the unknown key (no log line)")
	}
	waitFor(t, "the first replica to serve the replacement", func() bool {
		t3, code := h.call(h.client(payments), target)
		return code == http.StatusOK && t3.GetFingerprint() == t2.GetFingerprint()
	})
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
}

// TestDPoPEndToEnd: a Go caller (client.Transport) and a caller through the
// agent's proxy reach a resource server that verifies every proof; nonce
// challenges at the token endpoint and at the resource server are each
// answered once; the bank sees one request per token lifetime.
func TestDPoPEndToEnd(t *testing.T) {
	h := newDPoPHarness(t)
	h.as.DPoP().SetRequireNonce(true)
	h.rs.DPoP().SetRequireNonce(true)

	// A Go caller.
	src := client.TokenSource(h.conn(nil, payments), "identity-dpop")
	hc := &http.Client{Transport: &client.Transport{Source: src}}
	before := h.as.TokenRequests()
	for i := range 5 {
		resp, err := hc.Get(h.rs.URL() + "/v1/accounts/7?page=" + string(rune('0'+i)))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %s (refusals %v)", i, resp.Status, h.rs.Refusals())
		}
	}
	if got := h.rs.Refusals(); got["use_dpop_nonce"] != 1 || len(got) != 1 {
		t.Errorf("resource server refusals = %v, want one use_dpop_nonce (the challenge, answered once)", got)
	}
	if n := h.as.TokenRequests() - before; n != 2 {
		t.Errorf("token endpoint saw %d requests, want 2 (a nonce challenge and its answer)", n)
	}
	if !src.DPoP() {
		t.Error("the Source did not learn that the credential is DPoP-bound")
	}
	tok, err := src.Token() // the cached token: a thief's copy
	if err != nil || tok.TokenType != "DPoP" {
		t.Fatalf("cached token: %v, %v", tok, err)
	}
	h.remember(tok.AccessToken)

	// A caller of any language, through the agent's proxy.
	listen := freeAddr(t)
	u, _ := url.Parse(h.rs.URL() + "/v1")
	changed := make(chan struct{}, 1)
	asrc := client.TokenSource(h.conn(nil, kycWork), "identity-dpop", client.WithWatch(), client.WithNotify(changed))
	t.Cleanup(func() { _ = asrc.Close() })
	a, err := agent.New(agent.Config{Source: asrc, Changed: changed, Listen: listen, Upstream: u, MinTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	var resp *http.Response
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		req, _ := http.NewRequest("POST", "http://"+listen+"/accounts/9?x=1", strings.NewReader(`{"a":1}`))
		req.Header.Set("DPoP", "caller-supplied junk") // dropped by the proxy
		if resp, err = http.DefaultClient.Do(req); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"path":"/v1/accounts/9"`) {
		t.Fatalf("through the agent: %s %s (refusals %v)", resp.Status, body, h.rs.Refusals())
	}

	// The stolen token, replayed: without a proof, as a bearer token, with a
	// replayed proof, with a proof of another key.
	target := h.rs.URL() + "/v1/accounts/7"
	call := func(auth, proof string) int {
		req, _ := http.NewRequest("GET", target, nil)
		req.Header.Set("Authorization", auth)
		if proof != "" {
			req.Header.Set("DPoP", proof)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := call("DPoP "+tok.AccessToken, ""); code != http.StatusUnauthorized {
		t.Errorf("token without a proof: %d, want 401", code)
	}
	if code := call("Bearer "+tok.AccessToken, ""); code != http.StatusUnauthorized {
		t.Errorf("token as a bearer token: %d, want 401", code)
	}
	// A genuine proof, used once by its caller, then replayed.
	got, err := h.client(payments).GetToken(context.Background(), &pb.GetTokenRequest{Credential: "identity-dpop",
		Dpop: &pb.DPoPRequest{Method: "GET", Url: target, Nonce: h.rs.DPoP().Nonce()}})
	if err != nil {
		t.Fatal(err)
	}
	h.remember(got.GetToken().GetAccessToken())
	if code := call("DPoP "+got.GetToken().GetAccessToken(), got.GetDpopProof()); code != http.StatusOK {
		t.Fatalf("genuine proof: %d (refusals %v)", code, h.rs.Refusals())
	}
	if code := call("DPoP "+got.GetToken().GetAccessToken(), got.GetDpopProof()); code != http.StatusUnauthorized {
		t.Errorf("replayed proof: %d, want 401", code)
	}
	thief, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(thief)
	tk, err := dpop.ParseKey(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), "")
	if err != nil {
		t.Fatal(err)
	}
	forged, _, _ := tk.Proof(dpop.Request{Method: "GET", URL: target, Nonce: h.rs.DPoP().Nonce(), AccessToken: tok.AccessToken}, h.clock.Now())
	if code := call("DPoP "+tok.AccessToken, forged); code != http.StatusUnauthorized {
		t.Errorf("proof of another key: %d, want 401", code)
	}
	if r := h.rs.Refusals(); r["invalid_token"] < 2 || r["invalid_dpop_proof"] < 2 {
		t.Errorf("refusals = %v", r)
	}

	// One request per lifetime: the next token, after this one expires,
	// costs the bank one request (the nonce the last answer sent is kept).
	h.clock.Add(tokenTTL)
	before = h.as.TokenRequests()
	resp, err = hc.Get(h.rs.URL() + "/v1/accounts/7")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("after a lifetime: %s", resp.Status)
	}
	if n := h.as.TokenRequests() - before; n != 1 {
		t.Errorf("the next lifetime cost %d token requests, want 1", n)
	}
}

// TestDPoPTransportReportsRejectedToken: a 401 DPoP error="invalid_token"
// (the bank revoked the token) is reported to the broker once, and the
// request is sent again with the next token and a new proof.
func TestDPoPTransportReportsRejectedToken(t *testing.T) {
	h := newDPoPHarness(t)
	src := client.TokenSource(h.conn(nil, payments), "identity-dpop")
	hc := &http.Client{Transport: &client.Transport{Source: src}}
	get := func() int {
		req, _ := http.NewRequest("PUT", h.rs.URL()+"/v1/accounts/3", strings.NewReader("body"))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("first request: %d", code)
	}
	old, _ := src.Token()
	h.remember(old.AccessToken)
	h.as.Revoke(old.AccessToken)
	before := h.as.TokenRequests()
	if code := get(); code != http.StatusOK {
		t.Fatalf("after the revocation: %d (refusals %v)", code, h.rs.Refusals())
	}
	next, _ := src.Token()
	h.remember(next.AccessToken)
	if n := h.as.TokenRequests() - before; n != 1 || client.Fingerprint(next) == client.Fingerprint(old) {
		t.Errorf("%d token requests, new token %v; want one replacement", n, client.Fingerprint(next) != client.Fingerprint(old))
	}
	if r := h.rs.Refusals(); r["invalid_token"] != 1 {
		t.Errorf("refusals %v, want one invalid_token", r)
	}
}

// TestDPoPRequestRules: the status codes of mismatched and disallowed
// proof requests, and the audit trail of the proofs made.
func TestDPoPRequestRules(t *testing.T) {
	h := newDPoPHarness(t)
	accounts := h.rs.URL() + "/v1/accounts"
	for _, tc := range []struct {
		name, caller, cred string
		dpop               *pb.DPoPRequest
		code               codes.Code
		msg, reason        string
	}{
		{"dpop credential without dpop", payments, "identity-dpop", nil, codes.InvalidArgument, `credential "identity-dpop" is DPoP-bound`, "DPOP_REQUIRED"},
		{"bearer credential with dpop", payments, "identity", &pb.DPoPRequest{Method: "GET", Url: accounts}, codes.InvalidArgument, `credential "identity" issues bearer tokens`, "DPOP_NOT_BOUND"},
		{"url outside the caller's prefixes", payments, "identity-dpop", &pb.DPoPRequest{Method: "GET", Url: h.rs.URL() + "/v1/payments"}, codes.PermissionDenied, "may not get proofs for", ""},
		{"prefix without its boundary", payments, "identity-dpop", &pb.DPoPRequest{Method: "GET", Url: accounts + "x"}, codes.PermissionDenied, "may not get proofs for", ""},
		{"relative url", payments, "identity-dpop", &pb.DPoPRequest{Method: "GET", Url: "/v1/accounts"}, codes.InvalidArgument, "dpop.url", ""},
		{"bad method", payments, "identity-dpop", &pb.DPoPRequest{Method: "GET /x", Url: accounts}, codes.InvalidArgument, "dpop.method", ""},
		{"bad nonce", payments, "identity-dpop", &pb.DPoPRequest{Method: "GET", Url: accounts, Nonce: `a"b`}, codes.InvalidArgument, "dpop.nonce", ""},
		{"stranger", stranger, "identity-dpop", &pb.DPoPRequest{Method: "GET", Url: accounts}, codes.PermissionDenied, "may not use credential", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.get(h.client(tc.caller), &pb.GetTokenRequest{Credential: tc.cred, Dpop: tc.dpop})
			st := status.Convert(err)
			if st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
				t.Fatalf("got %s %q, want %s containing %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
			var reason string
			for _, d := range st.Details() {
				if ei, ok := d.(*errdetails.ErrorInfo); ok {
					reason = ei.GetReason()
				}
			}
			if reason != tc.reason {
				t.Errorf("ErrorInfo reason %q, want %q", reason, tc.reason)
			}
		})
	}
	// The Go client turns the first into ErrDPoPRequired.
	if _, err := client.TokenSource(h.conn(nil, payments), "identity-dpop").Token(); !errors.Is(err, client.ErrDPoPRequired) {
		t.Errorf("Token for a DPoP credential: %v, want ErrDPoPRequired", err)
	}
	// An allowed proof is audited with caller, credential, fingerprint, method, URL without query, jti.
	resp, err := h.client(payments).GetToken(context.Background(), &pb.GetTokenRequest{Credential: "identity-dpop",
		Dpop: &pb.DPoPRequest{Method: "PUT", Url: accounts + "/7?secret=q#frag"}})
	if err != nil {
		t.Fatal(err)
	}
	h.remember(resp.GetToken().GetAccessToken())
	if resp.GetToken().GetTokenType() != "DPoP" || resp.GetDpopProof() == "" {
		t.Fatalf("response: type %q, proof %q", resp.GetToken().GetTokenType(), resp.GetDpopProof())
	}
	if err := h.stop(); err != nil { // flushes the buffered trail
		t.Fatal(err)
	}
	var ev map[string]any
	sc := bufio.NewScanner(strings.NewReader(h.audit.String()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["event"] == "proof.issued" {
			ev = m
		}
	}
	if ev == nil || ev["caller"] != payments || ev["credential"] != "identity-dpop" || ev["fingerprint"] != resp.GetToken().GetFingerprint() ||
		ev["method"] != "PUT" || ev["url"] != accounts+"/7" || ev["jti"] == "" || ev["jti"] == nil {
		t.Errorf("proof.issued = %v", ev)
	}
	if strings.Contains(h.audit.String(), resp.GetDpopProof()) {
		t.Error("a proof in the audit trail")
	}
}

// TestAgentRefusesDPoPFile: a token file cannot carry proofs.
func TestAgentRefusesDPoPFile(t *testing.T) {
	h := newDPoPHarness(t)
	changed := make(chan struct{}, 1)
	src := client.TokenSource(h.conn(nil, payments), "identity-dpop", client.WithWatch(), client.WithNotify(changed))
	t.Cleanup(func() { _ = src.Close() })
	a, err := agent.New(agent.Config{Source: src, Changed: changed, File: h.path("token"), MinTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Run(ctx); !errors.Is(err, agent.ErrDPoPFile) || !strings.Contains(err.Error(), "cannot carry the proof") {
		t.Errorf("Run = %v, want ErrDPoPFile", err)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// remember adds a token a test got outside h.get to the log scan.
func (h *harness) remember(tok string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.tokens == nil {
		h.tokens = map[string]bool{}
	}
	h.tokens[tok] = true
}

// TestAdminShowsDPoPURLs: the Admin inventory shows, for each caller rule
// of a DPoP credential, the API URL prefixes its proofs may name, as
// configured — what a platform engineer needs to answer "why was this
// proof refused".
func TestAdminShowsDPoPURLs(t *testing.T) {
	h := newDPoPHarness(t, func(c *config.Config) { c.Admin.Callers = []string{operator} })
	admin := pb.NewAdminClient(h.conn(nil, operator))
	resp, err := admin.DescribeCredentials(context.Background(), &pb.DescribeCredentialsRequest{Name: "identity-dpop"})
	if err != nil {
		t.Fatal(err)
	}
	rules := resp.GetCredentials()[0].GetAllowedCallers()
	want := h.cfg.Credentials[len(h.cfg.Credentials)-1].AllowedCallers
	if len(rules) != len(want) {
		t.Fatalf("%d caller rules, want %d", len(rules), len(want))
	}
	for i, r := range rules {
		if r.GetCaller() != want[i].Caller || !slices.Equal(r.GetUrls(), want[i].URLs) {
			t.Errorf("rule %d: %s %v, want %s %v", i, r.GetCaller(), r.GetUrls(), want[i].Caller, want[i].URLs)
		}
	}
	if len(rules[0].GetUrls()) != 1 {
		t.Errorf("the payments rule shows no URL prefix: %v", rules[0])
	}
}
