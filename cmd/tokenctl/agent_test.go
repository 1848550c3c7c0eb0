package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/server"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// agentEnv is a broker in dev mode, in process, whose authorization server
// the test can steer, and an upstream API that accepts only its tokens.
type agentEnv struct {
	env      *devmode.Env
	addr     string
	api      *httptest.Server
	apiCA    string // the API's CA certificate file
	mu       sync.Mutex
	requests []*http.Request // as the API received them
	bodies   []string
	reject   func(n int, token string) bool
}

func newAgentEnv(t *testing.T) *agentEnv {
	t.Helper()
	e := prepareAgentEnv(t)
	e.startBroker(t, "127.0.0.1:0")
	return e
}

// startBroker starts the broker on addr; stop stops it (cleanup does too).
func (e *agentEnv) startBroker(t *testing.T, addr string) (stop func()) {
	t.Helper()
	cfg := *e.env.Config
	cfg.ListenAddr, cfg.AdminAddr = addr, "127.0.0.1:0"
	cfg.Audit.Path = filepath.Join(e.env.Dir, "audit.log")
	srv, err := server.New(server.Options{Config: &cfg})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	e.addr = srv.GRPCAddr().String()
	return stop
}

// prepareAgentEnv makes the dev environment and the upstream API, without a broker.
func prepareAgentEnv(t *testing.T) *agentEnv {
	t.Helper()
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	e := &agentEnv{env: env, reject: func(int, string) bool { return false }}
	e.api = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		e.mu.Lock()
		e.requests = append(e.requests, r)
		e.bodies = append(e.bodies, string(body))
		n, reject := len(e.requests), e.reject
		e.mu.Unlock()
		if _, issued := env.OAuth.Lookup(tok); !issued || reject(n, tok) {
			http.Error(w, "invalid_token", http.StatusUnauthorized)
			return
		}
		if r.URL.Path == "/slow" {
			time.Sleep(time.Second)
		}
		fmt.Fprintf(w, "ok %s %s", r.URL.Path, r.URL.RawQuery)
	}))
	t.Cleanup(e.api.Close)
	e.apiCA = filepath.Join(t.TempDir(), "api-ca.pem")
	cert := e.api.Certificate()
	if err := os.WriteFile(e.apiCA, pemCert(cert.Raw), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *agentEnv) seen() ([]*http.Request, []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*http.Request(nil), e.requests...), append([]string(nil), e.bodies...)
}

// args are tokenctl's global flags for the dev caller of e.
func (e *agentEnv) args(cmd ...string) []string {
	return append([]string{"--addr", e.addr, "--dev", "--dev-dir", e.env.Dir}, cmd...)
}

// runningAgent is `tokenctl agent` run in process until stop.
type runningAgent struct {
	stderr *syncBuffer
	stop   func() int
}

func startAgent(t *testing.T, e *agentEnv, args ...string) *runningAgent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{stderr: &syncBuffer{}}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, e.args(append([]string{"agent", devmode.Credential}, args...)...), io.Discard, ra.stderr)
	}()
	var once sync.Once
	var code int
	ra.stop = func() int { once.Do(func() { cancel(); code = <-done }); return code }
	t.Cleanup(func() { ra.stop() })
	return ra
}

// eventually polls cond every 10ms for up to 10s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %s", what)
		}
	}
}

