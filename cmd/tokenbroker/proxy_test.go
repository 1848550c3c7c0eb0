package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// connectProxy is an HTTP CONNECT proxy on loopback that sends every tunnel
// to one address, whatever host the client names, and records what it saw.
type connectProxy struct {
	ln      net.Listener
	to      string
	mu      sync.Mutex
	targets []string // the CONNECT request targets
	seen    []byte   // every byte that passed through, both ways
}

func startConnectProxy(t *testing.T, to string) *connectProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{ln: ln, to: to}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *connectProxy) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		_, _ = io.WriteString(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
		return
	}
	p.mu.Lock()
	p.targets = append(p.targets, req.Host)
	p.mu.Unlock()
	up, err := net.Dial("tcp", p.to)
	if err != nil {
		_, _ = io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	defer up.Close()
	_, _ = io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	done := make(chan struct{}, 2)
	pipe := func(dst io.Writer, src io.Reader) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				p.seen = append(p.seen, buf[:n]...)
				p.mu.Unlock()
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go pipe(up, br)
	go pipe(c, up)
	<-done
}

func (p *connectProxy) saw() ([]string, []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.targets...), append([]byte(nil), p.seen...)
}

// TestHTTPSProxyHonoured runs the real binary with HTTPS_PROXY set: its token
// requests to https://bank.test go through the proxy as a CONNECT tunnel (so
// the proxy sees TLS, never the secret), and a token comes back.
func TestHTTPSProxyHonoured(t *testing.T) {
	bankCA, err := devpki.NewCA("bank CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := bankCA.Server(time.Hour, "bank.test")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pair.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	const secret = "proxy-test-client-secret"
	bank := oauthtest.New(oauthtest.Options{})
	bank.AddClient(oauthtest.Client{ID: "via-proxy", Secret: secret, Scopes: []string{"IDENTITY"}})
	if err := bank.StartTLS("127.0.0.1:0", cert, nil); err != nil {
		t.Fatal(err)
	}
	defer bank.Close()
	bankAddr := strings.TrimPrefix(bank.URL(), "https://")
	proxy := startConnectProxy(t, bankAddr)

	grpcAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	adminAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev"), ListenAddr: grpcAddr, AdminAddr: adminAddr})
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	caFile, secretFile := env.Path("bank-ca.pem"), env.Path("bank-secret")
	if err := bankCA.WriteCertFile(caFile); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := *env.Config
	cred := cfg.Credentials[0]
	cred.TokenURL, cred.ClientID, cred.ClientSecretFile, cred.TLSCAFile = "https://bank.test/oauth2/token", "via-proxy", secretFile, caFile
	cfg.Credentials = append(cfg.Credentials[:0:0], cred)
	b, err := yaml.Marshal(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfgFile, b, 0o600); err != nil {
		t.Fatal(err)
	}

	childEnv := append(withoutProxyVars(os.Environ()), "HTTPS_PROXY=http://"+proxy.ln.Addr().String())
	startBinary(t, buildBinary(t), childEnv, adminAddr, "--config", cfgFile)

	conn, err := client.DialFiles(grpcAddr, client.TLSFiles{CAFile: env.Path(devmode.CAFile),
		CertFile: env.Path(devmode.ClientCertFile), KeyFile: env.Path(devmode.ClientKeyFile)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ts := client.TokenSource(conn, devmode.Credential)
	defer ts.Close()
	tok, err := ts.Token()
	if err != nil {
		t.Fatalf("GetToken through the proxy: %v", err)
	}
	if _, ok := bank.Lookup(tok.AccessToken); !ok {
		t.Error("the token did not come from the bank behind the proxy")
	}
	targets, seen := proxy.saw()
	if len(targets) != 1 || targets[0] != "bank.test:443" {
		t.Errorf("CONNECT targets = %q, want [bank.test:443]", targets)
	}
	for _, plain := range []string{secret, tok.AccessToken, "client_secret", "grant_type"} {
		if strings.Contains(string(seen), plain) {
			t.Errorf("the proxy saw %q in clear", plain)
		}
	}
}

// withoutProxyVars drops the proxy variables a developer's shell may set.
func withoutProxyVars(env []string) []string {
	var out []string
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(name) {
		case "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "REQUEST_METHOD":
			continue
		}
		out = append(out, kv)
	}
	return out
}
