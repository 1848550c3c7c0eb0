package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// devServer is a real `tokenbroker --dev` process on free loopback ports.
type devServer struct {
	dir, grpcAddr, adminAddr string
	cmd                      *exec.Cmd
	stderr                   *bytes.Buffer
}

// startDevServer builds cmd/tokenbroker and runs it in dev mode with its dev
// directory in dir (a new temp dir when empty) and extra flags.
func startDevServer(t *testing.T, dir string, extra ...string) *devServer {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tokenbroker")
	build := exec.Command("go", "build", "-o", bin, "github.com/tokenbroker/tokenbroker/cmd/tokenbroker")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if dir == "" {
		dir = filepath.Join(t.TempDir(), "dev")
	}
	s := &devServer{dir: dir, stderr: &bytes.Buffer{}}
	args := append([]string{"--dev", "--dev-dir", s.dir, "--listen-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"}, extra...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Stderr = s.stderr
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.cmd.Process.Kill(); _ = s.cmd.Wait() })

	// The banner's first line names both bound addresses.
	banner := regexp.MustCompile(`gRPC \(mTLS\) on ([^\s,]+), admin HTTP on http://([^\s,]+)`)
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(30 * time.Second)
	for s.grpcAddr == "" {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("tokenbroker --dev exited before serving; stderr:\n%s", s.stderr)
			}
			if m := banner.FindStringSubmatch(line); m != nil {
				s.grpcAddr, s.adminAddr = m[1], m[2]
			}
		case <-timeout:
			t.Fatalf("tokenbroker --dev printed no banner within 30s; stderr:\n%s", s.stderr)
		}
	}
	go func() { // drain the rest of the banner so the process never blocks on stdout
		for range lines {
		}
	}()
	return s
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// tokenctl runs tokenctl's code in process against the dev server.
func (s *devServer) tokenctl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	full := append([]string{"--addr", s.grpcAddr}, args...)
	code = run(context.Background(), full, &out, &errb)
	return code, out.String(), errb.String()
}