func readToken(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// TestAgentTokenFile: the file appears with the token (no newline, the mode
// asked for) and is rewritten on an invalidation by someone else and on a
// rotation; each rotation is logged by fingerprint, never the token.
func TestAgentTokenFile(t *testing.T) {
	e := newAgentEnv(t)
	e.env.OAuth.SetExpiresIn(24 * time.Second) // 12s after the broker's margin: rotations within the test
	file := filepath.Join(t.TempDir(), "token")
	ra := startAgent(t, e, "--write", file, "--mode", "0600", "--min-ttl", "3s")
	eventually(t, "the token file appears", func() bool { return readToken(file) != "" })
	first := readToken(file)
	if _, ok := e.env.OAuth.Lookup(first); !ok || strings.ContainsAny(first, "\r\n ") {
		t.Fatalf("file holds %q, want exactly a token the bank issued", first)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v (%v), want 0600", fi.Mode().Perm(), err)
	}

	// Someone else reports the token: the file follows.
	var out, errb syncBuffer
	fp := fingerprintOf(first)
	if code := run(context.Background(), e.args("invalidate", devmode.Credential, "--fingerprint", fp), &out, &errb); code != 0 {
		t.Fatalf("invalidate: %d %s", code, errb.String())
	}
	eventually(t, "the file changes after the invalidation", func() bool { return readToken(file) != first })
	second := readToken(file)

	// The token nears the end of its life: the broker's watch pushes its
	// replacement before it falls below --min-ttl.
	eventually(t, "the file changes on rotation", func() bool { return readToken(file) != second })
	third := readToken(file)
	if _, ok := e.env.OAuth.Lookup(third); !ok {
		t.Errorf("rotated file holds a token the bank did not issue")
	}

	if code := ra.stop(); code != 0 {
		t.Errorf("agent exit code = %d, want 0; stderr:\n%s", code, ra.stderr.String())
	}
	logs := ra.stderr.String()
	if !strings.Contains(logs, `"msg":"agent ready"`) || strings.Contains(logs, "PANIC") {
		t.Errorf("agent log lacks its ready line or holds a logging failure:\n%s", logs)
	}
	for _, tok := range []string{first, second, third} {
		if strings.Contains(logs, tok) {
			t.Error("a token is in the agent's log")
		}
		if !strings.Contains(logs, fingerprintOf(tok)) {
			t.Errorf("no log line with rotation fingerprint %s", fingerprintOf(tok))
		}
	}
	if fi, _ := os.Stat(file); fi == nil || readToken(file) != third {
		t.Error("the file is gone or changed after the agent stopped")
	}
	if entries, _ := os.ReadDir(filepath.Dir(file)); len(entries) != 1 {
		t.Errorf("the directory holds %d entries, want only the token file (no temporary leftovers)", len(entries))
	}
}

// TestAgentWaitsForTheBroker: started while the broker is unreachable, the
// agent keeps trying (with backoff, saying so) and writes the file once the
// broker is up; when the broker goes away again, the agent keeps running
// and the last token stays in the file.
func TestAgentWaitsForTheBroker(t *testing.T) {
	e := prepareAgentEnv(t)
	e.addr = "127.0.0.1:" + freePort(t)
	file := filepath.Join(t.TempDir(), "token")
	ra := startAgent(t, e, "--write", file)
	eventually(t, "the agent says the broker is unreachable", func() bool {
		return strings.Contains(ra.stderr.String(), "no token from the broker")
	})
	if readToken(file) != "" {
		t.Fatal("a token file without a broker")
	}
	stopBroker := e.startBroker(t, e.addr)
	eventually(t, "the token file appears once the broker is up", func() bool { return readToken(file) != "" })
	tok := readToken(file)
	stopBroker()
	time.Sleep(1500 * time.Millisecond) // the watch stream breaks and is retried
	if got := readToken(file); got != tok {
		t.Errorf("with the broker gone the file holds %q, want the last token", got)
	}
	if code := ra.stop(); code != 0 {
		t.Errorf("exit %d, want 0", code)
	}
}

// TestAgentProxy: every request reaches the one upstream with the current
// token, whatever host or Authorization the caller sent; path and query are
// kept; no X-Forwarded-For is added; a 401 is reported and retried once with
// a new token for a body that can be replayed, and not for one over 1 MiB.
func TestAgentProxy(t *testing.T) {
	e := newAgentEnv(t)
	health := "127.0.0.1:" + freePort(t)
	listen := "127.0.0.1:" + freePort(t)
	startAgent(t, e, "--listen", listen, "--upstream", e.api.URL+"/base", "--upstream-ca", e.apiCA, "--health", health)
	eventually(t, "the agent is healthy", func() bool {
		resp, err := http.Get("http://" + health + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	req, _ := http.NewRequest(http.MethodGet, "http://"+listen+"/identity/v1/me?x=1", nil)
	req.Header.Set("Authorization", "Bearer caller-supplied")
	req.Header.Set("X-Forwarded-For", "10.1.2.3")
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "hop-by-hop, named in Connection")
	req.Header.Set("X-Kept", "end to end")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok /base/identity/v1/me x=1" {
		t.Fatalf("proxied GET = %d %q, want 200 for /base/identity/v1/me?x=1", resp.StatusCode, body)
	}
	reqs, _ := e.seen()
	got := reqs[0]
	if tok, _ := strings.CutPrefix(got.Header.Get("Authorization"), "Bearer "); tok == "caller-supplied" || len(got.Header.Values("Authorization")) != 1 {
		t.Errorf("upstream Authorization = %q, want only the broker's token", got.Header.Values("Authorization"))
	}
	if got.Header.Get("X-Hop") != "" || got.Header.Get("X-Kept") != "end to end" {
		t.Errorf("upstream X-Hop %q, X-Kept %q: want hop-by-hop headers dropped and the others kept", got.Header.Get("X-Hop"), got.Header.Get("X-Kept"))
	}
	if got.Host != strings.TrimPrefix(e.api.URL, "https://") || got.Header.Get("X-Forwarded-For") != "" {
		t.Errorf("upstream Host %q, X-Forwarded-For %q; want the upstream's host and no X-Forwarded-For", got.Host, got.Header.Get("X-Forwarded-For"))
	}

	// The API rejects the next token once: the agent reports it and retries.
	e.mu.Lock()
	e.reject = func(n int, _ string) bool { return n == 2 }
	e.mu.Unlock()
	resp, err = http.Post("http://"+listen+"/submit", "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	reqs, bodies := e.seen()
	if resp.StatusCode != http.StatusOK || len(reqs) != 3 || bodies[2] != "payload" ||
		reqs[1].Header.Get("Authorization") == reqs[2].Header.Get("Authorization") {
		t.Errorf("after a 401: status %d, %d upstream requests, retried body %q; want 200 after one retry with a new token and the same body",
			resp.StatusCode, len(reqs), bodies[len(bodies)-1])
	}

	// Over 1 MiB: the 401 goes back to the caller, no retry.
	e.mu.Lock()
	e.reject = func(n int, _ string) bool { return n == 4 }
	e.mu.Unlock()
	big := strings.Repeat("x", 1<<20+1)
	resp, err = http.Post("http://"+listen+"/submit", "text/plain", strings.NewReader(big))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	reqs, bodies = e.seen()
	if resp.StatusCode != http.StatusUnauthorized || len(reqs) != 4 || len(bodies[3]) != len(big) {
		t.Errorf("large body after a 401: status %d, %d upstream requests; want the 401 passed on, no retry", resp.StatusCode, len(reqs))
	}
}

// TestAgentRefusals: a non-loopback proxy address, or a plain-http upstream off
// loopback (every request would be a 502), is refused before anything
// runs; a caller without access exits at once with the status's exit code.
func TestAgentRefusals(t *testing.T) {
	e := newAgentEnv(t)
	tests := []struct {
		name   string
		global []string
		args   []string
		faults *oauthtest.Faults
		want   int
		msg    string
	}{
		{"non-loopback listen", nil, []string{"agent", "identity", "--listen", "0.0.0.0:0", "--upstream", "https://api.bank.example"}, nil, exitUsage, "not a loopback address"},
		{"empty-host listen", nil, []string{"agent", "identity", "--listen", ":0", "--upstream", "https://api.bank.example"}, nil, exitUsage, "not a loopback address"},
		{"http upstream off loopback", nil, []string{"agent", "identity", "--listen", "127.0.0.1:0", "--upstream", "http://api.bank.example"}, nil, exitUsage, "plain http is allowed only to a loopback address"},
		{"neither write nor listen", nil, []string{"agent", "identity"}, nil, exitUsage, "--write FILE or --listen ADDR"},
		{"unknown credential", nil, []string{"agent", "nope", "--write", filepath.Join(t.TempDir(), "t")}, nil, exitDenied, "PermissionDenied"},
		{"denied caller", []string{"--ca", e.env.Path(devmode.CAFile), "--cert", e.env.Path(devmode.DeniedCertFile), "--key", e.env.Path(devmode.DeniedKeyFile)},
			[]string{"agent", "identity", "--write", filepath.Join(t.TempDir(), "t")}, nil, exitDenied, "PermissionDenied"},
		{"bank refuses the registration", nil, []string{"agent", "identity", "--write", filepath.Join(t.TempDir(), "t")},
			&oauthtest.Faults{ErrorCode: "invalid_client"}, exitPrecondition, "FailedPrecondition"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.faults != nil {
				e.env.OAuth.SetFaults(*tt.faults)
				defer e.env.OAuth.SetFaults(oauthtest.Faults{})
			}
			args := e.args(tt.args...)
			if tt.global != nil {
				args = append(append([]string{"--addr", e.addr}, tt.global...), tt.args...)
			}
			var errb syncBuffer
			start := time.Now()
			code := run(context.Background(), args, io.Discard, &errb)
			if code != tt.want || !strings.Contains(errb.String(), tt.msg) {
				t.Errorf("exit %d, stderr %q; want %d mentioning %q", code, errb.String(), tt.want, tt.msg)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v to give up, want at once", d)
			}
		})
	}
}

// TestAgentSIGTERM: the real binary, sent SIGTERM while a proxied request is
// in flight, finishes that request and exits 0.
func TestAgentSIGTERM(t *testing.T) {
	e := newAgentEnv(t)
	bin := filepath.Join(t.TempDir(), "tokenctl")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	listen := "127.0.0.1:" + freePort(t)
	file := filepath.Join(t.TempDir(), "token")
	cmd := exec.Command(bin, e.args("agent", "identity", "--write", file, "--listen", listen, "--upstream", e.api.URL, "--upstream-ca", e.apiCA)...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	eventually(t, "the agent writes its token file", func() bool { return readToken(file) != "" })

	type result struct {
		status int
		err    error
	}
	res := make(chan result, 1)
	go func() {
		var resp *http.Response
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if resp, err = http.Get("http://" + listen + "/slow"); err == nil {
				break
			}
		}
		if err != nil {
			res <- result{0, err}
			return
		}
		resp.Body.Close()
		res <- result{resp.StatusCode, nil}
	}()
	eventually(t, "the slow request reaches the API", func() bool { reqs, _ := e.seen(); return len(reqs) > 0 })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if r := <-res; r.err != nil || r.status != http.StatusOK {
		t.Errorf("in-flight request: %d %v, want 200", r.status, r.err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("agent exit after SIGTERM: %v, want 0; stderr:\n%s", err, stderr.String())
	}
}

// TestRefusedHandshakeExplained: a certificate the broker does not accept is
// explained, with what can be checked locally.
func TestRefusedHandshakeExplained(t *testing.T) {
	e := newAgentEnv(t)
	dir := t.TempDir()
	other, err := devpki.NewCA("another CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherPair, err := other.Client(time.Hour, devmode.ClientIdentity)
	if err != nil {
		t.Fatal(err)
	}
	if err := otherPair.WriteFiles(filepath.Join(dir, "other.pem"), filepath.Join(dir, "other-key.pem")); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, cert, key string
		want            []string
	}{
		{"another CA", filepath.Join(dir, "other.pem"), filepath.Join(dir, "other-key.pem"),
			[]string{"the broker refused the TLS handshake", "does not chain to the CA in"}},
		{"no clientAuth usage", e.env.Path(devmode.ServerCertFile), e.env.Path(devmode.ServerKeyFile),
			[]string{"the broker refused the TLS handshake", "lacks the clientAuth extended key usage"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var errb syncBuffer
			code := run(context.Background(), []string{"--addr", e.addr, "--ca", e.env.Path(devmode.CAFile), "--cert", tt.cert, "--key", tt.key,
				"--timeout", "5s", "token", "identity"}, io.Discard, &errb)
			for _, w := range tt.want {
				if !strings.Contains(errb.String(), w) {
					t.Errorf("stderr %q does not say %q", errb.String(), w)
				}
			}
			if code != exitError || strings.Contains(errb.String(), "broken pipe") {
				t.Errorf("exit %d, stderr %q; want 1 without the raw transport error", code, errb.String())
			}
		})
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	return fmt.Sprint(redistest.FreePort(t))
}

// pemCert encodes a DER certificate as PEM.
func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// fingerprintOf is the broker's fingerprint of a token.
func fingerprintOf(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(sum[:16])
}
