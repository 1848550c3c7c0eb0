package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/broker/spiretest"
)

const (
	spiffeBroker = "spiffe://bank.internal/ns/tokenbroker/sa/tokenbroker"
	spiffeCaller = "spiffe://bank.internal/ns/payments/sa/api"
)

// TestSPIRETokenctl runs the tokenbroker binary with tls.spiffe against a
// real SPIRE agent (the broker's entry selects its executable's path) and
// tokenctl in this process (its entry selects the uid) with --spiffe-socket
// and --broker-id: token, agent --write, and a wrong --broker-id.
func TestSPIRETokenctl(t *testing.T) {
	spiretest.Bin(t) // skips (fails under CI) before the slow build without SPIRE
	bin := filepath.Join(t.TempDir(), "tokenbroker")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/tokenbroker/tokenbroker/cmd/tokenbroker").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	srv := spiretest.StartServer(t, "bank.internal")
	token, agentID := srv.JoinToken()
	// The broker process matches both entries (the uid too) and picks its
	// own by tls.spiffe.id; tokenctl here matches only the caller's.
	srv.CreateEntry(spiretest.Entry{ParentID: agentID, SPIFFEID: spiffeBroker, Selectors: []string{"unix:path:" + bin}})
	srv.CreateEntry(spiretest.Entry{ParentID: agentID, SPIFFEID: spiffeCaller, Selectors: []string{fmt.Sprintf("unix:uid:%d", os.Getuid())}})
	agent := srv.StartAgent(token)

	as := oauthtest.New(oauthtest.Options{ExpiresIn: time.Hour})
	as.AddClient(oauthtest.Client{ID: "broker", Secret: "s3cret-spire", Scopes: []string{"IDENTITY"}})
	if err := as.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = as.Close() })

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "secret"), []byte("s3cret-spire\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	grpcAddr, adminAddr := freeAddr(t), freeAddr(t)
	conf := fmt.Sprintf(`listen_addr: %s
admin_addr: %s
tls:
  spiffe:
    workload_api: %s
    id: %s
credentials:
  - name: identity
    token_url: %s
    client_id: broker
    client_secret_file: %s
    auth_method: client_secret_post
    scopes: [IDENTITY]
    allowed_callers: [%s]
`, grpcAddr, adminAddr, agent.Addr(), spiffeBroker, as.TokenURL(), filepath.Join(dir, "secret"), spiffeCaller)
	confPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	brokerErr := &syncBuffer{}
	cmd := exec.Command(bin, "--config", confPath)
	cmd.Stdout, cmd.Stderr = brokerErr, brokerErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitReady(t, "http://"+adminAddr+"/readyz", func() string { return brokerErr.String() })

	tokenctl := func(ctx context.Context, args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(ctx, append([]string{"--addr", grpcAddr}, args...), &out, &errb)
		return code, out.String(), errb.String()
	}
	code, out, errOut := tokenctl(context.Background(), "--spiffe-socket", agent.Addr(), "--broker-id", spiffeBroker, "token", "identity")
	if code != exitOK || strings.TrimSpace(out) == "" {
		t.Fatalf("tokenctl --spiffe-socket token = %d, %q, %q; want 0 and a token", code, out, errOut)
	}

	// SPIFFE_ENDPOINT_SOCKET stands in for --spiffe-socket.
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", agent.Addr())
	if code, _, errOut := tokenctl(context.Background(), "--broker-id", spiffeBroker, "list"); code != exitOK {
		t.Errorf("tokenctl --broker-id list with SPIFFE_ENDPOINT_SOCKET = %d, %q; want 0", code, errOut)
	}

	code, _, errOut = tokenctl(context.Background(), "--spiffe-socket", agent.Addr(), "--broker-id", "spiffe://bank.internal/ns/other/sa/x", "token", "identity")
	if code != exitError || !strings.Contains(errOut, "check --broker-id") {
		t.Errorf("tokenctl with a wrong --broker-id = %d, %q; want 1 and a hint naming --broker-id", code, errOut)
	}

	// The agent keeps a token file, authenticated the same way.
	file := filepath.Join(t.TempDir(), "token")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		code, _, _ := tokenctl(ctx, "--spiffe-socket", agent.Addr(), "--broker-id", spiffeBroker, "agent", "identity", "--write", file)
		done <- code
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(file); err == nil && len(b) > 0 {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("tokenctl agent wrote no token file within 30s (exit %d?)", <-done)
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	if code := <-done; code != exitOK {
		t.Errorf("tokenctl agent exited %d after SIGTERM-like cancel, want 0", code)
	}
	if strings.Contains(brokerErr.String(), "s3cret-spire") {
		t.Error("the client secret is in the broker's output")
	}
}

// TestSPIFFEUsageErrors: the SPIFFE flags' usage errors, without SPIRE.
func TestSPIFFEUsageErrors(t *testing.T) {
	t.Setenv("SPIFFE_ENDPOINT_SOCKET", "")
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--spiffe-socket", "unix:///a.sock", "token", "identity"}, "--broker-id is required"},
		{[]string{"--broker-id", spiffeBroker, "token", "identity"}, "--spiffe-socket is required unless SPIFFE_ENDPOINT_SOCKET is set"},
		{[]string{"--broker-id", spiffeBroker, "--spiffe-socket", "unix:///a.sock", "--cert", "c", "token", "identity"}, "exclusive"},
		{[]string{"--broker-id", spiffeBroker, "--spiffe-socket", "unix:///a.sock", "--dev", "token", "identity"}, "exclusive"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		if code := run(context.Background(), tt.args, &out, &errb); code != exitUsage || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("tokenctl %v = %d, %q; want %d and %q", tt.args, code, errb.String(), exitUsage, tt.want)
		}
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

// waitReady polls url for up to 60s (the broker waits for its first SVID).
func waitReady(t *testing.T, url string, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("broker not ready at %s within 60s; its output:\n%s", url, logs())
}