func TestDevModeEndToEnd(t *testing.T) {
	s := startDevServer(t, "")

	for _, f := range []string{"ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem",
		"denied-client.pem", "denied-client-key.pem", "config.yaml"} {
		if _, err := os.Stat(filepath.Join(s.dir, f)); err != nil {
			t.Errorf("dev dir lacks %s: %v", f, err)
		}
	}

	code, tok, stderr := s.tokenctl(t, "--dev", "--dev-dir", s.dir, "token", "identity")
	tok = strings.TrimSpace(tok)
	if code != 0 || strings.Count(tok, ".") != 2 {
		t.Fatalf("tokenctl token identity = %d, %q, stderr %q; want 0 and a JWT", code, tok, stderr)
	}

	code, js, _ := s.tokenctl(t, "--dev", "--dev-dir", s.dir, "token", "identity", "--json", "--scope", "IDENTITY")
	var got struct {
		AccessToken string   `json:"access_token"`
		TokenType   string   `json:"token_type"`
		Scopes      []string `json:"scopes"`
		Fingerprint string   `json:"fingerprint"`
		ExpireTime  string   `json:"expire_time"`
	}
	if err := json.Unmarshal([]byte(js), &got); err != nil || code != 0 {
		t.Fatalf("tokenctl --json = %d, %q: %v", code, js, err)
	}
	if got.AccessToken != tok || got.TokenType != "Bearer" || strings.Join(got.Scopes, " ") != "IDENTITY" || len(got.Fingerprint) != 32 {
		t.Errorf("--json token = %+v, want the cached token, Bearer, [IDENTITY], a fingerprint", got)
	}
	if exp, err := time.Parse(time.RFC3339Nano, got.ExpireTime); err != nil || time.Until(exp) > 5*time.Minute || time.Until(exp) < 4*time.Minute {
		t.Errorf("expire_time = %q, want about five minutes from now", got.ExpireTime)
	}

	code, out, _ := s.tokenctl(t, "--dev", "--dev-dir", s.dir, "invalidate", "identity", "--fingerprint", got.Fingerprint)
	if code != 0 || !strings.HasPrefix(out, "invalidated") {
		t.Errorf("tokenctl invalidate = %d, %q; want invalidated", code, out)
	}
	code, out, _ = s.tokenctl(t, "--dev", "--dev-dir", s.dir, "invalidate", "identity", "--fingerprint", got.Fingerprint)
	if code != 0 || !strings.HasPrefix(out, "not invalidated") {
		t.Errorf("second tokenctl invalidate = %d, %q; want not invalidated", code, out)
	}

	if code, out, _ := s.tokenctl(t, "--dev", "--dev-dir", s.dir, "list"); code != 0 || out != "identity\tIDENTITY\nidentity-dpop\tIDENTITY\n" {
		t.Errorf("tokenctl list = %d, %q; want identity and identity-dpop, each with IDENTITY", code, out)
	}

	// The dev client is the dev configuration's admin caller.
	code, out, stderr = s.tokenctl(t, "--dev", "--dev-dir", s.dir, "inventory")
	if code != 0 || !strings.HasPrefix(out, "identity\tok\n") || !strings.Contains(out, "client tokenbroker-dev, client_secret_post") ||
		!strings.Contains(out, "caller          spiffe://tokenbroker.dev/dev-client (all scopes)") {
		t.Errorf("tokenctl inventory = %d, %q, stderr %q", code, out, stderr)
	}
	code, out, _ = s.tokenctl(t, "--dev", "--dev-dir", s.dir, "inventory", "identity", "--json")
	var inv struct {
		Credentials []struct {
			ClientID string `json:"client_id"`
		} `json:"credentials"`
	}
	if err := json.Unmarshal([]byte(out), &inv); code != 0 || err != nil || len(inv.Credentials) != 1 || inv.Credentials[0].ClientID != "tokenbroker-dev" {
		t.Errorf("tokenctl inventory --json = %d, %q (%v)", code, out, err)
	}
	code, _, stderr = s.tokenctl(t, "--ca", filepath.Join(s.dir, "ca.pem"),
		"--cert", filepath.Join(s.dir, "denied-client.pem"), "--key", filepath.Join(s.dir, "denied-client-key.pem"), "inventory")
	if code != exitDenied || !strings.Contains(stderr, "not in admin.callers") {
		t.Errorf("tokenctl inventory as a non-admin: exit %d, stderr %q; want %d", code, stderr, exitDenied)
	}

	// The denied identity is valid but allowed by no credential.
	code, _, stderr = s.tokenctl(t, "--ca", filepath.Join(s.dir, "ca.pem"),
		"--cert", filepath.Join(s.dir, "denied-client.pem"), "--key", filepath.Join(s.dir, "denied-client-key.pem"),
		"token", "identity")
	if code != exitDenied || !strings.Contains(stderr, "PermissionDenied") {
		t.Errorf("denied client: exit %d, stderr %q; want %d and PermissionDenied", code, stderr, exitDenied)
	}

	// SIGHUP re-reads the configuration: allowing the denied identity lets it in.
	cfgPath := filepath.Join(s.dir, "config.yaml")
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Credentials[0].AllowedCallers = append(cfg.Credentials[0].AllowedCallers,
		config.AllowedCaller{Caller: "spiffe://tokenbroker.dev/denied-client"})
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _, stderr = s.tokenctl(t, "--ca", filepath.Join(s.dir, "ca.pem"),
			"--cert", filepath.Join(s.dir, "denied-client.pem"), "--key", filepath.Join(s.dir, "denied-client-key.pem"),
			"token", "identity")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after SIGHUP the newly allowed client is still refused: %s", stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// watch prints the current token's fingerprint, and ends cleanly when interrupted.
	wctx, stop := context.WithCancel(context.Background())
	var wout, werr syncBuffer
	done := make(chan int)
	go func() {
		done <- run(wctx, []string{"--addr", s.grpcAddr, "--dev", "--dev-dir", s.dir, "watch", "identity"}, &wout, &werr)
	}()
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(wout.String(), "fingerprint ") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if code := <-done; code != 0 || !strings.Contains(wout.String(), "fingerprint ") || strings.Contains(wout.String(), tok) {
		t.Errorf("tokenctl watch = %d, %q, %q; want a fingerprint line and no token", code, wout.String(), werr.String())
	}

	// Exit codes follow the status; health reports SERVING.
	for _, tt := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"health"}, exitOK, "SERVING\n"},
		{[]string{"health", "--service", "tokenbroker.v1.TokenBroker", "--json"}, exitOK, `"SERVING"`},
		{[]string{"health", "--service", "nope"}, exitNotServing, ""},
		{[]string{"token", "no-such-credential"}, exitDenied, ""},
		{[]string{"token", "bad name!"}, exitUsage, ""},
		{[]string{"invalidate", "identity", "--fingerprint", strings.Repeat("0", 32), "--json"}, exitOK, `"invalidated"`},
		{[]string{"invalidate", "identity", "--fingerprint", "00"}, exitUsage, ""},
	} {
		code, out, stderr := s.tokenctl(t, append([]string{"--dev", "--dev-dir", s.dir}, tt.args...)...)
		if code != tt.code || !strings.Contains(out, tt.out) {
			t.Errorf("tokenctl %v = %d, %q (stderr %q); want %d and %q", tt.args, code, out, stderr, tt.code, tt.out)
		}
	}

	// Operators see the admin endpoints; then SIGTERM ends the process cleanly.
	resp, err := http.Get("http://" + s.adminAddr + "/readyz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz: %v %v", resp, err)
	}
	resp.Body.Close()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v; stderr:\n%s", err, s.stderr)
	}
	if strings.Contains(s.stderr.String(), tok) {
		t.Errorf("the access token appears in the server log")
	}
	// Nobody listening: exit 1, for the health check and for a token alike.
	for _, args := range [][]string{{"health"}, {"token", "identity"}} {
		code, _, stderr := s.tokenctl(t, append([]string{"--dev", "--dev-dir", s.dir, "--timeout", "2s"}, args...)...)
		if code != exitError || !strings.Contains(stderr, "Unavailable") {
			t.Errorf("tokenctl %v with the broker gone = %d, %q; want %d and Unavailable", args, code, stderr, exitError)
		}
	}
}

func TestDevModeWithRedis(t *testing.T) {
	rs := redistest.Start(t)
	s := startDevServer(t, "", "--redis", rs.Addr())
	code, tok, stderr := s.tokenctl(t, "--dev", "--dev-dir", s.dir, "token", "identity")
	tok = strings.TrimSpace(tok)
	if code != 0 || tok == "" {
		t.Fatalf("token via the dev broker on redis: %d %s", code, stderr)
	}
	// The token is in Redis under the dev prefix, sealed.
	ctx := context.Background()
	keys := rs.Client().Keys(ctx, "tokenbroker-dev:*").Val()
	if len(keys) == 0 {
		t.Fatal("no tokenbroker-dev: keys in Redis")
	}
	for _, k := range keys {
		if strings.Contains(rs.Client().HGetAll(ctx, k).String(), tok) {
			t.Errorf("%s holds the token in plain text", k)
		}
	}
	if _, err := os.Stat(filepath.Join(s.dir, "store-key")); err != nil {
		t.Errorf("dev store key: %v", err)
	}
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"token", "identity"}, "--ca, --cert and --key are required"},
		{[]string{"--dev", "--ca", "x", "token", "identity"}, "exclusive"},
		{[]string{"--dev"}, "usage: tokenctl"},
		{[]string{"--dev", "frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"--bogus"}, "flag provided but not defined"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		if code := run(context.Background(), tt.args, &out, &errb); code != exitUsage || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("tokenctl %v = %d, %q; want %d and %q", tt.args, code, errb.String(), exitUsage, tt.want)
		}
	}
	// Missing dev files are an error reaching the broker, not a usage error.
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--dev", "--dev-dir", t.TempDir(), "token", "identity"}, &out, &errb); code != exitError ||
		!strings.Contains(errb.String(), "TLS files") {
		t.Errorf("tokenctl with an empty dev dir = %d, %q; want 1 and a certificate error", code, errb.String())
	}
}

func TestVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, &out, &errb); code != exitOK || !strings.HasPrefix(out.String(), "tokenctl ") ||
		!strings.Contains(out.String(), "(commit ") {
		t.Errorf("tokenctl --version = %d, %q, %q; want 0 and \"tokenctl VERSION (commit …)\"", code, out.String(), errb.String())
	}
}
